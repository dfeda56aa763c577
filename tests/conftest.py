"""Shared fixtures: the reference fixture's paths and tiny random Slow-Fast models built in memory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from llava.model import LlavaQwenSlowFastConfig, LlavaQwenSlowFastForCausalLM
from llava.serve import cli

# With SLOWFAST_NO_SKIPS=1 (set by .ci/run) any skip outside the cuda marker fails; pytester tests the plugin.
pytest_plugins = ["strict_skips", "pytester"]

REPO = Path(__file__).resolve().parents[1]
# The reference fixture ships with the tests; SLOWFAST_FIXTURE may point at another copy.
FIXTURE = Path(os.environ.get("SLOWFAST_FIXTURE", REPO / "tests" / "fixtures" / "reference_tiny"))


def tiny_config(**overrides) -> LlavaQwenSlowFastConfig:
    """A 4-layer Qwen2 (hidden 64, 4 heads, 2 kv heads) with a 128 px ConvNeXt: 4x4 tokens per frame."""
    fields = dict(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        mm_vision_tower_overrides={"depths": [1, 1, 1, 1], "dims": [8, 16, 24, 32], "image_size": 128},
        cross_attn_every_n_layers=2,
        cross_attn_max_layer_depth=4,
        fast_token_temporal_stride=4,
        min_fast_frames=1,
        initializer_range=0.1,  # large enough that the slow path changes greedy tokens
    )
    fields.update(overrides)
    return LlavaQwenSlowFastConfig(**fields)


def tiny_model(seed: int = 0, warm_up_gate: float = 0.7, **overrides) -> LlavaQwenSlowFastForCausalLM:
    """A random tiny model in eval mode whose warm-up gates are non-zero, so the slow path matters."""
    torch.manual_seed(seed)
    model = LlavaQwenSlowFastForCausalLM(tiny_config(**overrides)).eval()
    with torch.no_grad():
        for layer in model.hybrid_layers:
            if layer.self_attn.cross_attn_warm_up_gate is not None:
                layer.self_attn.cross_attn_warm_up_gate.fill_(warm_up_gate)
            # a larger gate projection makes the gate differ visibly between positions
            layer.self_attn.cross_attn_gate_proj[0].weight.normal_(0, 0.5)
    return model


def random_video(frames: int, seed: int = 0, size: int = 128) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(frames, 3, size, size, generator=generator)


def prompt_ids(length_before: int, length_after: int, seed: int = 0, vocab: int = 300) -> torch.Tensor:
    """``[1, L]`` ids with one ``-200`` after ``length_before`` text tokens."""
    generator = torch.Generator().manual_seed(seed)
    before = torch.randint(1, vocab, (length_before,), generator=generator)
    after = torch.randint(1, vocab, (length_after,), generator=generator)
    return torch.cat([before, torch.tensor([-200]), after])[None]


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    if not FIXTURE.is_dir():
        pytest.fail(f"reference fixture not found at {FIXTURE} (set SLOWFAST_FIXTURE)")
    return FIXTURE


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    """A tiny Slow-Fast checkpoint on disk, written by ``llava.model.tiny``."""
    from llava.model.tiny import TinySpec, write_tiny_checkpoint

    return write_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny") / "ckpt"), TinySpec())


class Spy:
    """Wraps a function and records each call's arguments and return value."""

    def __init__(self, function):
        self.function = function
        self.calls: list[tuple[tuple, dict]] = []
        self.results: list = []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        result = self.function(*args, **kwargs)
        self.results.append(result)
        return result


@pytest.fixture
def encode_spy(monkeypatch) -> Spy:
    spy = Spy(LlavaQwenSlowFastForCausalLM.encode_images)
    monkeypatch.setattr(LlavaQwenSlowFastForCausalLM, "encode_images", lambda self, images: spy(self, images))
    return spy


@pytest.fixture
def ask_spy(monkeypatch) -> Spy:
    spy = Spy(cli.ChatSession.ask)
    monkeypatch.setattr(cli.ChatSession, "ask", lambda self, *a, **kw: spy(self, *a, **kw))
    return spy


@pytest.fixture(scope="session", autouse=True)
def data_cache(tmp_path_factory) -> Path:
    """The annotation stores the tests build (llava.train.store) go to a temporary folder, not the user's cache;
    the training runs the tests start in subprocesses inherit it."""
    path = tmp_path_factory.mktemp("data-cache")
    previous = os.environ.get("SLOWFAST_DATA_CACHE")
    os.environ["SLOWFAST_DATA_CACHE"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("SLOWFAST_DATA_CACHE", None)
    else:
        os.environ["SLOWFAST_DATA_CACHE"] = previous
