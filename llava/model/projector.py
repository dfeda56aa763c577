"""Projectors from vision features to the language model's width (``model.mm_projector``)."""

from __future__ import annotations

from torch import nn


class ProjectorLinear(nn.Linear):
    """A projector layer. Same parameters as ``nn.Linear``; the type lets the model initialise a new projector
    the way LLaVA does (PyTorch's default Linear init, not the language model's ``initializer_range``): with
    0.02-normal weights two layers shrink the vision features about a hundredfold, and a projector trained from
    scratch then mostly learns its bias."""


def build_projector(projector_type: str, vision_hidden_size: int, hidden_size: int) -> nn.Module:
    """``mlp2x_gelu``: Linear, GELU, Linear (keys ``0.*`` and ``2.*``); ``linear``; ``identity``.

    Maps ``[..., vision_hidden_size]`` to ``[..., hidden_size]``.
    """
    if projector_type == "mlp2x_gelu":
        return nn.Sequential(
            ProjectorLinear(vision_hidden_size, hidden_size), nn.GELU(), ProjectorLinear(hidden_size, hidden_size)
        )
    if projector_type == "linear":
        return ProjectorLinear(vision_hidden_size, hidden_size)
    if projector_type == "identity":
        if vision_hidden_size != hidden_size:
            raise ValueError(
                f"mm_projector_type='identity' needs mm_hidden_size ({vision_hidden_size}) == hidden_size ({hidden_size})"
            )
        return nn.Identity()
    raise ValueError(f"mm_projector_type={projector_type!r} is not supported; use mlp2x_gelu, linear or identity")
