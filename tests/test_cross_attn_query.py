"""The hybrid layers' query of the slow tokens (``cross_attn_query_source``): the self-attention's rotated query
(the reference) or a projection of the layer's own, without rotary embedding."""

from __future__ import annotations

import pytest
import torch

from llava.model import LlavaQwenSlowFastConfig, LlavaQwenSlowFastForCausalLM
from llava.train.arguments import ModelArguments
from llava.train.train import set_trainable

from conftest import prompt_ids, random_video, tiny_config, tiny_model


def attention_output(model, shift: int) -> torch.Tensor:
    """The first hybrid layer's attention output for fixed text and slow tokens, the text placed ``shift``
    positions later."""
    torch.manual_seed(3)
    hidden, slow = torch.randn(1, 6, 64), torch.randn(1, 10, 64)
    layer = model.hybrid_layers[0]
    positions = torch.arange(6)[None] + shift
    with torch.no_grad():
        out, _ = layer.self_attn(
            hidden,
            model.model.rotary_emb(hidden, positions),
            None,  # no mask: every position sees every other, so self-attention depends on relative places only
            slow_key_values=layer.self_attn.project_slow(layer.input_layernorm(slow)),
            slow_token_mask=torch.ones(1, 10, dtype=torch.bool),
            cross_attn_query_mask=torch.ones(1, 6, dtype=torch.bool),
        )
    return out


def test_default_is_the_reference_query_and_adds_no_parameters():
    model = tiny_model()
    assert model.config.cross_attn_query_source == "self_attn"
    assert not any("cross_attn_q_proj" in name for name, _ in model.named_parameters())


def test_unknown_query_source_is_refused_by_name():
    with pytest.raises(ValueError, match="cross_attn_query_source='kv'"):
        tiny_config(cross_attn_query_source="kv")


def test_own_query_adds_one_projection_per_hybrid_layer():
    model = tiny_model(cross_attn_query_source="own")
    names = [name for name, _ in model.named_parameters() if "cross_attn_q_proj" in name]
    expected = [f"model.layers.{i}.self_attn.cross_attn_q_proj.{p}" for i in model.config.hybrid_layer_indices for p in ("weight", "bias")]
    assert names == expected


def test_own_query_reads_the_slow_tokens_the_same_wherever_the_text_sits():
    model = tiny_model(cross_attn_query_source="own")
    torch.testing.assert_close(attention_output(model, 0), attention_output(model, 37), rtol=1e-4, atol=1e-5)


def test_reference_query_turns_with_the_text_position():
    model = tiny_model()
    assert not torch.allclose(attention_output(model, 0), attention_output(model, 37), rtol=1e-4, atol=1e-5)


def test_own_query_starts_as_a_copy_of_the_self_attention_query():
    model = tiny_model(cross_attn_query_source="own")
    model.initialize_cross_attn_kv_from_lm()
    for layer in model.hybrid_layers:
        attn = layer.self_attn
        assert torch.equal(attn.cross_attn_q_proj.weight, attn.q_proj.weight)
        assert torch.equal(attn.cross_attn_q_proj.bias, attn.q_proj.bias)


@pytest.mark.parametrize("warm_up_gate", [0.0, 0.7])
def test_own_query_changes_only_what_the_slow_tokens_contribute(warm_up_gate):
    ids, video = prompt_ids(4, 6), random_video(4)
    reference_model = tiny_model(warm_up_gate=warm_up_gate)
    own_model = tiny_model(warm_up_gate=warm_up_gate, cross_attn_query_source="own")
    missing, unexpected = own_model.load_state_dict(reference_model.state_dict(), strict=False)
    assert not unexpected and all("cross_attn_q_proj" in name for name in missing)
    with torch.no_grad():
        for layer in own_model.hybrid_layers:  # the reference's query, but without RoPE
            layer.self_attn.cross_attn_q_proj.load_state_dict(layer.self_attn.q_proj.state_dict())
        reference = reference_model(input_ids=ids, images=[video]).logits
        own = own_model(input_ids=ids, images=[video]).logits
    if warm_up_gate == 0.0:  # the slow path is shut: the same model
        torch.testing.assert_close(own, reference)
    else:
        assert not torch.allclose(own[0, -1], reference[0, -1])


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_greedy_tokens_with_own_query_equal_the_teacher_forced_argmax(cache):
    model = tiny_model(cross_attn_query_source="own")
    ids, video = prompt_ids(4, 6), random_video(8)
    new = model.generate(ids, images=[video], do_sample=False, max_new_tokens=6, cache_implementation=cache)
    with torch.no_grad():
        logits = model(input_ids=torch.cat([ids, new[:, :-1]], dim=1), images=[video]).logits
    assert logits[0, -6:].argmax(-1).tolist() == new[0].tolist()


def test_save_and_load_keep_the_own_query(tmp_path):
    model = tiny_model(cross_attn_query_source="own")
    model.save_pretrained(tmp_path)
    loaded = LlavaQwenSlowFastForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.cross_attn_query_source == "own"
    assert LlavaQwenSlowFastConfig.from_dict(loaded.config.to_dict()).cross_attn_query_source == "own"
    saved, restored = model.state_dict(), loaded.state_dict()
    assert saved.keys() == restored.keys() and all(torch.equal(saved[k], restored[k]) for k in saved)
    ids, video = prompt_ids(4, 6), random_video(8)
    with torch.no_grad():
        # the same weights; a model loaded from disk may take other CPU kernel paths (float rounding, ~1e-6)
        torch.testing.assert_close(loaded(input_ids=ids, images=[video]).logits, model(input_ids=ids, images=[video]).logits,
                                   rtol=0, atol=1e-5)  # fmt: skip


def test_stage1_trains_the_own_query_with_the_other_cross_attention_parameters():
    model = tiny_model(cross_attn_query_source="own")
    set_trainable(model, ModelArguments(model_name_or_path="x", tune_mm_mlp_adapter=True))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert {n for n, _ in model.named_parameters() if "cross_attn_q_proj" in n} <= trainable
