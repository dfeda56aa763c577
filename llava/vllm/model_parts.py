"""The timm-free modules of ``llava/model`` (the configuration and the slow/fast split), importable without
running ``llava/model/__init__.py``.

That ``__init__`` imports the whole transformers model, whose vision tower imports timm, and timm imports
torchvision, which does not load in vLLM's CPU build (a CPU-only torch beside PyPI's CUDA torchvision). This module
is a package alias whose search path is ``llava/model``: ``llava.vllm.model_parts.slow_fast`` is the file
``llava/model/slow_fast.py``, executed as a module of this package, so the plugin shares the project's code for the
configuration and the token split instead of keeping copies. Only modules that import nothing beyond torch,
transformers and each other may be imported through it (``configuration_llava_qwen_slow_fast``, ``slow_fast``).
"""

import os

import llava

__path__ = [os.path.join(os.path.dirname(os.path.abspath(llava.__file__)), "model")]
