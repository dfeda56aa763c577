"""Hybrid decoder layers: placement, key/value layout and initialisation, gating, query modes, isolation."""

from __future__ import annotations

import math

import pytest
import torch

from llava.constants import TOKEN_TYPE_RESPONSE, TOKEN_TYPE_TEXT
from llava.model.hybrid_layer import SlowFastDecoderLayer, cross_attn_query_mask

from conftest import prompt_ids, random_video, tiny_config, tiny_model


def test_hybrid_layers_placed_by_every_min_max():
    assert tiny_config(num_hidden_layers=28, cross_attn_every_n_layers=8, cross_attn_max_layer_depth=None).hybrid_layer_indices == [0, 8, 16, 24]
    assert tiny_config(num_hidden_layers=8, cross_attn_every_n_layers=3, cross_attn_min_layer_depth=1, cross_attn_max_layer_depth=7).hybrid_layer_indices == [1, 4]
    model = tiny_model(cross_attn_every_n_layers=2)
    assert [type(l) is SlowFastDecoderLayer for l in model.model.layers] == [True, False, True, False]


def test_kv_projection_is_read_per_head_key_then_value():
    model = tiny_model()
    attn = model.hybrid_layers[0].self_attn
    x = torch.randn(1, 5, 64)
    keys, values = attn.project_slow(x)
    raw = attn.cross_attn_kv_proj(x).view(1, 5, 2, 2, 16)  # (kv head, [k, v], head_dim)
    torch.testing.assert_close(keys[0, 1], raw[0, :, 1, 0])
    torch.testing.assert_close(values[0, 0], raw[0, :, 0, 1])


def test_per_head_kv_init_reproduces_language_model_keys_and_values():
    attn = tiny_model().hybrid_layers[0].self_attn
    attn.init_cross_attn_kv_from_lm("per_head")
    x = torch.randn(1, 5, 64)
    keys, values = attn.project_slow(x)
    torch.testing.assert_close(keys, attn.k_proj(x).view(1, 5, 2, 16).transpose(1, 2))
    torch.testing.assert_close(values, attn.v_proj(x).view(1, 5, 2, 16).transpose(1, 2))


def test_reference_kv_init_stacks_k_then_v():
    attn = tiny_model().hybrid_layers[0].self_attn
    attn.init_cross_attn_kv_from_lm("reference")
    torch.testing.assert_close(attn.cross_attn_kv_proj.weight, torch.cat([attn.k_proj.weight, attn.v_proj.weight]))


def test_model_kv_init_rejects_unknown_layout():
    with pytest.raises(ValueError, match="layout"):
        tiny_model().initialize_cross_attn_kv_from_lm("interleaved")


@pytest.mark.parametrize(
    "gating, implementation, expected",
    [
        ("whole-dynamic", "text-only-vanilla", lambda z, w: z),
        ("whole-dynamic-tanh", "text-only-vanilla", lambda z, w: math.tanh(z)),
        ("whole-dynamic-tanh-warmup", "text-only-vanilla", lambda z, w: math.tanh(z) * math.tanh(w)),
        ("whole-dynamic-warmup", "vanilla", lambda z, w: z * w),
        ("whole-dynamic-tanh-warmup", "vanilla-flashattn", lambda z, w: math.tanh(z) * w),
    ],
)
def test_gate_variants(gating, implementation, expected):
    model = tiny_model(cross_attn_gating_type=gating, cross_attn_implementation=implementation, warm_up_gate=0.9)
    attn = model.hybrid_layers[0].self_attn
    x = torch.randn(1, 1, 64)
    z = attn.cross_attn_gate_proj[0](x).item()
    w = 0.9 if attn.cross_attn_warm_up_gate is not None else None
    assert attn.gate(x).item() == pytest.approx(expected(z, w), rel=1e-5, abs=1e-6)


def test_unsupported_gating_is_refused_naming_the_field():
    with pytest.raises(ValueError, match="cross_attn_gating_type"):
        tiny_config(cross_attn_gating_type="whole-static")


def test_unsupported_cross_attn_implementation_is_refused():
    with pytest.raises(ValueError, match="cross_attn_implementation"):
        tiny_config(cross_attn_implementation="flamingo")


TYPES = torch.tensor([[1, 1, 3, 3, 1, 2, 2, 4], [1, 3, 1, 1, 2, 4, 4, 4]])
HAS_VISUAL = torch.tensor([True, True])


def test_text_only_mode_queries_text_and_response_tokens():
    mask = cross_attn_query_mask(TYPES, "text-only-vanilla-flashattn", HAS_VISUAL)
    assert mask.tolist() == ((TYPES == TOKEN_TYPE_TEXT) | (TYPES == TOKEN_TYPE_RESPONSE)).tolist()


def test_masksystem_mode_queries_only_text_after_first_visual_token():
    mask = cross_attn_query_mask(TYPES, "text-only-vanilla-masksystem", HAS_VISUAL)
    assert mask[0].tolist() == [False, False, False, False, True, True, True, False]
    assert mask[1].tolist() == [False, False, True, True, True, False, False, False]


def test_vanilla_mode_queries_every_position():
    assert cross_attn_query_mask(TYPES, "vanilla", HAS_VISUAL).all()


def test_samples_without_visual_tokens_never_query():
    mask = cross_attn_query_mask(TYPES, "vanilla", torch.tensor([True, False]))
    assert mask[0].all() and not mask[1].any()


def naive_cross_attention(query, keys, values, valid):
    """Softmax attention written out, for one sample: query [H, L, D], keys/values [Hkv, S, D]."""
    groups = query.shape[0] // keys.shape[0]
    keys = keys.repeat_interleave(groups, 0)[:, valid]
    values = values.repeat_interleave(groups, 0)[:, valid]
    weights = torch.softmax(query @ keys.transpose(-1, -2) / math.sqrt(query.shape[-1]), dim=-1)
    return (weights @ values).transpose(0, 1).reshape(query.shape[1], -1)


def test_cross_attention_matches_naive_softmax_and_respects_slow_mask():
    from llava.model.hybrid_layer import slow_cross_attention

    torch.manual_seed(0)
    query = torch.randn(2, 4, 3, 16)
    keys, values = torch.randn(2, 2, 6, 16), torch.randn(2, 2, 6, 16)
    valid = torch.tensor([[True] * 6, [True, True, False, True, False, False]])
    out = slow_cross_attention(query, keys, values, valid, torch.ones(2, 3, dtype=torch.bool), 16**-0.5)
    for b in range(2):
        torch.testing.assert_close(out[b], naive_cross_attention(query[b], keys[b], values[b], valid[b]))


def test_cross_attention_of_querying_rows_does_not_depend_on_the_other_rows():
    from llava.model.hybrid_layer import slow_cross_attention

    torch.manual_seed(1)
    query = torch.randn(2, 4, 5, 16)
    keys, values = torch.randn(2, 2, 6, 16), torch.randn(2, 2, 6, 16)
    valid = torch.ones(2, 6, dtype=torch.bool)
    some = torch.tensor([[False, True, False, True, False], [False, False, False, True, True]])
    partial = slow_cross_attention(query, keys, values, valid, some, 16**-0.5)
    full = slow_cross_attention(query, keys, values, valid, torch.ones(2, 5, dtype=torch.bool), 16**-0.5)
    torch.testing.assert_close(partial[some], full[some])


def test_text_only_sample_in_batch_is_unaffected_by_slow_path():
    model = tiny_model()
    visual = prompt_ids(3, 5, seed=1)
    text = torch.randint(1, 300, (1, 9), generator=torch.Generator().manual_seed(2))
    batch = torch.zeros(2, 9, dtype=torch.long)
    batch[0, : visual.shape[1]] = visual[0]
    batch[1] = text[0]
    mask = torch.zeros(2, 9, dtype=torch.long)
    mask[0, : visual.shape[1]] = 1
    mask[1] = 1
    with torch.no_grad():
        together = model(input_ids=batch, attention_mask=mask, images=[random_video(4)]).logits
        alone = model(input_ids=text).logits
    torch.testing.assert_close(together[1, :9], alone[0], rtol=1e-4, atol=1e-5)


def test_sample_output_does_not_depend_on_other_samples_slow_tokens():
    model = tiny_model()
    ids = torch.cat([prompt_ids(3, 5, seed=1), prompt_ids(3, 5, seed=1)])
    video = random_video(4, seed=1)
    with torch.no_grad():
        a = model(input_ids=ids, images=[video, random_video(8, seed=2)]).logits
        b = model(input_ids=ids, images=[video, random_video(4, seed=3)]).logits
    n = a.shape[1] if a.shape[1] == b.shape[1] else min(a.shape[1], b.shape[1])
    torch.testing.assert_close(a[0, :n], b[0, :n], rtol=1e-4, atol=1e-5)


def test_masksystem_slow_path_changes_only_positions_after_the_video():
    model = tiny_model(cross_attn_implementation="text-only-vanilla-masksystem")
    ids = prompt_ids(3, 5)
    video = random_video(4)
    with torch.no_grad():
        with_slow = model(input_ids=ids, images=[video]).logits
        for layer in model.hybrid_layers:
            layer.self_attn.cross_attn_warm_up_gate.zero_()
        without = model(input_ids=ids, images=[video]).logits
    diff = (with_slow - without).abs().amax(-1)[0]
    # positions: 3 text tokens, then fast tokens (4 frames // 4 = 1 frame x 4 tokens), then 5 text tokens
    assert diff[:7].max() < 1e-6  # system text and fast tokens neither query nor see a querying position
    assert diff[7:].min() > 1e-4
