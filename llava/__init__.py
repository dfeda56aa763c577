"""Slow-Fast video multimodal LLMs in the LLaVA layout.

- ``model``: the model, its configuration, caches, vision tower and loaders (``llava.model.builder``);
- ``train``: the trainer, data loading and mixtures, stopping and checkpoints;
- ``serve``: the CLI, the OpenAI-compatible server and the web demo;
- ``eval``: the lmms-eval plugin;
- ``video``: decoding and sampling frames; ``mm_utils``: prompt tokenisation and image preprocessing;
- ``conversation``: chat templates; ``constants``: token ids and types; ``utils``: logging and start-up helpers.
"""

__version__ = "0.1.0"
