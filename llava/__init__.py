"""Slow-Fast video multimodal LLMs in the LLaVA layout.

- ``model``: the model, its configuration, caches, vision tower and loaders (``llava.model.builder``);
- ``train``: the trainer, data loading and mixtures, stopping and checkpoints;
- ``serve``: the CLI, the OpenAI-compatible server and the web demo;
- ``eval``: the lmms-eval plugin;
- ``vllm``: the vLLM plugin (the model for vLLM's engine, its processing and video loader);
- ``video``: decoding and sampling frames; ``video_index``: what a container says before decoding (packet index,
  frame rates, :class:`VideoLoadError`); ``media_gate``: the one gate every media input passes (allowed containers,
  codecs and image formats, bounds read from the header, decode deadlines);
- ``mm_utils``: prompt tokenisation and image preprocessing;
- ``conversation``: chat templates; ``constants``: token ids and types; ``utils``: logging and start-up helpers.
"""

__version__ = "0.1.0"
