"""Where nodes read models from, write images to and report progress, inside ComfyUI or headless.

Inside ComfyUI its `folder_paths` decides (models/diffusers, the output folder); headless, the
`LIVECACHE_MODELS` (os.pathsep-separated) and `LIVECACHE_OUTPUT` variables do, which the CLI sets
from `--models`/`--output`. Model folders are confined to these roots: a workflow cannot make a
node read from anywhere else.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..accel.progress import Progress


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


def host_progress() -> Progress:
    """The `Progress` for a node's long loop: ComfyUI's progress bar and Cancel button when ComfyUI hosts it.

    Inside ComfyUI each step first calls `throw_exception_if_processing_interrupted` (Cancel, i.e.
    `POST /interrupt`, sets the flag it reads; the exception it raises is how ComfyUI's own
    samplers stop) and then moves the running node's `comfy.utils.ProgressBar`. Headless, the
    loops show their console (tqdm) bars only.
    """
    try:
        import comfy.model_management as management  # ComfyUI's own modules; present only inside ComfyUI
        import comfy.utils as comfy_utils
    except ImportError:
        return Progress()
    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:  # created at the first report, inside the node's run: it finds the running node
            bar = comfy_utils.ProgressBar(total)
        bar.update_absolute(done, total)

    return Progress(update, management.throw_exception_if_processing_interrupted)
