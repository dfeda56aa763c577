"""Log-probabilities of generated tokens, as OpenAI's chat completions report them (``logprobs``,
``top_logprobs``).

:class:`LogprobRecorder` is a logits processor placed first in ``generate``'s list: at each step it keeps the
log-softmax of the model's scores for the rows that asked, before any sampling setting changes them (what
vLLM calls raw log-probabilities), so they come from the same forward pass that chose the answer's token.
The batching engine's row tracker reads them when the step's token is known and turns them into OpenAI's
entries with :class:`TokenText`: ``{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob",
"bytes"}, ...]}``.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from transformers import LogitsProcessor

__all__ = ["FLOOR", "LogprobRecorder", "TokenText"]

FLOOR = -9999.0


class TokenText:
    """The text and UTF-8 bytes of single tokens of ``tokenizer``.

    For a byte-level BPE tokenizer (Qwen2's) the bytes are exact, also for a token that holds part of a
    character (its text then shows U+FFFD, as OpenAI's does); other tokenizers give each token's decoded text.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}
        self._byte_of: dict[str, int] | None = None
        self._special = set(getattr(tokenizer, "all_special_ids", []) or [])
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None and _is_byte_level(json.loads(backend.to_str()).get("decoder")):
            from transformers.convert_slow_tokenizer import bytes_to_unicode

            self._byte_of = {char: byte for byte, char in bytes_to_unicode().items()}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        found = self._cache.get(token_id)
        if found is None:
            found = self._cache[token_id] = self._text(token_id)
        return found

    def _text(self, token_id: int) -> tuple[str, list[int]]:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if self._byte_of is not None and isinstance(piece, str) and token_id not in self._special \
                and all(c in self._byte_of for c in piece):
            data = bytes(self._byte_of[c] for c in piece)
        else:
            data = self.tokenizer.decode([token_id]).encode()
        return data.decode("utf-8", errors="replace"), list(data)

    def entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        text, data = self(token_id)
        # -inf (a token the model rules out) is not JSON: OpenAI and vLLM report -9999.0
        return {"token": text, "logprob": max(logprob, FLOOR), "bytes": data}


def _is_byte_level(decoder: Any) -> bool:
    if not isinstance(decoder, dict):
        return False
    if decoder.get("type") == "ByteLevel":
        return True
    return any(_is_byte_level(d) for d in decoder.get("decoders") or [])


class LogprobRecorder(LogitsProcessor):
    """Keeps each step's log-probabilities ``[B, V]`` (float32) while any row of ``wanted`` (top-k per row,
    ``None``: not asked) is set; returns the scores unchanged."""

    def __init__(self, wanted: list[int | None]) -> None:
        self.wanted = wanted
        self.active = any(k is not None for k in wanted)
        self.current: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.active:
            self.current = scores.float().log_softmax(-1)
        return scores

    def entry(self, row: int, token_id: int, text: TokenText) -> dict[str, Any] | None:
        """The OpenAI entry of ``token_id`` just chosen for ``row`` (``None`` if the row did not ask)."""
        k = self.wanted[row]
        if k is None or self.current is None:
            return None
        logprobs = self.current[row]
        entry = text.entry(token_id, float(logprobs[token_id]))
        if k:
            values, ids = logprobs.topk(k)
            entry["top_logprobs"] = [text.entry(int(i), float(v)) for v, i in zip(values.tolist(), ids.tolist())]
        else:
            entry["top_logprobs"] = []
        return entry
