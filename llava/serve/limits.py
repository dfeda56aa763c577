"""Admission for the API server: how many requests it holds and how much memory they may take.

:class:`Admission` counts a request from the moment its body starts to arrive until its answer is sent,
through reading, parsing, decoding, queueing and generating, so ``--max-queue`` bounds everything the server
holds (beyond it: 429). Each admitted request gets a :class:`Ticket`, which reserves bytes from the server's
memory budget (``--max-inflight-mb``) before the work that needs them: the body as it arrives, then the
decoded frames and preprocessed pixels its media will take, predicted from their headers. A reservation that
does not fit now is a 429; one that can never fit is a 413.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from llava.serve.protocol import ApiError

__all__ = ["Admission", "Ticket"]

MB = 1024 * 1024


class Admission:
    """At most ``max_open`` requests held at once, together reserving at most ``memory_bytes``."""

    def __init__(self, max_open: int, memory_bytes: int) -> None:
        if max_open < 1:
            raise ValueError(f"max_open must be positive, got {max_open}")
        if memory_bytes < 1:
            raise ValueError(f"memory_bytes must be positive, got {memory_bytes}")
        self.max_open = max_open
        self.memory_bytes = memory_bytes
        self._open = 0
        self._reserved = 0
        self._lock = threading.Lock()

    @property
    def open(self) -> int:
        """Requests held now."""
        with self._lock:
            return self._open

    @property
    def reserved(self) -> int:
        """Bytes reserved now."""
        with self._lock:
            return self._reserved

    def enter(self) -> Ticket:
        """Admit one request; raises :class:`ApiError` 429 when ``max_open`` are held."""
        with self._lock:
            if self._open >= self.max_open:
                raise ApiError(429, f"the server holds {self._open} requests already (its limit, --max-queue): "
                                    "retry later", code="server_busy")
            self._open += 1
        return Ticket(self)

    def _reserve(self, nbytes: int, what: str) -> None:
        if nbytes > self.memory_bytes:
            raise ApiError(413, f"{what} would take {nbytes / MB:,.1f} MiB, more than this server's whole memory "
                                f"budget for requests ({self.memory_bytes / MB:,.0f} MiB, --max-inflight-mb)",
                           code="request_too_large")
        with self._lock:
            if self._reserved + nbytes > self.memory_bytes:
                raise ApiError(429, f"{what} needs {nbytes / MB:,.1f} MiB, and the requests in progress hold "
                                    f"{self._reserved / MB:,.1f} of the {self.memory_bytes / MB:,.0f} MiB this "
                                    "server allows (--max-inflight-mb): retry later", code="server_busy")
            self._reserved += nbytes

    def _release(self, nbytes: int, leave: bool) -> None:
        with self._lock:
            self._reserved -= nbytes
            if leave:
                self._open -= 1


class Ticket:
    """One admitted request: its reservations, and what to clean up, until :meth:`close` (idempotent)."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._held = 0
        self._cleanups: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self.closed = False

    def reserve(self, nbytes: int, what: str) -> None:
        """Reserve ``nbytes`` more for this request; raises :class:`ApiError` 429 (busy) or 413 (never fits)."""
        if nbytes <= 0:
            return
        self._admission._reserve(nbytes, what)
        with self._lock:
            self._held += nbytes

    @property
    def held(self) -> int:
        """Bytes this request has reserved."""
        return self._held

    def on_close(self, cleanup: Callable[[], None]) -> None:
        """Run ``cleanup`` when the ticket closes (e.g. remove a temporary file)."""
        with self._lock:
            self._cleanups.append(cleanup)

    def close(self) -> None:
        """Release the reservations and the request's place; run the cleanups."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            held, self._held = self._held, 0
            cleanups, self._cleanups = self._cleanups, []
        self._admission._release(held, leave=True)
        for cleanup in cleanups:
            cleanup()
