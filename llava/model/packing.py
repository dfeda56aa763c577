"""Packed rows: several training samples in one row, each computed as if it were alone.

A packed micro-batch arrives as ``input_ids`` ``[R, L]`` (``<image>`` as ``-200``) with ``packed_sample_ids``
``[R, L]`` numbering its samples ``1..n`` in row order (0 on padding; see
``llava.train.collators.PackedDataCollator``). :func:`prepare_packed_inputs` merges each sample's fast tokens at
its own placeholder and gives every merged position its sample, then:

* positions restart at 0 with every sample (and with the padding after the last one), attention_mask is None,
  so transformers' mask functions see packed sequences and keep self-attention inside each sample (a
  block-diagonal causal mask for SDPA/eager); with ``flash_attention_2`` the rows are flattened into one and
  the sample boundaries are handed to flash-attn's variable-length kernel (``cu_seq_lens_q/k``);
* each row's slow tokens are its samples' slow tokens end to end, and :class:`SlowSegments` pairs every querying
  position with its own sample's slow tokens only: :func:`llava.model.hybrid_layer.packed_cross_attention` runs the cross-attention of
  each sample as a separate sequence (flash-attn's variable-length kernel on GPU; on CPU the same segments
  gathered into a padded batch for SDPA, with exactly the keys each query would have alone).

Labels are unchanged: the first label of each sample is already ``-100`` (nothing before it in its sample
predicts it), so the loss of a packed row is the loss of its samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..constants import IMAGE_TOKEN_INDEX, TOKEN_TYPE_RESPONSE, TOKEN_TYPE_TEXT, TOKEN_TYPE_VISUAL
from .configuration_llava_qwen_slow_fast import cross_attn_query_mode
from .slow_fast import match_images_to_tokens

__all__ = ["PackedInputs", "SlowSegments", "prepare_packed_inputs"]


@dataclass
class SlowSegments:
    """The querying positions and slow tokens of every sample that has both, sample after sample.

    ``query_index`` ``[Nq]``: querying positions as indices into the flattened ``[B * L]`` positions;
    ``key_index`` ``[Nk]``: valid slow tokens as indices into the flattened ``[B * S]`` slow tokens; both
    grouped by sample, samples in order. ``cu_q``/``cu_k`` ``[N + 1]`` int32: where each of the ``N`` samples
    starts in them (``max_q``, ``max_k``: the longest). ``q_gather``/``k_gather`` ``[N, max]`` index the
    queries/keys of sample ``n`` (padded with 0, ``q_valid``/``k_valid`` mark the real entries).
    """

    query_index: torch.Tensor
    key_index: torch.Tensor
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    q_gather: torch.Tensor
    q_valid: torch.Tensor
    k_gather: torch.Tensor
    k_valid: torch.Tensor

    @staticmethod
    def _layout(sample_of: torch.Tensor, segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """cu lengths, gather index and validity of entries whose segment number is ``segments`` (sorted)."""
        count = len(sample_of)
        lengths = torch.bincount(segments, minlength=count)
        cu = F.pad(lengths.cumsum(0), (1, 0))
        longest = int(lengths.max()) if count else 0
        place = torch.arange(len(segments), device=segments.device) - cu[segments]
        gather = torch.zeros(count, longest, dtype=torch.long, device=segments.device)
        valid = torch.zeros(count, longest, dtype=torch.bool, device=segments.device)
        gather[segments, place] = torch.arange(len(segments), device=segments.device)
        valid[segments, place] = True
        return cu.to(torch.int32), gather, valid, longest

    @classmethod
    def build(
        cls, query_mask: torch.Tensor, query_sample: torch.Tensor, slow_mask: torch.Tensor, slow_sample: torch.Tensor
    ) -> "SlowSegments":
        """From the querying positions ``query_mask`` ``[B, L]`` with their samples ``query_sample`` ``[B, L]``, and
        the valid slow tokens ``slow_mask`` ``[B, S]`` with theirs ``slow_sample`` ``[B, S]``. Sample numbers must
        grow in row-major order (they do: the collator numbers samples row by row)."""
        q_index = query_mask.flatten().nonzero().squeeze(1)
        k_index = slow_mask.flatten().nonzero().squeeze(1)
        q_sample, k_sample = query_sample.flatten()[q_index], slow_sample.flatten()[k_index]
        both = q_sample.unique()[torch.isin(q_sample.unique(), k_sample.unique())]
        q_keep, k_keep = torch.isin(q_sample, both), torch.isin(k_sample, both)
        q_index, q_sample, k_index, k_sample = q_index[q_keep], q_sample[q_keep], k_index[k_keep], k_sample[k_keep]
        cu_q, q_gather, q_valid, max_q = cls._layout(both, torch.searchsorted(both, q_sample))
        cu_k, k_gather, k_valid, max_k = cls._layout(both, torch.searchsorted(both, k_sample))
        return cls(q_index, k_index, cu_q, cu_k, max_q, max_k, q_gather, q_valid, k_gather, k_valid)


def packed_query_mask(
    token_types: torch.Tensor, sample_ids: torch.Tensor, has_slow: torch.Tensor, implementation: str
) -> torch.Tensor:
    """[`llava.model.hybrid_layer.cross_attn_query_mask`] per sample of packed rows: ``[B, L]`` bool from
    ``token_types`` and ``sample_ids`` ``[B, L]`` and ``has_slow`` ``[n + 1]`` (whether sample ``k`` has slow
    tokens). ``masksystem`` modes count from each sample's own first visual token."""
    mode = cross_attn_query_mode(implementation)
    real = sample_ids > 0
    if mode == "all":
        mask = real
    else:
        mask = (token_types == TOKEN_TYPE_TEXT) | (token_types == TOKEN_TYPE_RESPONSE)
        if mode == "text_after_visual":
            flat = torch.arange(token_types.numel(), device=token_types.device).view_as(token_types)
            first = torch.full_like(has_slow, token_types.numel(), dtype=torch.long)
            visual = token_types == TOKEN_TYPE_VISUAL
            first = first.scatter_reduce(0, sample_ids[visual], flat[visual], reduce="amin")
            mask = mask & (flat > first[sample_ids])
    return mask & real & has_slow[sample_ids]


@dataclass
class PackedInputs:
    """A packed micro-batch ready for the decoder: ``inputs_embeds`` ``[B, L, hidden]``, ``position_ids``,
    ``sample_ids`` (0 on padding), ``token_types`` and ``labels`` ``[B, L]``; ``slow_tokens`` ``[B, S, hidden]``,
    ``slow_token_mask`` and ``slow_sample_ids`` ``[B, S]``, ``cross_attn_query_mask`` ``[B, L]`` and ``slow_segments``
    (None without visual input); ``attention_kwargs``: what the attention functions need besides (flash-attn's sample boundaries).
    ``B`` is the number of rows, or 1 when they were flattened for flash-attn."""

    inputs_embeds: torch.Tensor
    position_ids: torch.Tensor
    sample_ids: torch.Tensor
    token_types: torch.Tensor
    labels: torch.Tensor | None
    slow_tokens: torch.Tensor | None
    slow_token_mask: torch.Tensor | None
    slow_sample_ids: torch.Tensor | None
    cross_attn_query_mask: torch.Tensor | None
    slow_segments: SlowSegments | None
    attention_kwargs: dict


def _restarting_positions(sample_ids: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` position of every entry within its run of equal ``sample_ids`` (padding is a run too)."""
    length = sample_ids.shape[1]
    index = torch.arange(length, device=sample_ids.device).expand_as(sample_ids)
    starts = torch.ones_like(sample_ids, dtype=torch.bool)
    starts[:, 1:] = sample_ids[:, 1:] != sample_ids[:, :-1]
    start_of_run = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - start_of_run


def _flash_boundaries(sample_ids: torch.Tensor) -> dict:
    """flash-attn's variable-length arguments for one flattened row ``[1, T]`` of samples (no padding)."""
    lengths = torch.unique_consecutive(sample_ids[0], return_counts=True)[1]
    cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    longest = int(lengths.max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def prepare_packed_inputs(
    model,
    input_ids: torch.LongTensor,
    packed_sample_ids: torch.LongTensor,
    labels: torch.LongTensor | None = None,
    images=None,
    past_key_values=None,
) -> PackedInputs:
    """Merge the fast tokens of packed rows and lay out their samples (see the module's docstring).

    ``model``: a ``LlavaQwenSlowFastForCausalLM``; its ``prepare_multimodal_inputs`` merges the fast tokens row by
    row (each ``<image>`` in row order takes the next visual item, so each sample's go to its own placeholder), and
    this function adds whose every merged position and slow token is. The vision tower runs before the embeddings,
    as in ``prepare_multimodal_inputs`` (under ZeRO-3 every rank gathers the parameters in the same order).
    """

    if input_ids is None or past_key_values is not None:
        raise ValueError("packed_sample_ids needs input_ids and no cache: packed rows are for training")
    if input_ids.shape != packed_sample_ids.shape:
        raise ValueError(f"packed_sample_ids {tuple(packed_sample_ids.shape)} must match input_ids {tuple(input_ids.shape)}")
    device = input_ids.device
    packed_sample_ids = packed_sample_ids.to(device)
    placeholders = int((input_ids == IMAGE_TOKEN_INDEX).sum())
    visual_tokens = model.encode_images(match_images_to_tokens(images, placeholders)) if placeholders else []
    blank = None
    tower = model.get_vision_tower()
    if not placeholders and model.training and tower is not None:
        # As the model's dummy visual path does for a text-only batch (the vision parameters get a gradient, zero),
        # but here before the embeddings, in the order of a batch with visual input: under ZeRO-3 every rank must
        # gather the same parameters in the same order, whatever its micro-batch holds.
        size = tower.spec.image_size
        blank = model.encode_images([torch.zeros(1, 3, size, size, device=tower.device, dtype=tower.dtype)])[0]
    mm = model.prepare_multimodal_inputs(
        input_ids, packed_sample_ids > 0, labels, visual_tokens=visual_tokens, padding_side="right"
    )
    owners, slow_owners = _owners(input_ids, packed_sample_ids, visual_tokens)
    inputs_embeds, labels, token_types = mm.inputs_embeds, mm.labels, mm.token_types
    slow_tokens = mm.slow_tokens
    flatten = getattr(model.config, "_attn_implementation", None) == "flash_attention_2"
    if flatten and input_ids.shape[0] > 1:  # one row without padding: flash-attn's varlen kernel takes the boundaries
        real, slow_real = mm.attention_mask.bool(), slow_owners > 0
        inputs_embeds, token_types = inputs_embeds[real][None], token_types[real][None]
        labels = labels[real][None] if labels is not None else None
        owners = owners[real][None]
        if slow_tokens is not None:
            slow_tokens, slow_owners = slow_tokens[slow_real][None], slow_owners[slow_real][None]
    batch = owners.shape[0]
    # padding restarts the positions too, so that it forms a sequence of its own, never part of a sample
    position_ids = _restarting_positions(torch.where(owners > 0, owners, -1 - torch.arange(batch, device=device)[:, None]))
    slow_mask = query_mask = segments = None
    if blank is not None:
        inputs_embeds = inputs_embeds + 0.0 * blank.fast.sum().to(inputs_embeds.dtype)
        slow_tokens = blank.slow.to(inputs_embeds.dtype)[None].expand(batch, -1, -1)
        slow_mask = torch.zeros(slow_tokens.shape[:2], dtype=torch.bool, device=device)
        query_mask = torch.zeros(owners.shape, dtype=torch.bool, device=device)
    elif slow_tokens is not None:
        slow_mask = slow_owners > 0
        has_slow = torch.zeros(int(owners.max()) + 1, dtype=torch.bool, device=device)
        has_slow[slow_owners[slow_mask]] = True
        query_mask = packed_query_mask(token_types, owners, has_slow, model.config.cross_attn_implementation)
        segments = SlowSegments.build(query_mask, owners, slow_mask, slow_owners)
    return PackedInputs(
        inputs_embeds=inputs_embeds,
        position_ids=position_ids,
        sample_ids=owners,
        token_types=token_types,
        labels=labels,
        slow_tokens=slow_tokens,
        slow_token_mask=slow_mask,
        slow_sample_ids=slow_owners if segments is not None else None,
        cross_attn_query_mask=query_mask,
        slow_segments=segments,
        attention_kwargs=_flash_boundaries(owners) if flatten else {},
    )


def _owners(input_ids: torch.Tensor, sample_ids: torch.Tensor, visual_tokens: list) -> tuple[torch.Tensor, torch.Tensor]:
    """The sample of every merged position ``[B, L']`` and of every slow token ``[B, S]`` (0: padding), laid out as
    ``prepare_multimodal_inputs`` lays out the rows (right-padded; each ``<image>`` becomes its item's fast tokens,
    a row's slow tokens are its items' end to end)."""
    device = input_ids.device
    visual = iter(visual_tokens)
    merged, slow = [], []
    for ids, owner in zip(input_ids, sample_ids):
        keep = owner > 0
        ids, owner = ids[keep], owner[keep]
        repeats = torch.ones_like(ids)
        row_slow = []
        for pos in (ids == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist():
            tokens = next(visual)
            repeats[pos] = tokens.fast.shape[0]
            row_slow.append(owner.new_full((tokens.slow.shape[0],), int(owner[pos])))
        merged.append(owner.repeat_interleave(repeats))
        slow.append(torch.cat(row_slow) if row_slow else owner.new_zeros(0))
    pad = torch.nn.utils.rnn.pad_sequence
    return (pad(merged, batch_first=True).to(device),
            pad(slow, batch_first=True).to(device) if any(len(s) for s in slow) else torch.zeros(len(slow), 0, dtype=torch.long, device=device))
