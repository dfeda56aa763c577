"""Playground scripts and tools that sit outside the installed ``llava`` package."""
