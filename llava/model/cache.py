"""Generation caches: transformers' ``DynamicCache`` / ``StaticCache`` plus each hybrid layer's slow keys/values.

The slow tokens do not change while a prompt is decoded, so each hybrid layer projects them through
``cross_attn_kv_proj`` once, at prefill, and every later step reads the stored result. The static variant
keeps transformers' preallocated self-attention buffers (fixed shapes, so the decoding step can be compiled);
the slow keys/values have a fixed shape for the whole generation anyway.
"""

from __future__ import annotations

from typing import Callable

import torch
from transformers import DynamicCache, StaticCache


class SlowKeyValues:
    """Mixin: ``slow_key_values[layer_idx]`` holds ``(keys, values)``, each ``[batch, kv_heads, slow_tokens,
    head_dim]``, for every hybrid layer that has run; batch edits of the cache apply to them too."""

    slow_key_values: dict[int, tuple[torch.Tensor, torch.Tensor]]

    def _init_slow(self) -> None:
        self.slow_key_values = {}

    def get_slow(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.slow_key_values.get(layer_idx)

    def set_slow(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.slow_key_values[layer_idx] = (keys, values)

    @property
    def has_slow(self) -> bool:
        """True once the prompt's slow keys/values are stored, i.e. every later call is a decode step."""
        return bool(self.slow_key_values)

    def _map_slow(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.slow_key_values = {i: (fn(k), fn(v)) for i, (k, v) in self.slow_key_values.items()}

    def reset(self) -> None:
        super().reset()  # type: ignore[misc]
        self.slow_key_values = {}

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)  # type: ignore[misc]
        self._map_slow(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)  # type: ignore[misc]
        self._map_slow(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)  # type: ignore[misc]
        self._map_slow(lambda t: t[indices])


class SlowFastCache(SlowKeyValues, DynamicCache):
    """``DynamicCache`` plus the hybrid layers' slow keys/values (see [`SlowKeyValues`])."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_slow()


class SlowFastStaticCache(SlowKeyValues, StaticCache):
    """``StaticCache`` (self-attention keys/values preallocated to ``max_cache_len``) plus the hybrid layers'
    slow keys/values: what ``generate(..., cache_implementation="static")`` and compiled decoding use."""

    def __init__(self, config, max_cache_len: int, *args, **kwargs) -> None:
        super().__init__(config, max_cache_len, *args, **kwargs)
        self._init_slow()
