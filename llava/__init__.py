"""Slow-Fast video multimodal LLMs in the LLaVA layout."""

__version__ = "0.1.0"
