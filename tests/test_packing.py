"""Packed rows (llava.model.packing, llava.train.collators.PackedDataCollator): several samples per row, each computed
exactly as when it is alone.

The samples mix videos of 8 and 4 frames, an image and text-only conversations. Tolerances: float32 on the CPU;
a packed row runs the same operations as the samples alone on differently shaped tensors, so results differ only
by summation order: per-sample losses within 1e-5 relative, gradients within 1e-4 relative (1e-6 absolute),
where a wrong mask, position or slow token changes the losses by 1e-2 or more (each test checks that its
contrast case does)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from llava.constants import IGNORE_INDEX, TOKEN_TYPE_VISUAL
from llava.model import hybrid_layer
from llava.model.hybrid_layer import packed_cross_attention
from llava.model.packing import SlowSegments, prepare_packed_inputs
from llava.model.slow_fast import SlowFastParams, count_visual_tokens
from llava.train.collators import DataCollatorForSupervisedDataset, PackedDataCollator

from conftest import Spy, prompt_ids, random_video, tiny_model  # noqa: F401
from test_flash_varlen import kernel  # noqa: F401  (the fixture: the stand-in for flash-attn's kernel)

PAD = SimpleNamespace(pad_token_id=0)
LOSS = {"rtol": 1e-5, "atol": 1e-6}
GRAD = {"rtol": 1e-4, "atol": 1e-6}


def make_item(model, before: int, after: int, frames: int, seed: int, supervised: int = 5) -> dict:
    """A dataset item: text with a ``-200`` after ``before`` tokens and a video of ``frames`` frames (an image for
    1), or ``before + after`` text tokens only (``frames`` 0); the last ``supervised`` tokens are labelled."""
    if frames:
        ids, pixels = prompt_ids(before, after, seed=seed)[0], random_video(frames, seed=seed)
    else:
        ids, pixels = torch.randint(1, 300, (before + after,), generator=torch.Generator().manual_seed(seed)), None
    labels = ids.clone()
    labels[:-supervised] = IGNORE_INDEX
    positions = len(ids)
    if frames:
        grid = model.get_vision_tower().spec.image_size // 32
        positions += count_visual_tokens(frames, grid, SlowFastParams.from_config(model.config))[0] - 1
    return {"input_ids": ids, "labels": labels, "pixel_values": pixels, "num_positions": positions}


def mixed_items(model) -> list[dict]:
    return [
        make_item(model, 4, 9, 8, seed=1),
        make_item(model, 3, 6, 0, seed=2),
        make_item(model, 5, 7, 1, seed=3),  # an image
        make_item(model, 2, 11, 4, seed=4),
        make_item(model, 6, 3, 0, seed=5, supervised=2),
    ]


def alone_loss(model, item: dict) -> torch.Tensor:
    images = [item["pixel_values"]] if item["pixel_values"] is not None else None
    return model(input_ids=item["input_ids"][None], labels=item["labels"][None], images=images).loss


def sample_order(batch: dict, items: list[dict]) -> list[int]:
    """The item behind each sample number ``1..n`` of a packed batch."""
    order = []
    for number in range(1, int(batch["packed_sample_ids"].max()) + 1):
        ids = batch["input_ids"][batch["packed_sample_ids"] == number]
        order.append(next(k for k, item in enumerate(items) if torch.equal(item["input_ids"], ids)))
    return order


def packed_losses(model, batch: dict, items: list[dict]) -> list[torch.Tensor]:
    """Each item's mean token loss, read from one forward of the packed batch."""
    with torch.no_grad():
        packed = prepare_packed_inputs(model, batch["input_ids"], batch["packed_sample_ids"], batch["labels"], batch["images"])
    logits = model(**batch).logits
    labels, owners = packed.labels[:, 1:], packed.sample_ids[:, 1:]
    if logits.shape[:2] != packed.labels.shape:
        raise AssertionError(f"logits {tuple(logits.shape)} do not follow the packed layout {tuple(packed.labels.shape)}")
    token_loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
    losses = [None] * len(items)
    for number, k in enumerate(sample_order(batch, items), start=1):
        chosen = (owners == number) & (labels != IGNORE_INDEX)
        losses[k] = token_loss[chosen].mean()
    return losses


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"cross_attn_implementation": "text-only-vanilla-masksystem-flashattn"},
        {"cross_attn_implementation": "vanilla"},
        {"cross_attn_query_source": "own"},
        {"slow_token_position_encoding": "fourier_spacetime"},
    ],
    ids=["text-only", "masksystem", "vanilla", "own-query", "slow-positions"],
)
@pytest.mark.parametrize("capacity", [200, 64], ids=["one-row", "rows-with-padding"])
def test_each_packed_sample_gets_the_loss_it_has_alone(overrides, capacity):
    model = tiny_model(**overrides).train()
    if model.model.slow_token_position_encoding is not None:
        torch.nn.init.normal_(model.model.slow_token_position_encoding.weight, std=0.5)
    items = mixed_items(model)
    batch = PackedDataCollator(PAD, capacity)(items)
    assert batch["input_ids"].shape[0] == (1 if capacity == 200 else 2)
    with torch.no_grad():
        alone = [alone_loss(model, item) for item in items]
        packed = packed_losses(model, batch, items)
    for k, (mine, theirs) in enumerate(zip(packed, alone)):
        torch.testing.assert_close(mine, theirs, **LOSS, msg=f"item {k}")


def test_without_sample_boundaries_the_samples_would_see_each_other():
    # the contrast: the same row read as one sequence (positions running on, one causal mask) changes the losses
    model = tiny_model().train()
    items = mixed_items(model)
    batch = PackedDataCollator(PAD, 200)(items)
    with torch.no_grad():
        alone = torch.stack([alone_loss(model, item) for item in items])
        merged = model(input_ids=batch["input_ids"], labels=batch["labels"], images=batch["images"]).loss
        packed = model(**batch).loss
    weights = torch.tensor([float((item["labels"][1:] != IGNORE_INDEX).sum()) for item in items])
    torch.testing.assert_close(packed, (alone * weights).sum() / weights.sum(), **LOSS)
    assert abs(merged.item() - packed.item()) > 1e-2


def test_packed_layout_restarts_positions_and_gives_every_token_its_sample():
    model = tiny_model().eval()
    items = mixed_items(model)
    batch = PackedDataCollator(PAD, 64)(items)
    with torch.no_grad():
        packed = prepare_packed_inputs(model, batch["input_ids"], batch["packed_sample_ids"], batch["labels"], batch["images"])
    order = sample_order(batch, items)
    for number, k in enumerate(order, start=1):
        where = packed.sample_ids == number
        assert int(where.sum()) == items[k]["num_positions"]
        assert packed.position_ids[where].tolist() == list(range(items[k]["num_positions"]))
        visual = where & (packed.token_types == TOKEN_TYPE_VISUAL)
        assert bool(visual.any()) == (items[k]["pixel_values"] is not None)
        queries = packed.cross_attn_query_mask[where]
        assert bool(queries.any()) == (items[k]["pixel_values"] is not None)  # text-only samples never query
    grid = model.get_vision_tower().spec.image_size // 32
    params = SlowFastParams.from_config(model.config)
    for number, k in enumerate(order, start=1):
        frames = items[k]["pixel_values"].shape[0] if items[k]["pixel_values"] is not None else 0
        slow = count_visual_tokens(frames, grid, params)[1] if frames else 0
        assert int((packed.slow_sample_ids == number).sum()) == slow
    pad = packed.sample_ids == 0
    assert bool(pad.any()) and (packed.labels[pad] == IGNORE_INDEX).all()


@pytest.mark.parametrize("reduction", ["micro_batch", "token"])
def test_packed_gradients_equal_the_padded_micro_batchs(reduction):
    # micro_batch: the model's mean over the micro-batch's supervised tokens; token: the sum over them divided by
    # the step's count (num_items_in_batch), as the Trainer calls it
    model = tiny_model().train()
    items = mixed_items(model)
    unpacked_model, packed_model = copy.deepcopy(model), copy.deepcopy(model)
    unpacked = DataCollatorForSupervisedDataset(PAD)(items)
    packed = PackedDataCollator(PAD, 64)(items)
    tokens = sum(int((item["labels"][1:] != IGNORE_INDEX).sum()) for item in items)
    kwargs = {} if reduction == "micro_batch" else {"num_items_in_batch": torch.tensor(3 * tokens)}
    loss_unpacked = unpacked_model(**unpacked, **kwargs).loss
    loss_packed = packed_model(**packed, **kwargs).loss
    torch.testing.assert_close(loss_packed, loss_unpacked, **LOSS)
    loss_unpacked.backward()
    loss_packed.backward()
    for (name, a), (_, b) in zip(unpacked_model.named_parameters(), packed_model.named_parameters()):
        if a.grad is None:
            assert b.grad is None or not b.grad.any(), name
            continue
        torch.testing.assert_close(b.grad, a.grad, **GRAD, msg=name)


def test_gradient_checkpointing_keeps_the_packed_loss_and_gradients():
    model = tiny_model().train()
    items = mixed_items(model)
    batch = PackedDataCollator(PAD, 64)(items)
    checkpointed = copy.deepcopy(model)
    enable = getattr(checkpointed, "activation_checkpointing_enable", None) or checkpointed.gradient_checkpointing_enable
    enable()
    plain_loss, checkpointed_loss = model(**batch).loss, checkpointed(**batch).loss
    torch.testing.assert_close(checkpointed_loss, plain_loss, **LOSS)
    plain_loss.backward()
    checkpointed_loss.backward()
    for (name, a), (_, b) in zip(model.named_parameters(), checkpointed.named_parameters()):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, **GRAD, msg=name)


# ----------------------------------------------------------------------------- the flash-attn paths


def test_packed_cross_attention_sends_each_sample_as_one_sequence_to_the_kernel(kernel):
    generator = torch.Generator().manual_seed(0)
    # two rows: row 0 holds samples 1 (3 slow tokens) and 2 (text only), row 1 samples 3 (2) and 4 (4)
    query_sample = torch.tensor([[1, 1, 1, 2, 2, 0], [3, 3, 4, 4, 4, 4]])
    query_mask = torch.tensor([[1, 0, 1, 1, 1, 0], [1, 1, 0, 1, 1, 1]], dtype=torch.bool) & (query_sample != 2)
    slow_sample = torch.tensor([[1, 1, 1, 0, 0, 0], [3, 3, 4, 4, 4, 4]])
    segments = SlowSegments.build(query_mask, query_sample, slow_sample > 0, slow_sample)
    query = torch.randn(2, 4, 6, 16, generator=generator).bfloat16()
    keys, values = (torch.randn(2, 2, 6, 16, generator=generator).bfloat16() for _ in range(2))
    flash = packed_cross_attention(query, keys, values, segments, 0.25, use_flash=True)
    sdpa = packed_cross_attention(query.float(), keys.float(), values.float(), segments, 0.25)
    (args, kwargs), = kernel.calls
    assert args[3].tolist() == [0, 2, 4, 7] and args[4].tolist() == [0, 3, 5, 9]  # queries and keys per sample
    torch.testing.assert_close(flash.float(), sdpa, rtol=1e-2, atol=1e-3)
    # each sample alone: the rows of sample 3 against its two keys only
    alone = F.scaled_dot_product_attention(
        query[1:2, :, :2].float(), keys[1:2, :, :2].float().repeat_interleave(2, 1),
        values[1:2, :, :2].float().repeat_interleave(2, 1), scale=0.25,
    )
    torch.testing.assert_close(sdpa[1, :2], alone[0].transpose(0, 1).reshape(2, -1), rtol=1e-5, atol=1e-6)
    assert not sdpa[0, 3:].any() and not sdpa[0, 1].any()  # text-only sample and non-querying rows: zero


def varlen_self_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' flash_attention_2 interface for one flattened row, in plain PyTorch: causal attention within
    each ``cu_seq_lens_q`` segment (the arguments flash-attn's varlen kernel receives)."""
    cu, longest = kwargs["cu_seq_lens_q"], kwargs["max_length_q"]
    assert attention_mask is None and query.shape[0] == 1 and torch.equal(cu, kwargs["cu_seq_lens_k"])
    assert cu[-1] == query.shape[2] and longest == int(cu.diff().max())
    out = torch.zeros_like(query)
    for start, stop in zip(cu[:-1].tolist(), cu[1:].tolist()):
        out[:, :, start:stop] = F.scaled_dot_product_attention(
            query[:, :, start:stop], key[:, :, start:stop], value[:, :, start:stop], is_causal=True, scale=scaling,
            enable_gqa=True,
        )
    return out.transpose(1, 2).contiguous(), None


def test_flash_attention_2_flattens_the_rows_and_passes_the_sample_boundaries(kernel, monkeypatch):
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "flash_attention_2", varlen_self_attention)
    model = tiny_model().train().to(torch.bfloat16)
    items = mixed_items(model)
    for item in items:
        if item["pixel_values"] is not None:
            item["pixel_values"] = item["pixel_values"].bfloat16()
    batch = PackedDataCollator(PAD, 64)(items)
    model.config._attn_implementation = "flash_attention_2"
    with torch.no_grad():
        flat = packed_losses(model, batch, items)
        model.config._attn_implementation = "sdpa"
        alone = [alone_loss(model, item) for item in items]
    assert kernel.calls and all(call[0][3].numel() - 1 == 3 for call in kernel.calls)  # three visual samples
    for k, (mine, theirs) in enumerate(zip(flat, alone)):
        # bf16: losses near 6 are resolved to 0.03; the stand-ins compute in float32 inside
        torch.testing.assert_close(mine.float(), theirs.float(), rtol=0, atol=8e-2, msg=f"item {k}")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/check_gpu.sh runs these)")
@pytest.mark.skipif(hybrid_layer.flash_attn_varlen_func is None, reason="needs flash-attn (pip install -e '.[gpu]')")
def test_packed_rows_with_flash_attn_on_cuda_give_each_sample_its_loss():
    model = tiny_model().train().cuda().to(torch.bfloat16)
    items = mixed_items(model)
    for item in items:
        for key in ("input_ids", "labels"):
            item[key] = item[key].cuda()
        if item["pixel_values"] is not None:
            item["pixel_values"] = item["pixel_values"].cuda().bfloat16()
    batch = PackedDataCollator(PAD, 64)(items)
    batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    with torch.no_grad():
        model.config._attn_implementation = "sdpa"
        alone = [alone_loss(model, item) for item in items]
        model.config._attn_implementation = "flash_attention_2"
        flat = packed_losses(model, batch, items)
    for k, (mine, theirs) in enumerate(zip(flat, alone)):
        torch.testing.assert_close(mine.float(), theirs.float(), rtol=0, atol=8e-2, msg=f"item {k}")


@pytest.mark.parametrize("with_visual", [True, False], ids=["visual", "text-only"])
def test_the_vision_tower_runs_before_the_embeddings_whatever_the_packed_batch_holds(with_visual):
    # under ZeRO-3 every rank gathers the parameters in the order the modules run: a text-only micro-batch on one
    # rank beside a visual one on another must run them in the same order (the tower's, with zero weight)
    model = tiny_model().train()
    items = mixed_items(model) if with_visual else [i for i in mixed_items(model) if i["pixel_values"] is None]
    order = []
    hooks = [model.get_vision_tower().register_forward_hook(lambda *_: order.append("tower")),
             model.get_input_embeddings().register_forward_hook(lambda *_: order.append("embeddings"))]
    try:
        loss = model(**PackedDataCollator(PAD, 64)(items)).loss
    finally:
        for hook in hooks:
            hook.remove()
    assert order == ["tower", "embeddings"]
    loss.backward()
    assert model.get_vision_tower().vision_tower.stem[0].weight.grad is not None  # the vision path trains too
