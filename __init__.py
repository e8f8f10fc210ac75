"""LiveCache: training-free diffusion acceleration as ComfyUI blocks, plus a real-time runtime.

This file is the ComfyUI entry point (the repository root is the custom-node folder) and the
`livecache` package root when installed with pip. Imports stay relative so both uses work.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

# Only the ComfyUI frontend extension lives here: ComfyUI loads every .js file under this folder,
# so the live-session page is kept apart in web/live/.
WEB_DIRECTORY = "./web/comfyui"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
