"""Small runtime helpers."""

from __future__ import annotations

import logging
import os
import sys

import torch


def disable_torch_init() -> None:
    """Skip default weight initialisation of Linear and LayerNorm layers.

    Weights are about to be overwritten by a checkpoint, so the random init is wasted time.
    This patches the classes globally for the rest of the process.
    """

    def _noop(self: torch.nn.Module) -> None:
        return None

    torch.nn.Linear.reset_parameters = _noop
    torch.nn.LayerNorm.reset_parameters = _noop


_FORMAT = "%(asctime)s | %(levelname)s | %(name)s | %(message)s"


def build_logger(name: str, filename: str | None = None, level: int = logging.INFO) -> logging.Logger:
    """Return a logger writing to stderr and, if ``filename`` is given, to that file as well.

    Calling it again with the same name does not add duplicate handlers.
    """
    logger = logging.getLogger(name)
    logger.setLevel(level)
    formatter = logging.Formatter(_FORMAT, datefmt="%Y-%m-%d %H:%M:%S")

    if not any(getattr(h, "_llava_stream", False) for h in logger.handlers):
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(formatter)
        stream._llava_stream = True  # type: ignore[attr-defined]
        logger.addHandler(stream)

    if filename is not None:
        path = os.path.abspath(filename)
        known = {getattr(h, "baseFilename", None) for h in logger.handlers}
        if path not in known:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            file_handler = logging.FileHandler(path, encoding="utf-8")
            file_handler.setFormatter(formatter)
            logger.addHandler(file_handler)

    return logger
