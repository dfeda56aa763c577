"""Serving front ends: the command-line chat (``llava.serve.cli``)."""
