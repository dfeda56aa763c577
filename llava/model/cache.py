"""The generation cache: transformers' ``DynamicCache`` plus each hybrid layer's slow keys/values.

The slow tokens do not change while a prompt is decoded, so each hybrid layer projects them through
``cross_attn_kv_proj`` once, at prefill, and every later step reads the stored result.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


class SlowFastCache(DynamicCache):
    """``DynamicCache`` whose ``slow_key_values[layer_idx]`` holds ``(keys, values)``, each
    ``[batch, kv_heads, slow_tokens, head_dim]``, for every hybrid layer that has run."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.slow_key_values: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def get_slow(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.slow_key_values.get(layer_idx)

    def set_slow(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.slow_key_values[layer_idx] = (keys, values)

    def _map_slow(self, fn) -> None:
        self.slow_key_values = {i: (fn(k), fn(v)) for i, (k, v) in self.slow_key_values.items()}

    def reset(self) -> None:
        super().reset()
        self.slow_key_values = {}

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._map_slow(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._map_slow(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._map_slow(lambda t: t[indices])
