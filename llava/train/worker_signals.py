"""DataLoader workers that leave stop signals to their trainer.

A cluster stops a job by signalling every process of it, DataLoader workers included. PyTorch's workers die on
``SIGTERM`` (their own handler re-raises it), and the trainer then fails with "DataLoader worker ... is killed by
signal"; a forked worker also inherits the trainer's Python handlers and would act on ``SIGUSR1`` as if it were a
trainer. :func:`shield_workers` makes a training DataLoader's workers ignore ``SIGUSR1`` and ``SIGTERM``:

- its ``worker_init_fn`` sets both to ``SIG_IGN`` (then runs the loader's own ``worker_init_fn``);
- its multiprocessing context blocks both signals in the trainer while it starts a worker, so a worker is born with
  them blocked and a signal that reaches it before ``worker_init_fn`` waits, then is discarded when the worker
  ignores it. The trainer gets its own pending signal as soon as the worker has started.

A worker whose trainer is gone still exits on its own (PyTorch's workers watch their parent).
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import signal
from collections.abc import Callable, Iterator
from multiprocessing import context as mp_context

__all__ = ["STOP_SIGNALS", "shield_workers"]

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


@contextlib.contextmanager
def _stop_signals_blocked() -> Iterator[None]:
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class _StartsBlocked:
    """Mixin for a ``multiprocessing`` process class: ``start()`` with the stop signals blocked."""

    def start(self) -> None:
        with _stop_signals_blocked():
            super().start()


# One subclass per start method, defined at module level: spawn and forkserver pickle the process object.
class _ForkProcess(_StartsBlocked, mp_context.ForkProcess):
    pass


class _SpawnProcess(_StartsBlocked, mp_context.SpawnProcess):
    pass


class _ForkContext(mp_context.ForkContext):
    Process = _ForkProcess


class _SpawnContext(mp_context.SpawnContext):
    Process = _SpawnProcess


_SHIELDED_CONTEXTS: dict[type, type] = {mp_context.ForkContext: _ForkContext, mp_context.SpawnContext: _SpawnContext}

if hasattr(mp_context, "ForkServerContext"):  # POSIX

    class _ForkServerProcess(_StartsBlocked, mp_context.ForkServerProcess):
        pass

    class _ForkServerContext(mp_context.ForkServerContext):
        Process = _ForkServerProcess

    _SHIELDED_CONTEXTS[mp_context.ForkServerContext] = _ForkServerContext


def _shielded_context(given) -> mp_context.BaseContext | None:
    """The multiprocessing context of ``given`` (``None``: the default start method, a name, or a context) whose
    processes start with the stop signals blocked; ``given`` itself when it is not one of the standard kinds."""
    base = multiprocessing.get_context(given) if given is None or isinstance(given, str) else given
    if type(base) in _SHIELDED_CONTEXTS.values():
        return base
    shielded = _SHIELDED_CONTEXTS.get(type(base))
    return shielded() if shielded is not None else base


def _ignore_stop_signals(worker_id: int, then: Callable[[int], None] | None = None) -> None:
    """``worker_init_fn``: ignore ``SIGUSR1``/``SIGTERM`` in this DataLoader worker (a pending one is discarded),
    unblock them, then run the loader's own ``worker_init_fn`` (``then``)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    if then is not None:
        then(worker_id)


def _torch_dataloader(dataloader):
    """The ``torch.utils.data.DataLoader`` inside accelerate's wrappers (which keep it as ``base_dataloader`` and
    forward attribute reads to it, not writes)."""
    while "base_dataloader" in vars(dataloader):
        dataloader = vars(dataloader)["base_dataloader"]
    return dataloader


def shield_workers(dataloader):
    """Make the workers of ``dataloader`` (a ``torch.utils.data.DataLoader``, accelerate's wrappers included)
    ignore stop signals: its ``worker_init_fn`` is composed with :func:`_ignore_stop_signals` and its
    multiprocessing context starts workers with the signals blocked. Without workers it is left as it is.

    Returns:
        ``dataloader``.
    """
    loader = _torch_dataloader(dataloader)
    if getattr(loader, "num_workers", 0) <= 0:
        return dataloader
    init = loader.worker_init_fn
    if not (isinstance(init, functools.partial) and init.func is _ignore_stop_signals):
        loader.worker_init_fn = functools.partial(_ignore_stop_signals, then=init)
    loader.multiprocessing_context = _shielded_context(loader.multiprocessing_context)
    return dataloader
