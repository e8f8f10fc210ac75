"""Embedded default models (tiny, trained by our own scripts, shipped as safetensors) and weight loading."""
