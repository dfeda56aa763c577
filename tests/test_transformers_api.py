"""The model as a transformers model: standard outputs, tuples, static cache and compiled decoding, every
trainable parameter used, parallelism plans and Auto classes."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM

from llava.model import LlavaQwenSlowFastModel
from llava.model.cache import SlowFastCache, SlowFastStaticCache
from llava.model.compat import CACHE_KWARG, output_cache

from conftest import prompt_ids, random_video, tiny_config, tiny_model


def eager_model(**overrides):
    model = tiny_model(**overrides)
    model.set_attn_implementation("eager")
    return model


# ------------------------------------------------------------------------------------------ outputs
def test_forward_returns_every_layers_hidden_states_and_attentions():
    model = eager_model()
    ids = prompt_ids(4, 6)
    with torch.no_grad():
        out = model(ids, images=[random_video(8)], output_hidden_states=True, output_attentions=True)
    length = out.logits.shape[1]
    layers = model.config.num_hidden_layers
    assert len(out.hidden_states) == layers + 1
    assert all(h.shape == (1, length, model.config.hidden_size) for h in out.hidden_states)
    assert len(out.attentions) == layers
    assert all(a.shape == (1, model.config.num_attention_heads, length, length) for a in out.attentions)
    # attention rows are distributions over the causal past
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(1, model.config.num_attention_heads, length))


def test_hidden_states_are_what_each_layer_returns():
    model = eager_model()
    ids = prompt_ids(4, 6)
    with torch.no_grad():
        out = model(ids, images=[random_video(8)], output_hidden_states=True)
        mm = model.prepare_multimodal_inputs(ids, images=[random_video(8)])
    torch.testing.assert_close(out.hidden_states[0], mm.inputs_embeds)
    torch.testing.assert_close(model.lm_head(out.hidden_states[-1]), out.logits)


def test_cross_attention_weights_are_an_extra_output_of_the_hybrid_layers():
    model = eager_model()
    video = random_video(8)
    with torch.no_grad():
        out = model(prompt_ids(4, 6), images=[video], output_attentions=True)
        mm = model.prepare_multimodal_inputs(prompt_ids(4, 6), images=[video])
    slow = mm.slow_tokens.shape[1]
    assert len(out.cross_attentions) == len(model.hybrid_layers)
    for weights in out.cross_attentions:
        assert weights.shape == (1, model.config.num_attention_heads, out.logits.shape[1], slow)
        rows = mm.cross_attn_query_mask[0]
        # querying rows are distributions over the slow tokens; the fast tokens do not query
        torch.testing.assert_close(weights[0, :, rows].sum(-1), torch.ones_like(weights[0, :, rows, 0]))
        assert torch.all(weights[0, :, ~rows] == 0)


def test_text_only_forward_returns_hidden_states_and_no_cross_attention():
    model = eager_model()
    with torch.no_grad():
        out = model(torch.tensor([[5, 6, 7, 8]]), output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert len(out.attentions) == model.config.num_hidden_layers
    assert not out.cross_attentions


def test_generate_returns_hidden_states_of_every_step():
    model = eager_model()
    out = model.generate(prompt_ids(4, 6), images=[random_video(8)], max_new_tokens=3, do_sample=False,
                         return_dict_in_generate=True, output_hidden_states=True, output_attentions=True)  # fmt: skip
    assert len(out.hidden_states) == 3
    for step in out.hidden_states:
        assert len(step) == model.config.num_hidden_layers + 1
        assert all(isinstance(h, torch.Tensor) for h in step)
    assert all(isinstance(a, torch.Tensor) for step in out.attentions for a in step)


def test_return_dict_false_returns_a_tuple():
    model = tiny_model()
    labels = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        out = model(torch.tensor([[5, 6, 7, 8]]), labels=labels, return_dict=False)
        as_dict = model(torch.tensor([[5, 6, 7, 8]]), labels=labels)
    assert isinstance(out, tuple)
    torch.testing.assert_close(out[0], as_dict.loss)
    torch.testing.assert_close(out[1], as_dict.logits)


# ------------------------------------------------------------------------------------------ the cache's name
# transformers 5.24 renamed the cache argument and output field `past_key_values` to `cache` (llava.model.compat).
@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_a_cache_passed_under_either_name_is_the_one_generate_fills(name):
    model = tiny_model()
    ids, video = prompt_ids(4, 6), random_video(8)
    cache = SlowFastCache(config=model.config)
    tokens = model.generate(ids, images=[video], max_new_tokens=4, do_sample=False, **{name: cache})
    assert tokens.tolist() == greedy(model, ids, [video], max_new_tokens=4)
    prompt = model.prepare_multimodal_inputs(ids, images=[video]).inputs_embeds.shape[1]
    assert cache.get_seq_length() == prompt + 3  # the last new token is never fed back
    assert sorted(cache.slow_key_values) == [layer.self_attn.layer_idx for layer in model.hybrid_layers]


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_forward_returns_the_cache_it_was_given_under_this_releases_field(name):
    model = tiny_model()
    cache = SlowFastCache(config=model.config)
    with torch.no_grad():
        out = model(prompt_ids(4, 6), images=[random_video(8)], use_cache=True, **{name: cache})
    assert output_cache(out) is cache and getattr(out, CACHE_KWARG) is cache
    assert cache.get_seq_length() == out.logits.shape[1]


def test_two_different_caches_are_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="pass the cache once"):
        model(torch.tensor([[5, 6, 7]]), cache=SlowFastCache(config=model.config),
              past_key_values=SlowFastCache(config=model.config))  # fmt: skip


def test_generation_raises_no_deprecation_warning_of_transformers(recwarn):
    model = tiny_model()
    ids, video = prompt_ids(4, 6), random_video(8)
    greedy(model, ids, [video], max_new_tokens=3)
    greedy(model, ids, [video], max_new_tokens=3, cache_implementation="static")
    greedy(model, ids, [video], max_new_tokens=3, num_beams=2)
    deprecations = [str(w.message) for w in recwarn if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert not [m for m in deprecations if "cache" in m or "past_key_values" in m], deprecations


# ------------------------------------------------------------------------------------------ static cache
def greedy(model, ids, images=None, **kwargs) -> list[list[int]]:
    kwargs.setdefault("max_new_tokens", 6)
    out = model.generate(ids, images=images, do_sample=False, **kwargs)
    return out.tolist()


def test_static_cache_generates_text_only_like_the_dynamic_cache():
    model = tiny_model()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    dynamic = model.generate(ids, max_new_tokens=6, do_sample=False)
    static = model.generate(ids, max_new_tokens=6, do_sample=False, cache_implementation="static")
    assert static.tolist() == dynamic.tolist()


@pytest.mark.parametrize("decode_mode", ["attend", "reference"])
def test_static_cache_generates_with_a_video_like_the_dynamic_cache(decode_mode):
    model = tiny_model()
    model.config.cross_attn_decode_mode = decode_mode
    ids, video = prompt_ids(4, 6), random_video(8)
    assert greedy(model, ids, [video], cache_implementation="static") == greedy(model, ids, [video])


def test_static_cache_generates_a_batch_of_videos_like_the_dynamic_cache():
    model = tiny_model()
    prompts = [prompt_ids(4, 6, seed=1)[0], prompt_ids(2, 9, seed=2)[0]]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for row, prompt in enumerate(prompts):  # left padding
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    videos = [random_video(8, seed=1), random_video(4, seed=2)]
    kwargs = dict(attention_mask=mask, max_new_tokens=5)
    assert greedy(model, ids, videos, cache_implementation="static", **kwargs) == greedy(model, ids, videos, **kwargs)


def test_static_cache_holds_the_slow_key_values_once():
    model = tiny_model()
    cache = SlowFastStaticCache(config=model.config, max_cache_len=64)
    model.generate(prompt_ids(4, 6), images=[random_video(8)], max_new_tokens=3, do_sample=False, past_key_values=cache)
    assert sorted(cache.slow_key_values) == [layer.self_attn.layer_idx for layer in model.hybrid_layers]


def test_compiled_static_decoding_gives_the_dynamic_caches_tokens():
    from transformers import CompileConfig

    model = tiny_model()
    ids, video = prompt_ids(4, 6), random_video(8)
    expected = greedy(model, ids, [video], max_new_tokens=5)
    compile_config = CompileConfig(fullgraph=False, dynamic=False)
    compile_config._compile_all_devices = True  # transformers compiles on accelerators only unless told
    torch._dynamo.reset()
    compiled = greedy(model, ids, [video], max_new_tokens=5, cache_implementation="static", compile_config=compile_config)
    assert compiled == expected
    assert hasattr(model, "_compiled_call") and model._compiled_call is not None


# ------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("with_video", [True, False])
def test_every_trainable_parameter_gets_a_gradient(with_video):
    model = tiny_model().train()
    ids = prompt_ids(4, 6) if with_video else torch.tensor([[5, 6, 7, 8, 9, 10]])
    labels = ids.clone()
    labels[labels < 0] = -100
    images = [random_video(8)] if with_video else None
    model(ids, labels=labels, images=images).loss.backward()
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


def test_the_towers_unused_head_is_no_parameter_but_is_saved_and_loaded(tmp_path):
    model = tiny_model()
    assert not [name for name, _ in model.named_parameters() if ".head." in name]
    key = "model.vision_tower.vision_tower.head.norm.weight"
    with torch.no_grad():
        model.get_vision_tower().vision_tower.head.norm.weight.fill_(0.25)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path)
    assert torch.all(loaded.state_dict()[key] == 0.25)


# ------------------------------------------------------------------------------------------ plans and Auto
def test_parallelism_plans_cover_qwen2s_and_the_hybrid_projections():
    import re

    from transformers import Qwen2ForCausalLM

    model = tiny_model(cross_attn_query_source="own")  # the own query's projection is in the plan too
    assert type(model)._tp_plan == Qwen2ForCausalLM._tp_plan
    assert type(model)._pp_plan == Qwen2ForCausalLM._pp_plan
    plan = model.config.base_model_tp_plan
    assert plan["layers.*.self_attn.cross_attn_kv_proj"] == plan["layers.*.self_attn.cross_attn_q_proj"] == "colwise"
    names = [name for name, _ in model.model.named_modules()]
    for pattern in plan:  # every entry names real modules
        regex = re.compile("^" + re.escape(pattern).replace(r"\*", r"\d+") + "$")
        assert any(regex.match(name) for name in names), pattern


def test_auto_classes_build_the_base_and_causal_models():
    config = tiny_config()
    assert type(AutoModel.from_config(config)) is LlavaQwenSlowFastModel
    assert type(AutoModelForCausalLM.from_config(config)).__name__ == "LlavaQwenSlowFastForCausalLM"


def test_logits_to_keep_selects_the_positions_generate_asks_for():
    from llava.model.modeling_llava_qwen_slow_fast import _keep_positions

    hidden = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    assert torch.equal(_keep_positions(hidden, 0), hidden)
    assert torch.equal(_keep_positions(hidden, 2), hidden[:, 3:])
    assert torch.equal(_keep_positions(hidden, torch.tensor([0, 4])), hidden[:, [0, 4]])
    per_sample = torch.tensor([[0, 1], [2, 4]])
    assert torch.equal(_keep_positions(hidden, per_sample), torch.stack([hidden[0, [0, 1]], hidden[1, [2, 4]]]))
    mask = torch.tensor([[True, False, False, False, True], [False, True, False, False, False]])
    assert torch.equal(_keep_positions(hidden, mask), torch.stack([hidden[0, 0], hidden[0, 4], hidden[1, 1]]))
