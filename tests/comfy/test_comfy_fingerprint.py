"""The weights fingerprint on ComfyUI's MODEL lane: hashed once per patch set, never stale after a LoRA changes.

Hashing reads every weight (seconds on an SD1.5 U-Net), and a CacheQuant MODEL checks its schedule's
fingerprint at the start of every sampling run. These tests count the hashes (never time them).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from livecache.accel import cache_schedule
from livecache.accel.cachequant import CacheQuantConfig
from livecache.adapters import comfy_unet
from livecache.adapters.comfy_cachequant import SamplerRun, apply_cachequant, calibrate_cachequant, fingerprint_of
from livecache.bench.comfy_workloads import sample

sys.path.insert(0, str(Path(__file__).parent))  # the tests run in importlib mode: the helpers sit beside them
from loras import with_lora  # noqa: E402

STEPS = 4
SIZE = 16


@pytest.fixture
def hashes(monkeypatch):
    """The modules whose parameters were hashed, in order (every full fingerprint computation)."""
    seen = []
    real = cache_schedule._hash_parameters
    monkeypatch.setattr(cache_schedule, "_hash_parameters", lambda module: seen.append(module) or real(module))
    return seen


def run(model, conds) -> torch.Tensor:
    return sample(model, *conds, seed=3, steps=STEPS, cfg=5.0, size=SIZE)


def test_fingerprint_is_hashed_once_per_patch_set_and_follows_every_lora_change(sd15_factory, hashes):
    model = sd15_factory(11)
    base = fingerprint_of(model)
    assert fingerprint_of(model) == base and len(hashes) == 1  # same weights: remembered
    lora = with_lora(model)
    with_one = fingerprint_of(lora)
    assert with_one != base and len(hashes) == 2  # a LoRA: new weights, hashed
    assert fingerprint_of(lora) == with_one and len(hashes) == 2
    stronger = with_lora(model, strength=0.6)  # the same LoRA at another strength: another patch set
    assert fingerprint_of(stronger) not in (base, with_one) and len(hashes) == 3
    assert fingerprint_of(model) == base  # back to the bare checkpoint: its own fingerprint, not the LoRA's


def test_a_cachequant_run_rehashes_only_when_the_weights_change(sd15_factory, cond_factory, hashes, monkeypatch):
    model = sd15_factory(12)
    conds = cond_factory(8, 1), cond_factory(8, 2)
    run_inputs = SamplerRun(*conds, {"samples": torch.zeros(1, 4, SIZE, SIZE)}, (0,), STEPS, 5.0, "euler", "normal")
    plan = calibrate_cachequant(model, CacheQuantConfig(full_steps=2, quant=None), run_inputs, objective="feature")
    patched = apply_cachequant(model, plan)
    calibrated = len(hashes)
    run(patched, conds)
    run(patched, conds)
    assert len(hashes) == calibrated  # the schedule checks of both runs were served from the calibration's hash
    with pytest.raises(ValueError, match="calibrated for model"):
        run(with_lora(patched), conds)  # a LoRA after the node: rehashed, and the stale schedule refused
    assert len(hashes) == calibrated + 1
    # without ComfyUI's patch-state token every run hashes the whole U-Net again (what each run cost before)
    monkeypatch.setattr(comfy_unet, "weights_version", lambda _patcher: None)
    run(patched, conds)
    assert len(hashes) == calibrated + 2
