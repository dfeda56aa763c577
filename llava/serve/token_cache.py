"""The server's cache of encoded visual tokens: a thread-safe least-recently-used map from a content key
(``(sha256 of the file, frames, fps, kind)``) to :class:`~llava.model.slow_fast.SlowFastTokens`, so a video sent
twice is decoded and encoded once."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable

from llava.model.slow_fast import SlowFastTokens

__all__ = ["TokenCache"]


class TokenCache:
    """A thread-safe LRU map from a content key to encoded visual tokens; ``capacity == 0`` caches nothing."""

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self._items: OrderedDict[Hashable, SlowFastTokens] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> SlowFastTokens | None:
        with self._lock:
            tokens = self._items.get(key)
            if tokens is not None:
                self._items.move_to_end(key)
            return tokens

    def put(self, key: Hashable, tokens: SlowFastTokens) -> None:
        if self.capacity == 0:
            return
        with self._lock:
            self._items[key] = tokens
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)
