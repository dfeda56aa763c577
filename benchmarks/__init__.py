"""Benchmarks of the Slow-Fast video LLM: prefill compute, decode speed, vision encoding memory, video
decoding and training steps. Run ``python -m benchmarks --help``; results go to ``benchmarks/results/``."""
