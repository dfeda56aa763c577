"""Hybrid decoder layers: a Qwen2 decoder layer whose attention also reads the slow tokens.

At a querying position the attention output (before ``o_proj``) becomes

    self_attn + g * cross_attn(q, K_slow, V_slow)

where ``q`` is the self-attention's query after RoPE (or, with ``cross_attn_query_source="own"``, the layer's
own ``cross_attn_q_proj`` of the same normalised input, without RoPE), ``K_slow, V_slow = cross_attn_kv_proj(input_layernorm(slow))``
(read per key/value head as ``[key, value]``, no RoPE, repeated for grouped-query attention), and ``g`` is the
``whole-dynamic`` gate computed from the self-attention output.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2Attention,
    Qwen2DecoderLayer,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from ..constants import TOKEN_TYPE_RESPONSE, TOKEN_TYPE_TEXT, TOKEN_TYPE_VISUAL
from .cache import SlowKeyValues
from .compat import cache_kwargs, take_cache
from .configuration_llava_qwen_slow_fast import cross_attn_query_mode, parse_gating_type


def _import_flash_varlen() -> Callable | None:
    """flash-attn's ``flash_attn_varlen_func``, or None where the package is missing or its CUDA build does not load."""
    try:
        from flash_attn import flash_attn_varlen_func as kernel
    except ImportError:
        return None
    return kernel


# Looked up at call time, so tests can put a stand-in here (and widen the device types to run it on a CPU).
flash_attn_varlen_func = _import_flash_varlen()
FLASH_DEVICE_TYPES: tuple[str, ...] = ("cuda",)
FLASH_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)  # the only dtypes the kernel takes


def flash_kernel_accepts(query: torch.Tensor) -> bool:
    """Whether flash-attn is loaded and takes ``query``'s device and dtype (fp16/bf16 on CUDA).

    An fp32 query (an fp32 model, or autocast, where RoPE's fp32 cos/sin promote the query) takes the SDPA path
    under ``flash_attention_2`` instead of reaching the kernel, which refuses fp32.
    """
    return (
        flash_attn_varlen_func is not None
        and query.device.type in FLASH_DEVICE_TYPES
        and query.dtype in FLASH_DTYPES
    )


def cross_attn_query_mask(token_types: torch.Tensor, implementation: str, has_visual: torch.Tensor) -> torch.Tensor:
    """Which positions query the slow tokens, ``[B, L]`` bool, from token types ``[B, L]``.

    ``text-only-vanilla*``: text tokens (types 1 and 2); with ``masksystem``, only those after the sample's
    first visual token. ``vanilla*``: every position. Samples without visual tokens never query.
    """
    mode = cross_attn_query_mode(implementation)
    if mode == "all":
        mask = torch.ones_like(token_types, dtype=torch.bool)
    else:
        mask = (token_types == TOKEN_TYPE_TEXT) | (token_types == TOKEN_TYPE_RESPONSE)
        if mode == "text_after_visual":
            visual = token_types == TOKEN_TYPE_VISUAL
            first_visual = torch.where(visual.any(1), visual.int().argmax(1), token_types.shape[1])
            positions = torch.arange(token_types.shape[1], device=token_types.device)
            mask = mask & (positions[None, :] > first_visual[:, None])
    return mask & has_visual[:, None]


def grouped_query_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, key_mask: torch.Tensor, scaling: float
) -> torch.Tensor:
    """SDPA of ``query`` ``[B, H, L, D]`` over ``keys``/``values`` ``[B, Hkv, S, D]``, key padding ``key_mask``
    ``[B, S]``; returns ``[B, H, L, D]``.

    The mask depends on the key alone (no causality), so each group of ``H / Hkv`` query heads can be folded
    onto its key/value head as extra rows (``[B, Hkv, G*L, D]``): every backend then reads each stored key/value
    head once, never a copy per query head (``enable_gqa`` falls back to such copies on some backends, which
    dominated a decode step's cross-attention: one query row per head against thousands of slow tokens).
    """
    batch, heads, length, head_dim = query.shape
    kv_heads = keys.shape[1]
    folded = query.reshape(batch, kv_heads, (heads // kv_heads) * length, head_dim)
    out = F.scaled_dot_product_attention(folded, keys, values, attn_mask=key_mask[:, None, None, :], scale=scaling)
    return out.reshape(batch, heads, length, head_dim)


def slow_cross_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    key_mask: torch.Tensor,
    query_mask: torch.Tensor,
    scaling: float,
    use_flash: bool = False,
) -> torch.Tensor:
    """Non-causal attention of ``query`` ``[B, H, L, D]`` over slow ``keys``/``values`` ``[B, Hkv, S, D]``.

    ``key_mask`` ``[B, S]`` marks valid slow tokens, ``query_mask`` ``[B, L]`` the querying positions.
    Keys/values are shared by groups of query heads (grouped-query attention, no copies). Returns
    ``[B, L, H*D]``; rows outside ``query_mask`` are finite but meaningless.
    """
    batch, heads, length, head_dim = query.shape
    if use_flash and flash_kernel_accepts(query) and bool(query_mask.any()):
        return _flash_varlen_cross_attention(query, keys, values, key_mask, query_mask, scaling)
    # A sample without slow tokens would give an all-masked softmax (NaN); let it attend to its padding,
    # its rows are never selected by query_mask.
    safe_mask = key_mask | ~key_mask.any(dim=-1, keepdim=True)
    rows = query_mask.any(dim=0)  # positions that query in at least one sample of the batch
    if length == 1 or bool(rows.all()):  # a decode step needs no host sync to decide
        context = grouped_query_attention(query, keys, values, safe_mask, scaling)
    else:
        # Only the querying positions (the text, not the fast tokens) are worth computing.
        picked = rows.nonzero().squeeze(-1)
        context = query.new_zeros(query.shape)
        context[:, :, picked] = grouped_query_attention(query[:, :, picked], keys, values, safe_mask, scaling)
    return context.transpose(1, 2).reshape(batch, length, heads * head_dim)


def eager_slow_cross_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    key_mask: torch.Tensor,
    query_mask: torch.Tensor,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """[`slow_cross_attention`] written out, for ``attn_implementation="eager"``: also returns the attention
    weights ``[B, H, L, S]`` (zero on rows outside ``query_mask`` and on padded slow tokens)."""
    batch, heads, length, head_dim = query.shape
    kv_heads, slow = keys.shape[1], keys.shape[2]
    safe_mask = key_mask | ~key_mask.any(dim=-1, keepdim=True)
    folded = query.reshape(batch, kv_heads, -1, head_dim)
    scores = torch.matmul(folded, keys.transpose(-1, -2)) * scaling
    scores = scores.masked_fill(~safe_mask[:, None, None, :], torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = weights.reshape(batch, heads, length, slow) * query_mask[:, None, :, None].to(query.dtype)
    context = torch.matmul(weights.reshape(batch, kv_heads, -1, slow), values).reshape(batch, heads, length, head_dim)
    return context.transpose(1, 2).reshape(batch, length, heads * head_dim), weights


class SlowCrossAttention(nn.Module):
    """The cross-attention over the slow tokens (no parameters of its own: it reads the query after RoPE and the
    projected slow keys/values). Its own module so that ``output_attentions=True`` records its weights as the
    model's ``cross_attentions``."""

    def forward(
        self,
        query: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        key_mask: torch.Tensor,
        query_mask: torch.Tensor,
        scaling: float,
        attn_implementation: str,
        slow_segments=None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Context ``[B, L, H*D]`` and, with ``attn_implementation="eager"``, the weights ``[B, H, L, S]``.
        ``slow_segments`` (packed rows, :class:`llava.model.packing.SlowSegments`): each sample's queries read only
        its own slow tokens (no weights are returned)."""
        if slow_segments is not None:
            use_flash = attn_implementation == "flash_attention_2"
            return packed_cross_attention(query, keys, values, slow_segments, scaling, use_flash=use_flash), None
        if attn_implementation == "eager":
            return eager_slow_cross_attention(query, keys, values, key_mask, query_mask, scaling)
        use_flash = attn_implementation == "flash_attention_2"
        return slow_cross_attention(query, keys, values, key_mask, query_mask, scaling, use_flash=use_flash), None


def _flash_varlen_cross_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    key_mask: torch.Tensor,
    query_mask: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """[`slow_cross_attention`] through flash-attn's varlen kernel; same shapes, rows outside ``query_mask`` zero.

    The querying rows and the valid slow tokens are packed sample after sample (``[Nq, H, D]``, ``[Nk, Hkv, D]``)
    and delimited by int32 cumulative lengths, so padding and the fast tokens cost nothing.
    """
    batch, heads, length, head_dim = query.shape
    # Rows of a sample without slow tokens stay zero, whatever the kernel makes of an empty key sequence.
    query_mask = query_mask & key_mask.any(dim=1, keepdim=True)
    context = query.new_zeros(batch, length, heads, head_dim)
    q_lens, k_lens = query_mask.sum(1, dtype=torch.int32), key_mask.sum(1, dtype=torch.int32)
    max_q = int(q_lens.max())
    if max_q == 0:
        return context.reshape(batch, length, heads * head_dim)
    q = query.transpose(1, 2)[query_mask]  # [Nq, H, D]
    k = keys.transpose(1, 2)[key_mask]  # [Nk, Hkv, D]
    v = values.transpose(1, 2)[key_mask]
    cu_q = F.pad(q_lens.cumsum(0, dtype=torch.int32), (1, 0))
    cu_k = F.pad(k_lens.cumsum(0, dtype=torch.int32), (1, 0))
    out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, int(k_lens.max()), softmax_scale=scaling, causal=False)
    context[query_mask] = out.to(context.dtype)
    return context.reshape(batch, length, heads * head_dim)


def packed_cross_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    segments,
    scaling: float,
    use_flash: bool = False,
) -> torch.Tensor:
    """Each sample's querying rows of ``query`` ``[B, H, L, D]`` attend (non-causally) to its own slow ``keys`` /
    ``values`` ``[B, Hkv, S, D]`` only, ``segments`` being a packed batch's
    :class:`llava.model.packing.SlowSegments`. Returns ``[B, L, H*D]``, zero outside the querying positions.

    ``use_flash`` (``flash_attention_2``) takes flash-attn's variable-length kernel when it accepts the query's
    device and dtype; otherwise the samples are gathered into a padded batch ``[N, H, max_q, D]`` against
    ``[N, Hkv, max_k, D]`` for SDPA, so every query sees exactly its own sample's keys.
    """
    batch, heads, length, head_dim = query.shape
    kv_heads, slow = keys.shape[1], keys.shape[2]
    context = query.new_zeros(batch * length, heads, head_dim)
    if not len(segments.query_index):
        return context.reshape(batch, length, heads * head_dim)
    q = query.transpose(1, 2).reshape(batch * length, heads, head_dim).index_select(0, segments.query_index)
    k = keys.transpose(1, 2).reshape(batch * slow, kv_heads, head_dim).index_select(0, segments.key_index)
    v = values.transpose(1, 2).reshape(batch * slow, kv_heads, head_dim).index_select(0, segments.key_index)
    if use_flash and flash_kernel_accepts(query):
        out = flash_attn_varlen_func(
            q, k, v, segments.cu_q, segments.cu_k, segments.max_q, segments.max_k, softmax_scale=scaling, causal=False
        )
    else:
        padded = grouped_query_attention(
            q[segments.q_gather].transpose(1, 2),
            k[segments.k_gather].transpose(1, 2),
            v[segments.k_gather].transpose(1, 2),
            segments.k_valid,
            scaling,
        )  # [N, H, max_q, D]
        out = padded.transpose(1, 2)[segments.q_valid]
    context = context.index_copy(0, segments.query_index, out.to(context.dtype))
    return context.reshape(batch, length, heads * head_dim)


class SlowFastAttention(Qwen2Attention):
    """Qwen2 attention plus ``cross_attn_kv_proj``, ``cross_attn_gate_proj``, ``cross_attn_warm_up_gate`` and,
    with ``config.cross_attn_query_source == "own"``, ``cross_attn_q_proj``."""

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.num_key_value_heads = config.num_key_value_heads
        inner = config.num_attention_heads * self.head_dim
        self.cross_attn_kv_proj = nn.Linear(config.hidden_size, 2 * self.num_key_value_heads * self.head_dim, bias=True)
        self.cross_attn_gate_proj = nn.Sequential(nn.Linear(inner, 1))
        self.gate_tanh, gate_warmup = parse_gating_type(config.cross_attn_gating_type)
        self.cross_attn_warm_up_gate = nn.Parameter(torch.zeros(1)) if gate_warmup else None
        # the reference squashes the warm-up scalar through tanh in text-only modes only
        self.warm_up_through_tanh = cross_attn_query_mode(config.cross_attn_implementation) != "all"
        self.slow_attention = SlowCrossAttention()
        # The reference reuses the self-attention's rotated query, so its match with a (position-less) slow key
        # turns with the querying token's position; an own projection without RoPE matches by content alone.
        self.cross_attn_q_proj = None
        if getattr(config, "cross_attn_query_source", "self_attn") == "own":
            self.cross_attn_q_proj = nn.Linear(config.hidden_size, inner, bias=True)

    def project_slow(self, normed_slow: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, S, hidden]`` -> keys, values ``[B, Hkv, S, D]``; the projection is read as (head, [k, v], D)."""
        batch, slow_len, _ = normed_slow.shape
        kv = self.cross_attn_kv_proj(normed_slow).view(batch, slow_len, -1, 2, self.head_dim)  # -1: local heads under TP
        return kv[..., 0, :].transpose(1, 2), kv[..., 1, :].transpose(1, 2)

    def gate(self, self_attn_output: torch.Tensor) -> torch.Tensor:
        """``[B, L, H*D]`` -> ``[B, L, 1]``."""
        g = self.cross_attn_gate_proj(self_attn_output)
        if self.gate_tanh:
            g = torch.tanh(g)
        if self.cross_attn_warm_up_gate is not None:
            w = self.cross_attn_warm_up_gate
            g = g * (torch.tanh(w) if self.warm_up_through_tanh else w)
        return g

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        past_key_values=None,
        slow_key_values: tuple[torch.Tensor, torch.Tensor] | None = None,
        slow_token_mask: torch.Tensor | None = None,
        cross_attn_query_mask: torch.Tensor | None = None,
        cache=None,
        slow_segments=None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Qwen2's attention ``[B, L, hidden]`` -> ``[B, L, hidden]`` (and eager weights), plus the gated
        cross-attention over ``slow_key_values`` at the positions of ``cross_attn_query_mask`` ``[B, L]``. The cache
        comes as ``cache`` from transformers 5.24, as ``past_key_values`` before."""
        cache = take_cache(cache, past_key_values)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)

        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        output, weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            **kwargs,
        )
        output = output.reshape(*input_shape, -1).contiguous()

        if slow_key_values is not None and cross_attn_query_mask is not None:
            if self.cross_attn_q_proj is not None:
                query = self.cross_attn_q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
            context, _ = self.slow_attention(
                query,
                *slow_key_values,
                slow_token_mask,
                cross_attn_query_mask,
                self.scaling,
                self.config._attn_implementation,
                slow_segments,
            )
            crossed = output + self.gate(output) * context.to(output.dtype)
            output = torch.where(cross_attn_query_mask[..., None], crossed, output)
        return self.o_proj(output), weights

    @torch.no_grad()
    def init_cross_attn_kv_from_lm(self, layout: str = "per_head") -> None:
        """Start ``cross_attn_kv_proj`` from this layer's ``k_proj``/``v_proj``.

        ``per_head`` (intended): each key/value head's key and value equal the language model's.
        ``reference``: ``[k_proj; v_proj]`` stacked, as the reference does (scrambled by the per-head reading).
        An own ``cross_attn_q_proj`` starts as a copy of ``q_proj``.
        """
        if self.cross_attn_q_proj is not None:
            self.cross_attn_q_proj.weight.copy_(self.q_proj.weight)
            self.cross_attn_q_proj.bias.copy_(self.q_proj.bias)
        k_w, v_w = self.k_proj.weight, self.v_proj.weight
        k_b, v_b = self.k_proj.bias, self.v_proj.bias
        if layout == "reference":
            weight, bias = torch.cat([k_w, v_w], 0), torch.cat([k_b, v_b], 0)
        elif layout == "per_head":
            heads, dim = self.num_key_value_heads, self.head_dim
            weight = torch.stack([k_w.view(heads, dim, -1), v_w.view(heads, dim, -1)], dim=1).reshape(k_w.shape[0] * 2, -1)
            bias = torch.stack([k_b.view(heads, dim), v_b.view(heads, dim)], dim=1).reshape(-1)
        else:
            raise ValueError(f"kv init layout {layout!r}: use 'per_head' or 'reference'")
        self.cross_attn_kv_proj.weight.copy_(weight)
        self.cross_attn_kv_proj.bias.copy_(bias)


class SlowFastDecoderLayer(Qwen2DecoderLayer):
    """A Qwen2 decoder layer whose attention is [`SlowFastAttention`].

    Call it as ``layer(hidden_states, slow_tokens, ...)``: both positionally, so that gradient checkpointing
    passes gradients to the slow tokens. ``slow_tokens`` ``[B, S, hidden]`` are normalised by this layer's own
    ``input_layernorm``. With a [`SlowFastCache`] or [`SlowFastStaticCache`] the projected keys/values are computed
    once and reused.
    """

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.layer_idx = layer_idx
        self.self_attn = SlowFastAttention(config, layer_idx)

    def slow_key_values(
        self, slow_tokens: torch.Tensor | None, cache
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        if isinstance(cache, SlowKeyValues) and (stored := cache.get_slow(self.layer_idx)) is not None:
            return stored
        if slow_tokens is None:
            return None
        keys, values = self.self_attn.project_slow(self.input_layernorm(slow_tokens))
        if isinstance(cache, SlowKeyValues):
            cache.set_slow(self.layer_idx, keys, values)
        return keys, values

    def forward(
        self,
        hidden_states: torch.Tensor,
        slow_tokens: torch.Tensor | None = None,
        past_key_values=None,
        slow_token_mask: torch.Tensor | None = None,
        cross_attn_query_mask: torch.Tensor | None = None,
        cache=None,
        slow_segments=None,
        **kwargs,
    ) -> torch.Tensor:
        """``hidden_states`` ``[B, L, hidden]`` through Qwen2's layer with the slow tokens ``[B, S, hidden]`` read by
        its attention. The cache comes as ``cache`` from transformers 5.24, as ``past_key_values`` before."""
        cache = take_cache(cache, past_key_values)
        slow_kv = None
        if cross_attn_query_mask is not None:
            slow_kv = self.slow_key_values(slow_tokens, cache)
        return super().forward(
            hidden_states,
            **cache_kwargs(cache),
            slow_key_values=slow_kv,
            slow_token_mask=slow_token_mask,
            cross_attn_query_mask=cross_attn_query_mask if slow_kv is not None else None,
            slow_segments=slow_segments,
            **kwargs,
        )
