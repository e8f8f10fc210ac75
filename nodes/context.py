"""Where nodes read models from and write images to, inside ComfyUI or in the headless runner.

Inside ComfyUI its `folder_paths` decides (models/diffusers, the output folder); headless, the
`LIVECACHE_MODELS` (os.pathsep-separated) and `LIVECACHE_OUTPUT` variables do, which the CLI sets
from `--models`/`--output`. Model folders are confined to these roots: a workflow cannot make a
node read from anywhere else.
"""

from __future__ import annotations

import os
from pathlib import Path


def _comfy_folder_paths():
    try:
        import folder_paths  # ComfyUI's own module; present only inside ComfyUI

        return folder_paths
    except ImportError:
        return None


def model_roots() -> list[Path]:
    roots = [Path(p) for p in os.environ.get("LIVECACHE_MODELS", "").split(os.pathsep) if p]
    comfy = _comfy_folder_paths()
    if comfy is not None:
        roots += [Path(p) for p in comfy.get_folder_paths("diffusers")]
    return roots or [Path.cwd() / "models"]


def input_roots() -> list[Path]:
    """Where input files (audio clips) are read from: `LIVECACHE_INPUT` headless, ComfyUI's input folder."""
    roots = [Path(p) for p in os.environ.get("LIVECACHE_INPUT", "").split(os.pathsep) if p]
    comfy = _comfy_folder_paths()
    if comfy is not None:
        roots.append(Path(comfy.get_input_directory()))
    return roots or [Path.cwd() / "input"]


def output_dir() -> Path:
    if "LIVECACHE_OUTPUT" in os.environ:
        return Path(os.environ["LIVECACHE_OUTPUT"])
    comfy = _comfy_folder_paths()
    return Path(comfy.get_output_directory()) if comfy is not None else Path.cwd() / "output"
