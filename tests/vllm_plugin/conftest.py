"""Fixtures of the vLLM tests (run in vLLM's own environment: ``.ci/lane_vllm.sh``).

The transformers side of every comparison runs in the project's main environment (``SLOWFAST_REFERENCE_PYTHON``,
default ``.venv/bin/python``) through ``tests/vllm_plugin/reference.py``: vLLM's CPU build cannot import timm. vLLM runs on
the CPU with a 1 GiB KV cache (``VLLM_CPU_KVCACHE_SPACE``) and, except where a test starts its own process, with the
engine in the test process.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
REFERENCE = REPO / "tests" / "vllm_plugin" / "reference.py"
REFERENCE_PYTHON = os.environ.get("SLOWFAST_REFERENCE_PYTHON", str(REPO / ".venv" / "bin" / "python"))
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
# Checkpoint variants: the released settings (text-only queries, tanh gate with warm-up) and the others the config
# accepts. Every variant has head size 32 and gates large enough that the slow tokens change greedy tokens.
VARIANTS = {
    "released": {},
    "vanilla_raw_warmup": {"cross_attn_implementation": "vanilla", "cross_attn_gating_type": "whole-dynamic-warmup"},
    "masksystem_own_query": {
        "cross_attn_implementation": "text-only-vanilla-masksystem-flashattn",
        "cross_attn_gating_type": "whole-dynamic",
        "cross_attn_query_source": "own",
        "slow_token_position_encoding": "fourier_spacetime",
    },
    "reference_decoding": {"cross_attn_decode_mode": "reference", "cross_attn_gating_type": "whole-dynamic-tanh"},
}


def chat_prompt(question: str, visual: bool = True) -> str:
    """The ``qwen_1_5`` prompt of one user turn, as the project's CLI builds it."""
    image = "<image>\n" if visual else ""
    return f"{SYSTEM}<|im_start|>user\n{image}{question}<|im_end|>\n<|im_start|>assistant\n"


def run_reference(spec: dict, workdir: Path, timeout: int = 900):
    """Run ``reference.py`` on ``spec`` in the main environment and return its JSON answer."""
    if not Path(REFERENCE_PYTHON).exists():
        pytest.fail(f"the main environment's python is missing: {REFERENCE_PYTHON} (set SLOWFAST_REFERENCE_PYTHON)")
    workdir.mkdir(parents=True, exist_ok=True)
    spec_file, out_file = workdir / "spec.json", workdir / "out.json"
    spec_file.write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run([REFERENCE_PYTHON, str(REFERENCE), str(spec_file), str(out_file)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    if done.returncode:
        pytest.fail(f"reference.py failed:\n{done.stderr[-4000:]}")
    return json.loads(out_file.read_text())


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vllm")


@pytest.fixture(scope="session")
def checkpoints(workdir) -> dict[str, str]:
    """Every variant of :data:`VARIANTS` written as a tiny random checkpoint (8 frames, 64 px)."""
    jobs = [{"write": {"out": str(workdir / f"ckpt-{name}"), "options": options}} for name, options in VARIANTS.items()]
    run_reference({"jobs": jobs}, workdir / "write")
    return {name: str(workdir / f"ckpt-{name}") for name in VARIANTS}


@pytest.fixture(scope="session")
def media(workdir) -> dict[str, str]:
    """Seeded frames saved as ``.npy``: videos of 8 and 4 frames (different sizes, not square) and a 48x80 image."""
    rng = np.random.default_rng(0)
    arrays = {
        "video8": rng.integers(0, 256, (8, 72, 96, 3), dtype=np.uint8),
        "video8b": rng.integers(0, 256, (8, 64, 64, 3), dtype=np.uint8),
        "video4": rng.integers(0, 256, (4, 80, 60, 3), dtype=np.uint8),
        "image": rng.integers(0, 256, (48, 80, 3), dtype=np.uint8),
    }
    paths = {}
    for name, array in arrays.items():
        paths[name] = str(workdir / f"{name}.npy")
        np.save(paths[name], array)
    return paths


# name -> request (media keys are replaced by .npy paths); max_tokens differ so that requests leave at other steps.
REQUESTS = {
    "video8": {"question": "What color is the square?", "video": "video8", "max_tokens": 12},
    "video4": {"question": "How many shapes are there?", "video": "video4", "max_tokens": 8},
    "video8b": {"question": "Which direction does it move?", "video": "video8b", "max_tokens": 3},
    "image": {"question": "Describe the picture.", "image": "image", "max_tokens": 10},
    "text": {"question": "Say something.", "max_tokens": 6},
}


def request_spec(name: str, media: dict[str, str]) -> dict:
    """The reference request ``name`` of :data:`REQUESTS`, with its media paths."""
    spec = REQUESTS[name]
    request = {"prompt": chat_prompt(spec["question"], visual="text" != name), "max_tokens": spec["max_tokens"]}
    for kind in ("video", "image"):
        if kind in spec:
            request[kind] = media[spec[kind]]
    return request


@pytest.fixture(scope="session")
def reference(checkpoints, media, workdir) -> dict:
    """The transformers model's answers: every request on every variant, plus the control (no cross-attention)."""
    names = list(REQUESTS)
    jobs = [{"checkpoint": checkpoints[v], "requests": [request_spec(n, media) for n in names]} for v in VARIANTS]
    jobs.append({"checkpoint": checkpoints["released"], "requests": [request_spec(n, media) for n in names],
                 "cross_attention": False})
    answers = run_reference({"jobs": jobs}, workdir / "reference")
    table = {v: dict(zip(names, a["results"])) for v, a in zip(VARIANTS, answers)}
    table["no_cross_attention"] = dict(zip(names, answers[-1]["results"]))
    return table


def make_llm(checkpoint: str, **kwargs):
    from vllm import LLM

    options = dict(dtype="float32", max_model_len=1024, max_num_seqs=2, enforce_eager=True, seed=0)
    options.update(kwargs)
    return LLM(model=checkpoint, **options)


def close_llm(llm) -> None:
    engine = getattr(llm, "llm_engine", None)
    core = getattr(engine, "engine_core", None)
    shutdown = getattr(core, "shutdown", None)
    if callable(shutdown):
        shutdown()
    del llm
    gc.collect()


def vllm_request(request: dict, media: dict[str, str]) -> dict:
    """The vLLM prompt of a reference request (same frames, same text)."""
    from PIL import Image

    prompt = {"prompt": request["prompt"]}
    if request.get("video"):
        prompt["multi_modal_data"] = {"video": np.load(request["video"])}
    elif request.get("image"):
        prompt["multi_modal_data"] = {"image": Image.fromarray(np.load(request["image"]))}
    return prompt


def greedy(max_tokens: int, **kwargs):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kwargs)


@pytest.fixture(scope="session")
def python_for_subprocess() -> str:
    return sys.executable
