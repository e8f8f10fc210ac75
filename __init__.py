"""LiveCache: training-free diffusion acceleration as ComfyUI blocks, plus a real-time runtime.

This file is the ComfyUI entry point (the repository root is the custom-node folder) and the
`livecache` package root when installed with pip. Imports stay relative so both uses work.
"""

from __future__ import annotations

if __name__ != "livecache":  # loaded by ComfyUI as a custom-node folder (its own name): it reads them at once
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

# Only the ComfyUI frontend extension lives here: ComfyUI loads every .js file under this folder,
# so the live-session page is kept apart in web/live/.
WEB_DIRECTORY = "./web/comfyui"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]


def __getattr__(name: str) -> object:
    """The pip package's node mappings, imported on first use (PEP 562): `livecache --help`, the live server and
    the benches never read them, and the node classes import torch and every model family (seconds)."""
    if name in ("NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"):
        from . import nodes

        return getattr(nodes, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
