"""The transformers releases this package supports differ in a few names it uses; they are all handled here.

Supported: transformers 5.4 (the lower bound in ``pyproject.toml``, tested by ``.ci/lane_oldest.sh``) to 5.25 and
later. Each difference is read from transformers' own public signatures, not from a version number, so a release
that finishes a deprecation needs no change here. Differences handled elsewhere, each with a comment naming the
releases:
``modeling_llava_qwen_slow_fast._keep_positions`` (``slice_logits_to_keep`` exists only from 5.23).
"""

from __future__ import annotations

import inspect
from typing import Any

from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

# transformers 5.24 renamed the cache argument of every model, layer, attention and mask function, and the field of
# every model output, from ``past_key_values`` to ``cache`` (``generate`` passes and reads the new name; the old one
# is accepted with a FutureWarning until 5.40). Qwen2's decoder layer names whichever its release uses: gradient
# checkpointing, for one, drops the cache only when it arrives under that name.
CACHE_KWARG: str = "cache" if "cache" in inspect.signature(Qwen2DecoderLayer.forward).parameters else "past_key_values"


def take_cache(cache: Any, past_key_values: Any) -> Any:
    """The cache a caller passed as ``cache`` (the name from 5.24) or ``past_key_values`` (before): either name
    works on every supported release. Raises ``ValueError`` when two different caches are given."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("pass the cache once, as `cache` or as `past_key_values` (its name before transformers 5.24)")
    return cache if cache is not None else past_key_values


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """``{name: cache}`` under the name this release's Qwen2 layers, mask functions and model outputs take."""
    return {CACHE_KWARG: cache}


def output_cache(output: Any) -> Any:
    """The cache a model output holds (its field is ``cache`` from 5.24, ``past_key_values`` before)."""
    return getattr(output, CACHE_KWARG, None)


__all__ = ["CACHE_KWARG", "cache_kwargs", "output_cache", "take_cache"]
