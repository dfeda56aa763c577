"""The flash-attn cross-attention path, run on a CPU against a pure-PyTorch stand-in for flash-attn's kernel.

flash-attn has no CPU build, so ``_flash_varlen_cross_attention`` is driven here through
``hybrid_layer.flash_attn_varlen_func`` replaced by `varlen_attention` below, written from the kernel's documented
contract, with ``hybrid_layer.FLASH_DEVICE_TYPES`` widened to the CPU. The flash path runs in bfloat16 (the kernel
takes only fp16/bf16) and is compared with the SDPA path in float32 on the same, bf16-representable, inputs.
tests/test_cuda.py runs the real kernel where a GPU and flash-attn are available.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from llava.model import hybrid_layer
from llava.model.hybrid_layer import slow_cross_attention

from conftest import Spy, prompt_ids, random_video, tiny_model

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16
SCALE = HEAD_DIM**-0.5
# Outputs are convex combinations of N(0, 1) values, |x| < 4; the stand-in computes in fp32 like the kernel and
# rounds once to bf16 (relative error <= 2^-9), so 1e-2 relative covers the rounding with room, while a row
# packed with the wrong sample's keys, a padded key attended to or a misplaced row is off by O(0.1-1).
BF16 = {"rtol": 1e-2, "atol": 1e-3}


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    **unused,
) -> torch.Tensor:
    """flash-attn's ``flash_attn_varlen_func`` contract in plain PyTorch (forward and backward, no dropout).

    ``q`` ``[total_q, H, D]`` and ``k``/``v`` ``[total_k, Hkv, D]`` hold the batch's sequences one after the other;
    sample ``i`` is rows ``cu_seqlens_*[i]:cu_seqlens_*[i+1]`` (int32, from 0 to the total). Query head ``h``
    reads key/value head ``h // (H // Hkv)``. Attention is per sample; a sample with no keys gives zeros, as the
    kernel does. The arguments are checked as strictly as the kernel checks them.
    """
    if unused:
        raise TypeError(f"unexpected arguments {sorted(unused)}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3 or t.stride(-1) != 1:
            raise ValueError(f"{name} must be [total, heads, dim] with a contiguous last dimension")
        if t.dtype not in (torch.float16, torch.bfloat16) or t.dtype != q.dtype:
            raise ValueError(f"{name} is {t.dtype}: the kernel takes fp16 or bf16, the same for q, k and v")
    if k.shape != v.shape or k.shape[2] != q.shape[2] or q.shape[1] % k.shape[1]:
        raise ValueError(f"q {tuple(q.shape)} / k {tuple(k.shape)} / v {tuple(v.shape)}: heads or dims disagree")
    if dropout_p or causal:
        raise ValueError("the cross-attention must call the kernel without dropout and non-causal")
    batch = cu_seqlens_q.numel() - 1
    for name, cu, total, longest in (
        ("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q),
        ("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k),
    ):
        if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() != batch + 1 or cu.device != q.device:
            raise ValueError(
                f"{name} must be int32 [batch + 1] on the tensors' device, got {cu.dtype} {tuple(cu.shape)}"
            )
        lengths = cu.diff()
        if cu[0] != 0 or cu[-1] != total or bool((lengths < 0).any()):
            raise ValueError(f"{name}={cu.tolist()} is not a cumulative length from 0 to {total}")
        if not isinstance(longest, int) or longest < int(lengths.max()):
            raise ValueError(f"max_seqlen for {name} is {longest!r}, below the longest sequence {int(lengths.max())}")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    groups = q.shape[1] // k.shape[1]
    pieces = []
    for i in range(batch):
        qs = q[cu_seqlens_q[i] : cu_seqlens_q[i + 1]].float()
        ks = k[cu_seqlens_k[i] : cu_seqlens_k[i + 1]].float().repeat_interleave(groups, dim=1)
        vs = v[cu_seqlens_k[i] : cu_seqlens_k[i + 1]].float().repeat_interleave(groups, dim=1)
        if ks.shape[0] == 0:
            pieces.append(torch.zeros_like(qs))
            continue
        weights = torch.softmax(torch.einsum("qhd,khd->hqk", qs, ks) * scale, dim=-1)
        pieces.append(torch.einsum("hqk,khd->qhd", weights, vs))
    return torch.cat(pieces).to(q.dtype)


@pytest.fixture
def kernel(monkeypatch) -> Spy:
    """Installs `varlen_attention` as flash-attn's kernel and lets it run on the CPU; records its calls."""
    spy = Spy(varlen_attention)
    monkeypatch.setattr(hybrid_layer, "flash_attn_varlen_func", spy)
    monkeypatch.setattr(hybrid_layer, "FLASH_DEVICE_TYPES", ("cuda", "cpu"))
    return spy


def attention_inputs(batch: int, length: int, slow: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """bf16 query ``[B, H, L, D]`` and keys/values ``[B, Hkv, S, D]``."""
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, HEADS, length, HEAD_DIM, generator=generator)
    keys = torch.randn(batch, KV_HEADS, slow, HEAD_DIM, generator=generator)
    values = torch.randn(batch, KV_HEADS, slow, HEAD_DIM, generator=generator)
    return query.bfloat16(), keys.bfloat16(), values.bfloat16()


def slow_lengths_mask(lengths: list[int], slow: int) -> torch.Tensor:
    """``[B, S]`` valid slow tokens, each sample's first ``lengths[b]`` (padded at the end, as the model pads)."""
    return torch.arange(slow)[None, :] < torch.tensor(lengths)[:, None]


def flash_and_sdpa(query, keys, values, key_mask, query_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """The flash path in bf16 and the SDPA path in fp32, ``[B, L, H*D]`` each."""
    flash = slow_cross_attention(query, keys, values, key_mask, query_mask, SCALE, use_flash=True)
    sdpa = slow_cross_attention(query.float(), keys.float(), values.float(), key_mask, query_mask, SCALE)
    return flash, sdpa


def test_flash_path_matches_sdpa_on_ragged_query_rows_and_slow_lengths(kernel):
    query, keys, values = attention_inputs(batch=3, length=7, slow=9)
    key_mask = slow_lengths_mask([9, 4, 6], 9)
    query_mask = torch.tensor(
        [
            [False, True, True, True, True, True, True],
            [False, False, False, True, False, True, False],  # querying rows need not be contiguous
            [True, False, False, False, False, False, False],
        ]
    )
    flash, sdpa = flash_and_sdpa(query, keys, values, key_mask, query_mask)
    assert len(kernel.calls) == 1
    args = kernel.calls[0][0]
    assert args[3].tolist() == [0, 6, 8, 9] and args[4].tolist() == [0, 9, 13, 19]
    torch.testing.assert_close(flash[query_mask].float(), sdpa[query_mask], **BF16)
    assert bool((flash[~query_mask] == 0).all())


def test_flash_path_ignores_padded_slow_tokens(kernel):
    query, keys, values = attention_inputs(batch=2, length=5, slow=8, seed=1)
    key_mask = slow_lengths_mask([3, 8], 8)
    query_mask = torch.ones(2, 5, dtype=torch.bool)
    before = slow_cross_attention(query, keys, values, key_mask, query_mask, SCALE, use_flash=True)
    keys[0, :, 3:], values[0, :, 3:] = 50.0, -50.0  # padding whose every value would show if it were read
    flash, sdpa = flash_and_sdpa(query, keys, values, key_mask, query_mask)
    assert torch.equal(flash, before)
    torch.testing.assert_close(flash.float(), sdpa, **BF16)


@pytest.mark.parametrize("queries", ["as_the_model_asks", "every_row"])
def test_flash_path_gives_zero_rows_for_a_sample_without_slow_tokens(kernel, queries):
    query, keys, values = attention_inputs(batch=3, length=6, slow=5, seed=2)
    key_mask = slow_lengths_mask([5, 0, 2], 5)  # the middle sample has no video
    query_mask = torch.ones(3, 6, dtype=torch.bool)
    if queries == "as_the_model_asks":
        query_mask[1] = False  # cross_attn_query_mask: a sample without visual tokens never queries
    flash, sdpa = flash_and_sdpa(query, keys, values, key_mask, query_mask)
    assert bool(flash.isfinite().all())
    assert bool((flash[1] == 0).all())
    assert kernel.calls[0][0][3].tolist() == [0, 6, 6, 12]  # its rows are not handed to the kernel
    torch.testing.assert_close(flash[[0, 2]].float(), sdpa[[0, 2]], **BF16)


def test_flash_path_matches_sdpa_in_a_single_row_decode_step(kernel):
    query, keys, values = attention_inputs(batch=3, length=1, slow=7, seed=3)
    key_mask = slow_lengths_mask([7, 0, 3], 7)
    query_mask = key_mask.any(1, keepdim=True).expand(-1, 1)  # what the model passes while decoding
    flash, sdpa = flash_and_sdpa(query, keys, values, key_mask, query_mask)
    args = kernel.calls[0][0]
    assert args[3].tolist() == [0, 1, 1, 2] and args[5] == 1
    torch.testing.assert_close(flash[query_mask].float(), sdpa[query_mask], **BF16)
    assert bool((flash[1] == 0).all())


def test_flash_path_gradients_match_sdpa(kernel):
    query, keys, values = attention_inputs(batch=2, length=4, slow=6, seed=4)
    key_mask = slow_lengths_mask([6, 2], 6)
    query_mask = torch.tensor([[False, True, True, False], [True, True, True, True]])
    weights = torch.randn(2, 4, HEADS * HEAD_DIM, generator=torch.Generator().manual_seed(5))

    def gradients(use_flash: bool, dtype: torch.dtype) -> list[torch.Tensor]:
        leaves = [t.detach().to(dtype).clone().requires_grad_() for t in (query, keys, values)]
        out = slow_cross_attention(*leaves, key_mask, query_mask, SCALE, use_flash=use_flash)
        (out.float()[query_mask] * weights[query_mask]).sum().backward()
        return [t.grad.float() for t in leaves]

    for flash, sdpa in zip(gradients(True, torch.bfloat16), gradients(False, torch.float32)):
        torch.testing.assert_close(flash, sdpa, rtol=2e-2, atol=2e-2)  # gradients are sums of several bf16 terms
    assert len(kernel.calls) == 1


def test_float32_query_uses_sdpa_not_the_half_precision_kernel(kernel):
    query, keys, values = (t.float() for t in attention_inputs(batch=1, length=3, slow=4))
    mask = torch.ones(1, 3, dtype=torch.bool)
    out = slow_cross_attention(query, keys, values, torch.ones(1, 4, dtype=torch.bool), mask, SCALE, use_flash=True)
    assert not kernel.calls and bool(out.isfinite().all())


def test_flash_kernel_is_used_only_for_half_precision_on_cuda_when_installed(monkeypatch):
    def accepts(device: str, dtype: torch.dtype) -> bool:
        # the decision reads only the device type and dtype, so no CUDA tensor is needed to ask about CUDA
        return hybrid_layer.flash_kernel_accepts(types.SimpleNamespace(device=torch.device(device), dtype=dtype))

    monkeypatch.setattr(hybrid_layer, "flash_attn_varlen_func", varlen_attention)
    assert accepts("cuda", torch.bfloat16) and accepts("cuda", torch.float16)
    assert not accepts("cuda", torch.float32) and not accepts("cpu", torch.bfloat16)
    monkeypatch.setattr(hybrid_layer, "flash_attn_varlen_func", None)
    assert not accepts("cuda", torch.bfloat16)


def test_flash_path_is_not_taken_without_use_flash_or_without_querying_rows(kernel):
    query, keys, values = attention_inputs(batch=2, length=3, slow=4)
    key_mask = torch.ones(2, 4, dtype=torch.bool)
    slow_cross_attention(query, keys, values, key_mask, torch.ones(2, 3, dtype=torch.bool), SCALE)
    none = slow_cross_attention(
        query, keys, values, key_mask, torch.zeros(2, 3, dtype=torch.bool), SCALE, use_flash=True
    )
    assert not kernel.calls and bool(none.isfinite().all())


def test_flash_import_gives_the_varlen_function_when_flash_attn_loads(monkeypatch):
    module = types.ModuleType("flash_attn")
    module.flash_attn_varlen_func = varlen_attention
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    assert hybrid_layer._import_flash_varlen() is varlen_attention


def test_flash_import_gives_none_when_flash_attn_does_not_load(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # what a missing or broken install raises: ImportError
    assert hybrid_layer._import_flash_varlen() is None


def test_model_with_flash_attention_2_sends_cross_attention_to_the_kernel_and_matches_sdpa(kernel, monkeypatch):
    # flash-attn's self-attention has no CPU build either; for one unpadded sample transformers gives it no mask
    # (causal from the shapes), which SDPA reads the same way, so SDPA stands in for it here.
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "flash_attention_2", sdpa_attention_forward)
    model = tiny_model().to(torch.bfloat16)
    ids, video = prompt_ids(3, 5), random_video(4).bfloat16()

    def run(implementation: str) -> tuple[torch.Tensor, torch.Tensor]:
        model.config._attn_implementation = implementation
        with torch.no_grad():
            logits = model(input_ids=ids, images=[video]).logits.float()
        return logits, model.generate(ids, images=[video], max_new_tokens=4, do_sample=False)

    sdpa_logits, sdpa_tokens = run("sdpa")
    assert not kernel.calls
    flash_logits, flash_tokens = run("flash_attention_2")
    # two hybrid layers, each called for the forward, the generation's prefill and its 3 decode steps
    assert len(kernel.calls) == 2 * (1 + 1 + 3)
    assert all(call[0][0].shape[0] == 1 for call in kernel.calls[4:])  # a decode step packs one row
    # bf16 logits here are below 3 in size (one ulp: 0.016) and differ by 1.5 ulps at most; the slow path moves
    # them by 1.9
    torch.testing.assert_close(flash_logits, sdpa_logits, rtol=0, atol=5e-2)
    assert flash_tokens.tolist() == sdpa_tokens.tolist()
