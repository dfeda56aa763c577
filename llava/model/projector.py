"""Projectors from vision features to the language model's width (``model.mm_projector``)."""

from __future__ import annotations

from torch import nn


def build_projector(projector_type: str, vision_hidden_size: int, hidden_size: int) -> nn.Module:
    """``mlp2x_gelu``: Linear, GELU, Linear (keys ``0.*`` and ``2.*``); ``linear``; ``identity``.

    Maps ``[..., vision_hidden_size]`` to ``[..., hidden_size]``.
    """
    if projector_type == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(vision_hidden_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size))
    if projector_type == "linear":
        return nn.Linear(vision_hidden_size, hidden_size)
    if projector_type == "identity":
        if vision_hidden_size != hidden_size:
            raise ValueError(
                f"mm_projector_type='identity' needs mm_hidden_size ({vision_hidden_size}) == hidden_size ({hidden_size})"
            )
        return nn.Identity()
    raise ValueError(f"mm_projector_type={projector_type!r} is not supported; use mlp2x_gelu, linear or identity")
