"""Checks that need a CUDA GPU: the reference fixture in fp32/bf16/fp16 on CUDA, and flash-attn against SDPA.

Every test here is marked ``cuda`` and skipped without a GPU (flash-attn tests also without flash-attn);
scripts/check_gpu.sh runs them. The ground truth is the model in float32 on the CPU, which meets the fixture's
own tolerances (tests/test_reference_parity.py).

Tolerances in half precision. The unit roundoff is u = 2^-8 for bfloat16 and 2^-11 for float16, and the fixture's
logits lie within |x| <= L = 2.52. The logits come out of a ConvNeXt tower, a projector and four decoder layers,
each rounding its activations, so errors of a few u*L are expected: on the CPU, bf16 is off by 0.032 at most
(3.3 u*L) and 0.006 on average, fp16 by 0.0048 (3.9 u*L) and 0.0009. We allow 10 u*L at most and 2 u*L on
average (bf16: 0.098 and 0.020; fp16: 0.012 and 0.0025), about three times what the CPU shows, and still ten
times below what a broken slow path does (closing the gates moves the logits by up to 1.1). Greedy decoding is
checked step by step: each step's logits within the same bound, and the same token unless fp32 puts the two
tokens closer than twice that step's measured logit error (each logit may have moved by that much; the fixture's
fp32 margins are as small as 0.003, so a flip can be legitimate). After a legitimate flip the runs continue from
different prefixes and are not compared further.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from safetensors.torch import load_file

from llava.model import LlavaQwenSlowFastForCausalLM, hybrid_layer
from llava.model.hybrid_layer import slow_cross_attention

from conftest import Spy, prompt_ids, random_video, tiny_model
from test_flash_varlen import varlen_attention

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/check_gpu.sh runs these)"),
]
needs_flash = pytest.mark.skipif(  # without a GPU the reason given is the GPU's
    torch.cuda.is_available() and hybrid_layer.flash_attn_varlen_func is None,
    reason="flash-attn is not installed (pip install -e '.[gpu]')",
)

LOGIT_RANGE = 2.52  # max |logit| of the fixture's valid positions
ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
HALF = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]
STEPS = 6


def max_error(dtype: torch.dtype) -> float:
    return 10 * ROUNDOFF[dtype] * LOGIT_RANGE


def mean_error(dtype: torch.dtype) -> float:
    return 2 * ROUNDOFF[dtype] * LOGIT_RANGE


@pytest.fixture
def exact_float32() -> Iterator[None]:
    """No TF32 (10-bit mantissa) in fp32 matmuls and convolutions, which cuDNN allows by default."""
    if hasattr(torch.backends.cudnn, "conv"):  # torch >= 2.9; mixing it with the allow_tf32 flags is refused
        settings = [(torch.backends.cuda.matmul, "fp32_precision"), (torch.backends.cudnn.conv, "fp32_precision")]
        exact = "ieee"
    else:
        settings = [(torch.backends.cuda.matmul, "allow_tf32"), (torch.backends.cudnn, "allow_tf32")]
        exact = False
    saved = [getattr(owner, name) for owner, name in settings]
    for owner, name in settings:
        setattr(owner, name, exact)
    yield
    for (owner, name), value in zip(settings, saved):
        setattr(owner, name, value)


@pytest.fixture(scope="module")
def inputs(fixture_dir) -> dict[str, torch.Tensor]:
    return load_file(str(fixture_dir / "inputs.safetensors"))


@pytest.fixture(scope="module")
def expected(fixture_dir) -> dict[str, torch.Tensor]:
    return load_file(str(fixture_dir / "expected.safetensors"))


def load(fixture_dir, device: str, dtype: torch.dtype, attn: str = "sdpa") -> LlavaQwenSlowFastForCausalLM:
    model = LlavaQwenSlowFastForCausalLM.from_pretrained(
        str(fixture_dir / "checkpoint"), dtype=dtype, attn_implementation=attn, device_map={"": device}
    )
    return model.eval()


@pytest.fixture(scope="module")
def cpu_model(fixture_dir) -> LlavaQwenSlowFastForCausalLM:
    return load(fixture_dir, "cpu", torch.float32)


def forward(model, inputs) -> tuple[torch.Tensor, float]:
    """Logits ``[2, 26, vocab]`` (float32, CPU) and the loss of the fixture's batch."""
    device, dtype = model.device, model.dtype
    with torch.no_grad():
        out = model(
            input_ids=inputs["input_ids"].to(device),
            attention_mask=inputs["attention_mask"].to(device),
            labels=inputs["labels"].to(device),
            images=[inputs["pixel_values_0"].to(device, dtype), inputs["pixel_values_1"].to(device, dtype)],
        )
    return out.logits.float().cpu(), out.loss.item()


def greedy(model, inputs, decode_mode: str) -> tuple[list[int], torch.Tensor]:
    """The first sample's greedy tokens and the logits ``[STEPS, vocab]`` each was chosen from."""
    model.config.cross_attn_decode_mode = decode_mode
    try:
        out = model.generate(
            inputs["prompt_ids_0"][None].to(model.device),
            images=[inputs["pixel_values_0"].to(model.device, model.dtype)],
            max_new_tokens=STEPS,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    finally:
        model.config.cross_attn_decode_mode = "attend"
    return out.sequences[0].tolist(), torch.stack(out.logits, 1)[0].float().cpu()


def assert_close_to_fp32(logits: torch.Tensor, loss: float, reference: tuple[torch.Tensor, float], valid, dtype):
    error = (logits[valid] - reference[0][valid]).abs()
    assert error.max().item() <= max_error(dtype), f"max |logit error| {error.max().item():.4f} ({dtype})"
    assert error.mean().item() <= mean_error(dtype), f"mean |logit error| {error.mean().item():.5f} ({dtype})"
    assert abs(loss - reference[1]) <= max_error(dtype) / 5, f"loss {loss:.5f} vs fp32 {reference[1]:.5f}"


def assert_greedy_agrees(run: tuple[list[int], torch.Tensor], reference: tuple[list[int], torch.Tensor], dtype) -> None:
    """Greedy ``run`` against the fp32 ``reference`` (tokens, per-step logits), step by step while they agree."""
    (tokens, logits), (ref_tokens, ref_logits) = run, reference
    for step, (got, want) in enumerate(zip(tokens, ref_tokens)):
        error = (logits[step] - ref_logits[step]).abs().max().item()
        assert error <= max_error(dtype), f"step {step}: max |logit error| {error:.4f} ({dtype})"
        if got != want:
            gap = (ref_logits[step, want] - ref_logits[step, got]).item()
            assert gap <= 2 * error, (
                f"step {step}: token {got} instead of fp32's {want}, whose logit is {gap:.4f} higher: more than "
                f"twice this step's logit error {error:.4f} can explain"
            )
            return  # the two runs now continue different prefixes
    assert len(tokens) == len(ref_tokens)


# -- SDPA on CUDA --------------------------------------------------------------------------------------------------


def test_float32_on_cuda_meets_the_fixture_tolerances(fixture_dir, inputs, expected, exact_float32):
    model = load(fixture_dir, "cuda", torch.float32)
    logits, loss = forward(model, inputs)
    valid = expected["valid_mask"].bool()
    assert (logits[valid] - expected["logits"][valid]).abs().max().item() <= 1e-4
    assert abs(loss - expected["loss"].item()) <= 1e-5
    assert greedy(model, inputs, "reference")[0] == expected["greedy_tokens_0"].tolist()


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_forward_on_cuda_is_within_rounding_of_cpu_float32(
    fixture_dir, inputs, expected, cpu_model, dtype
):
    model = load(fixture_dir, "cuda", dtype)
    assert_close_to_fp32(*forward(model, inputs), forward(cpu_model, inputs), expected["valid_mask"].bool(), dtype)


@pytest.mark.parametrize("decode_mode", ["attend", "reference"])
@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_greedy_tokens_on_cuda_match_cpu_float32_where_the_margin_allows(
    fixture_dir, inputs, cpu_model, dtype, decode_mode
):
    model = load(fixture_dir, "cuda", dtype)
    assert_greedy_agrees(greedy(model, inputs, decode_mode), greedy(cpu_model, inputs, decode_mode), dtype)


def test_padded_batch_generation_on_cuda_matches_each_sample_alone(exact_float32):
    model = tiny_model().cuda()
    prompts = [prompt_ids(4, 6, seed=1)[0], prompt_ids(2, 9, seed=2)[0]]
    videos = [random_video(8, seed=1).cuda(), random_video(4, seed=2).cuda()]
    alone = [
        model.generate(p[None].cuda(), images=[v], max_new_tokens=6, do_sample=False)[0]
        for p, v in zip(prompts, videos)
    ]
    ids = torch.zeros(2, max(len(p) for p in prompts), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, : len(p)], mask[b, : len(p)] = p, 1
    batched = model.generate(ids.cuda(), attention_mask=mask.cuda(), images=videos, max_new_tokens=6, do_sample=False)
    assert batched.tolist() == [a.tolist() for a in alone]


# -- flash-attn on CUDA --------------------------------------------------------------------------------------------


@pytest.fixture
def real_kernel(monkeypatch) -> Iterator[Spy]:
    spy = Spy(hybrid_layer.flash_attn_varlen_func)
    monkeypatch.setattr(hybrid_layer, "flash_attn_varlen_func", spy)
    yield spy


def ragged_case(case: str, dtype: torch.dtype, seed: int = 0):
    """query ``[B, 4, L, 64]``, keys/values ``[B, 2, S, 64]`` on CUDA, and the key and query masks."""
    generator = torch.Generator().manual_seed(seed)
    lengths = {"ragged": [300, 17, 120], "decode": [300, 0, 45], "no_video": [0, 64, 0]}[case]
    batch, length, slow = 3, (1 if case == "decode" else 40), 300
    query = torch.randn(batch, 4, length, 64, generator=generator)
    keys, values = torch.randn(2, batch, 2, slow, 64, generator=generator)
    key_mask = torch.arange(slow)[None, :] < torch.tensor(lengths)[:, None]
    if case == "ragged":
        query_mask = torch.rand(batch, length, generator=generator) < torch.tensor([[0.9], [0.3], [0.05]])
    else:
        query_mask = key_mask.any(1, keepdim=True).expand(-1, length)
    return [t.to("cuda", dtype) for t in (query, keys, values)], key_mask.cuda(), query_mask.cuda()


@needs_flash
@pytest.mark.parametrize("case", ["ragged", "decode", "no_video"])
@pytest.mark.parametrize("dtype", HALF)
def test_flash_cross_attention_matches_sdpa_on_cuda(real_kernel, dtype, case):
    (query, keys, values), key_mask, query_mask = ragged_case(case, dtype)
    flash = slow_cross_attention(query, keys, values, key_mask, query_mask, 0.125, use_flash=True)
    sdpa = slow_cross_attention(query.float(), keys.float(), values.float(), key_mask, query_mask, 0.125)
    assert len(real_kernel.calls) == 1
    # flash-attn accumulates in fp32 but rounds the softmax weights to half precision before weighting the values
    # (|error| <= u * sum p|v|) and rounds the output once; emulated on a CPU for these shapes the error stays
    # within 4u relative plus 0.6u absolute, so 4u + 2u leaves room while a misplaced row is off by O(0.1-1).
    u = ROUNDOFF[dtype]
    torch.testing.assert_close(flash[query_mask].float(), sdpa[query_mask], rtol=4 * u, atol=2 * u)
    assert bool(flash.isfinite().all()) and bool((flash[~query_mask] == 0).all())


@needs_flash
def test_cpu_stand_in_reproduces_the_real_kernel():
    generator = torch.Generator().manual_seed(1)
    q, k, v = (
        torch.randn(n, h, 64, generator=generator).to("cuda", torch.bfloat16) for n, h in ((9, 4), (7, 2), (7, 2))
    )
    cu_q = torch.tensor([0, 4, 6, 9], dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([0, 5, 5, 7], dtype=torch.int32, device="cuda")  # the second sample has no keys
    real = hybrid_layer.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 4, 5, softmax_scale=0.125, causal=False)
    torch.testing.assert_close(
        real, varlen_attention(q, k, v, cu_q, cu_k, 4, 5, softmax_scale=0.125), rtol=2e-2, atol=2e-2
    )
    assert bool((real[4:6] == 0).all())


@needs_flash
@pytest.mark.parametrize("dtype", HALF)
def test_whole_model_with_flash_attention_2_is_within_rounding_of_cpu_float32(
    fixture_dir, inputs, expected, cpu_model, real_kernel, dtype
):
    model = load(fixture_dir, "cuda", dtype, attn="flash_attention_2")
    assert model.config._attn_implementation == "flash_attention_2"
    assert_close_to_fp32(*forward(model, inputs), forward(cpu_model, inputs), expected["valid_mask"].bool(), dtype)
    assert len(real_kernel.calls) == len(model.hybrid_layers)
    tokens, logits = greedy(model, inputs, "attend")
    assert_greedy_agrees((tokens, logits), greedy(cpu_model, inputs, "attend"), dtype)
    # the forward, the prompt and every decode step (the last token needs no step; an early EOS stops sooner)
    assert len(real_kernel.calls) == len(model.hybrid_layers) * (1 + len(tokens))
