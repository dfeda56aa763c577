"""transformers' common model-test behaviours, in every configuration option that adds or removes modules.

transformers runs its common model tests (``tests/test_modeling_common.py``, not shipped in the wheel) over one
configuration per model; here the behaviours that depend on which modules exist run over each option that changes
them: the tensor-parallel plan names only modules that exist and covers every hybrid projection, saving and
loading keeps every weight, tuples equal the output dicts, and every trainable parameter gets a gradient.
"""

from __future__ import annotations

import re

import pytest
import torch

from llava.model import LlavaQwenSlowFastForCausalLM, LlavaQwenSlowFastModel
from llava.model.hybrid_layer import SlowFastAttention

from conftest import prompt_ids, random_video, tiny_config, tiny_model

# Each option that adds or removes modules (or parameters) against the tiny default configuration.
CONFIGURATIONS = {
    "default": {},
    "own_query": {"cross_attn_query_source": "own"},  # adds cross_attn_q_proj
    "no_hybrid_layers": {"cross_attn_max_layer_depth": 0},  # no cross_attn_* module at all
    "every_layer_hybrid": {"cross_attn_every_n_layers": 1},
    "no_warm_up_gate": {"cross_attn_gating_type": "whole-dynamic-tanh"},  # no cross_attn_warm_up_gate
    "slow_positions": {"slow_token_position_encoding": "fourier_spacetime"},  # adds slow_token_position_encoding
    "linear_projector": {"mm_projector_type": "linear"},
    "text_only": {"mm_vision_tower": None},  # no vision tower, projector or slow tokens
    "tied_embeddings": {"tie_word_embeddings": True},  # lm_head shares embed_tokens' weight
}
PARAMS = [pytest.param(overrides, id=name) for name, overrides in CONFIGURATIONS.items()]


def plan_of(model) -> dict[str, str]:
    """The model's full tensor-parallel plan (``tp_plan`` from transformers 5.2x; ``_tp_plan`` before)."""
    plan = getattr(model, "tp_plan", None)
    return dict(plan if plan is not None else model._tp_plan)


def pattern_regex(pattern: str) -> re.Pattern:
    """A plan entry (``layers.*.self_attn.q_proj``) as a regex over module names: ``*`` stands for one name part."""
    return re.compile("^" + re.escape(pattern).replace(r"\*", r"[^.]+") + "$")


def named_targets(model) -> set[str]:
    """Every module name and every parameter's module name: what a plan entry may name."""
    names = {name for name, _ in model.named_modules() if name}
    return names | {name.rsplit(".", 1)[0] for name, _ in model.named_parameters()}


def build(model_class, overrides: dict):
    torch.manual_seed(0)
    return model_class(tiny_config(**overrides)).eval()


def inputs_for(overrides: dict) -> dict:
    if overrides.get("mm_vision_tower", "convnext-576") is None:
        return {"input_ids": torch.tensor([[5, 6, 7, 8, 9, 10]])}
    return {"input_ids": prompt_ids(4, 6), "images": [random_video(8)]}


@pytest.mark.parametrize("model_class", [LlavaQwenSlowFastModel, LlavaQwenSlowFastForCausalLM])
@pytest.mark.parametrize("overrides", PARAMS)
def test_tp_plan_matches_params(overrides, model_class):
    model = build(model_class, overrides)
    plan = plan_of(model)
    assert plan, f"{model_class.__name__} has no tensor-parallel plan"
    targets = named_targets(model)
    unused = [pattern for pattern in plan if not any(pattern_regex(pattern).match(name) for name in targets)]
    assert not unused, f"plan entries that name no module of this configuration: {unused}"


@pytest.mark.parametrize("overrides", PARAMS)
def test_tp_plan_covers_every_projection_of_the_hybrid_layers(overrides):
    model = build(LlavaQwenSlowFastForCausalLM, overrides)
    plan = [pattern_regex(p) for p in plan_of(model)]
    hybrid = [
        f"{name}.{child}"
        for name, module in model.named_modules()
        if isinstance(module, SlowFastAttention)
        for child, sub in module.named_modules()
        if child.startswith("cross_attn_") and isinstance(sub, torch.nn.Linear)
    ]
    assert len(hybrid) == len(model.hybrid_layers) * (2 + (overrides.get("cross_attn_query_source") == "own"))
    # an unsharded cross-attention projection next to sharded heads would compute with the wrong widths
    missing = [name for name in hybrid if not any(regex.match(name) for regex in plan)]
    assert not missing, missing


@pytest.mark.parametrize("overrides", PARAMS)
def test_save_and_load_keep_every_weight_and_the_outputs(overrides, tmp_path):
    model = tiny_model(**overrides)
    model.save_pretrained(tmp_path)
    loaded, info = LlavaQwenSlowFastForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    for (name, saved), (_, restored) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(saved, restored), name
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(**inputs_for(overrides)).logits, model(**inputs_for(overrides)).logits)


@pytest.mark.parametrize("overrides", PARAMS)
def test_tuple_outputs_equal_the_output_dict(overrides):
    model = tiny_model(**overrides)
    batch = inputs_for(overrides)
    labels = batch["input_ids"].clamp(min=-100).masked_fill(batch["input_ids"] < 0, -100)
    with torch.no_grad():
        as_dict = model(**batch, labels=labels, output_hidden_states=True)
        as_tuple = model(**batch, labels=labels, output_hidden_states=True, return_dict=False)
    expected = [value for value in as_dict.to_tuple()]
    assert len(as_tuple) == len(expected)
    for got, want in zip(as_tuple, expected):
        if isinstance(want, torch.Tensor):
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize("overrides", PARAMS)
def test_training_reaches_every_trainable_parameter(overrides):
    model = tiny_model(**overrides).train()
    batch = inputs_for(overrides)
    labels = batch["input_ids"].masked_fill(batch["input_ids"] < 0, -100)
    model(**batch, labels=labels, use_cache=False).loss.backward()
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    if overrides.get("mm_vision_tower", "convnext-576") is None:
        # without a vision tower there are no slow tokens for the hybrid layers' cross-attention to read
        missing = [name for name in missing if ".self_attn.cross_attn_" not in name]
    assert not missing, missing


def test_plan_entries_set_on_the_configuration_are_kept_and_the_hybrid_ones_follow_it():
    config = tiny_config()
    # what transformers 5.16-5.19 do for tied embeddings, in the configuration's __post_init__
    config.base_model_tp_plan = {**config.base_model_tp_plan, "embed_tokens": "embedding_rowwise"}
    config.cross_attn_query_source = "own"
    plan = config.base_model_tp_plan
    assert plan["embed_tokens"] == "embedding_rowwise"
    assert plan["layers.*.self_attn.cross_attn_q_proj"] == "colwise"
    config.cross_attn_max_layer_depth = 0  # no hybrid layer left
    assert not [key for key in config.base_model_tp_plan if "cross_attn" in key]
    assert "base_model_tp_plan" not in config.to_dict()
