"""vLLM layers of the Slow-Fast language model: a Qwen2 attention that also reads the slow tokens through a paged
cross-attention, and the decoder layer around it.

At a querying position the attention output (before ``o_proj``) becomes ``self_attn + g * cross_attn(q, K, V)``
exactly as in ``llava.model.hybrid_layer.SlowFastAttention``: ``q`` is the self-attention's query after RoPE (or the
layer's own ``cross_attn_q_proj`` of the same normalised input), ``K, V = cross_attn_kv_proj(input_layernorm(slow))``
read per key/value head as ``[key, value]``, no RoPE, and ``g`` the ``whole-dynamic`` gate of the self-attention
output. vLLM's ``CrossAttention`` writes ``K, V`` to its paged cache once, when the request's prompt runs, and every
later step of the request reads them from there.
"""

from __future__ import annotations

import torch
from torch import nn
from vllm.config import CacheConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.attention import CrossAttention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import ColumnParallelLinear, RowParallelLinear
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.models.qwen2 import Qwen2Attention, Qwen2MLP
from vllm.v1.attention.backend import AttentionType

from .model_parts.configuration_llava_qwen_slow_fast import (
    cross_attn_query_mode,
    parse_gating_type,
)


def _attention_kwargs(config, cache_config, quant_config, prefix: str) -> dict:
    return dict(
        hidden_size=config.hidden_size,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        rope_parameters=config.rope_parameters,
        max_position=config.max_position_embeddings,
        cache_config=cache_config,
        quant_config=quant_config,
        prefix=prefix,
        rms_norm_eps=config.rms_norm_eps,
    )


class SlowFastAttention(Qwen2Attention):
    """vLLM's Qwen2 attention plus ``cross_attn_kv_proj``, ``cross_attn_gate_proj``, ``cross_attn_warm_up_gate``,
    the optional ``cross_attn_q_proj`` and a ``CrossAttention`` over the slow tokens.

    Under tensor parallelism the key/value projection is split by key/value head like ``k_proj`` (its output is
    laid out per head) and the gate reduces its partial sums over the head shards like ``o_proj``.
    """

    def __init__(self, config, cache_config: CacheConfig | None, quant_config: QuantizationConfig | None, prefix: str):
        super().__init__(**_attention_kwargs(config, cache_config, quant_config, prefix))
        tp = get_tensor_model_parallel_world_size()
        if self.total_num_kv_heads % tp:
            raise ValueError(
                f"tensor_parallel_size={tp} must divide num_key_value_heads={self.total_num_kv_heads}: the slow tokens' "
                "key/value projection is split by key/value head"
            )
        inner = self.total_num_heads * self.head_dim
        self.cross_attn_kv_proj = ColumnParallelLinear(
            config.hidden_size, 2 * self.total_num_kv_heads * self.head_dim, bias=True, prefix=f"{prefix}.cross_attn_kv_proj"
        )
        # A one-entry list so that the weight keeps the checkpoint's name, cross_attn_gate_proj.0.weight.
        self.cross_attn_gate_proj = nn.ModuleList(
            [RowParallelLinear(inner, 1, bias=True, input_is_parallel=True, prefix=f"{prefix}.cross_attn_gate_proj.0")]
        )
        self.gate_tanh, warmup = parse_gating_type(config.cross_attn_gating_type)
        self.cross_attn_warm_up_gate = nn.Parameter(torch.zeros(1)) if warmup else None
        # the reference squashes the warm-up scalar through tanh in the text-only modes only
        self.warm_up_through_tanh = cross_attn_query_mode(config.cross_attn_implementation) != "all"
        self.cross_attn_q_proj = None
        if getattr(config, "cross_attn_query_source", "self_attn") == "own":
            self.cross_attn_q_proj = ColumnParallelLinear(
                config.hidden_size, inner, bias=True, prefix=f"{prefix}.cross_attn_q_proj"
            )
        self.cross_attn = CrossAttention(
            self.num_heads,
            self.head_dim,
            self.scaling,
            num_kv_heads=self.num_kv_heads,
            cache_config=cache_config,
            prefix=f"{prefix}.cross_attn",
            attn_type=AttentionType.ENCODER_DECODER,
        )

    def project_slow(self, normed_slow: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[S, hidden]`` -> keys, values ``[S, kv_heads * head_dim]`` (this shard's heads)."""
        kv, _ = self.cross_attn_kv_proj(normed_slow)
        kv = kv.view(kv.shape[0], -1, 2, self.head_dim)
        return kv[:, :, 0].reshape(kv.shape[0], -1), kv[:, :, 1].reshape(kv.shape[0], -1)

    def gate(self, attn_output: torch.Tensor) -> torch.Tensor:
        """``[T, heads * head_dim]`` -> ``[T, 1]``."""
        g, _ = self.cross_attn_gate_proj[0](attn_output)
        if self.gate_tanh:
            g = torch.tanh(g)
        if self.cross_attn_warm_up_gate is not None:
            w = self.cross_attn_warm_up_gate
            g = g * (torch.tanh(w) if self.warm_up_through_tanh else w)
        return g

    def forward(  # type: ignore[override]
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        slow_key_values: tuple[torch.Tensor, torch.Tensor] | None = None,
        query_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``hidden_states`` ``[T, hidden]``; ``slow_key_values`` the slow keys/values of the requests whose prompt
        runs in this step (None when none has one: the rest are in the cache); ``query_mask`` ``[T]`` bool, the
        positions that add the cross-attention term (None: no position does)."""
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        output = self.attn(q, k, v)
        if query_mask is not None:
            query = q
            if self.cross_attn_q_proj is not None:
                query, _ = self.cross_attn_q_proj(hidden_states)
            keys, values = slow_key_values if slow_key_values is not None else (None, None)
            context = self.cross_attn(query, keys, values)
            crossed = output + self.gate(output) * context.to(output.dtype)
            # a request without slow tokens leaves its rows of `context` undefined: select, never multiply
            output = torch.where(query_mask[:, None], crossed, output)
        out, _ = self.o_proj(output)
        return out


class SlowFastDecoderLayer(nn.Module):
    """A Qwen2 decoder layer whose attention is [`SlowFastAttention`]; the slow tokens are normalised by this
    layer's own ``input_layernorm``."""

    def __init__(self, config, cache_config: CacheConfig | None, quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        self.self_attn = SlowFastAttention(config, cache_config, quant_config, prefix=f"{prefix}.self_attn")
        self.mlp = Qwen2MLP(
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            hidden_act=config.hidden_act,
            quant_config=quant_config,
            prefix=f"{prefix}.mlp",
        )
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        residual: torch.Tensor | None,
        slow_tokens: torch.Tensor | None = None,
        query_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Same contract as vLLM's ``Qwen2DecoderLayer.forward``; ``slow_tokens`` ``[S, hidden]`` (the prompts of
        this step, concatenated request after request) or None."""
        slow_kv = None
        if slow_tokens is not None and query_mask is not None:
            slow_kv = self.self_attn.project_slow(self.input_layernorm(slow_tokens))
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states, slow_kv, query_mask)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual
