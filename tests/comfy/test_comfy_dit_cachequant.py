"""CacheQuant and its DP schedule on ComfyUI's own DiT MODELs (Flux, SD3, Wan, Qwen-Image, Lumina 2), calibrated
and sampled through ComfyUI's sampler by the same nodes as on a U-Net MODEL: the cached feature is the residual
of the family's default block span (the core of the diffusers DiT CacheQuant).

Real ComfyUI 0.3.75; each model is a tiny random instance of ComfyUI's own class (`tiny_dits`).
"""

# ruff: noqa: F811  (the tests take the shared fixtures imported from test_comfy_dit as arguments)
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from livecache.adapters.comfy_dit import layout_of
from livecache.nodes.comfy_model_nodes import CacheQuantModel, CalibrateScheduleModel

sys.path.insert(0, str(Path(__file__).parent))  # the tests run in importlib mode: the helpers sit beside them
from test_comfy_dit import STEPS, family, model, run, uncached, untouched  # noqa: E402, F401 (fixtures)
from tiny_dits import conditioning, latent  # noqa: E402

FULL = 4  # full steps of the DP schedule, out of STEPS


def sampler_inputs(family: str) -> tuple:
    """What KSampler gets in `test_comfy_dit.run` (cfg 2, euler/simple), one calibration seed: the nodes' inputs."""
    return (conditioning(family, 1), conditioning(family, 2), {"samples": latent(family)}, 0, 1, STEPS, 2.0,
            "euler", "simple", 1.0)


def cachequant(model, family: str, quantization: str = "w8a8", schedule=None, objective: str = "feature"):
    return CacheQuantModel().apply(model, *sampler_inputs(family), quantization, True, True, FULL, 0, objective,
                                   schedule)[0]


def span_counts(model, counts: list[int]) -> tuple[list[int], list[int]]:
    first, stop = layout_of(model.get_model_object("diffusion_model")).default_span()
    return ([c for i, c in enumerate(counts) if first <= i < stop],
            [c for i, c in enumerate(counts) if not first <= i < stop])


def relative_error(out: torch.Tensor, base: torch.Tensor) -> float:
    return float((out - base).norm() / base.norm())


def test_cachequant_caches_the_span_quantizes_and_leaves_the_model_as_it_was(model, family, uncached):
    patched = cachequant(model, family)
    out, counts = run(patched, family)
    in_span, outside = span_counts(model, counts)
    assert in_span == [FULL] * len(in_span) and outside == [STEPS] * len(outside), counts
    base, _ = uncached
    assert torch.isfinite(out).all() and not torch.equal(out, base)
    assert relative_error(out, base) < 0.5, relative_error(out, base)
    again, again_counts = run(model, family)  # the input MODEL samples exactly as before
    assert torch.equal(again, base) and again_counts == uncached[1] and untouched(model)


def test_output_schedule_feeds_cachequant_and_its_corrections_act(model, family, uncached):
    schedule = CalibrateScheduleModel().calibrate(model, *sampler_inputs(family), FULL, 0, "output", "")[0]
    first, stop = layout_of(model.get_model_object("diffusion_model")).default_span()
    assert schedule.k == FULL and schedule.steps == STEPS and schedule.calibration["blocks"] == [first, stop]
    patched = cachequant(model, family, "none", schedule)
    out, counts = run(patched, family)
    in_span, outside = span_counts(model, counts)
    assert in_span == [FULL] * len(in_span) and outside == [STEPS] * len(outside), counts
    plain = cachequant(model, family, "none", schedule)  # a second clone of the same calibration: the same run
    assert torch.equal(run(plain, family)[0], out)
    uncorrected = CacheQuantModel().apply(model, *sampler_inputs(family), "none", False, False, FULL, 0, "feature",
                                          schedule)[0]
    assert not torch.equal(run(uncorrected, family)[0], out)  # the cache correction acts on the run
    assert torch.equal(run(model, family)[0], uncached[0]) and untouched(model)


def test_a_lora_from_comfyuis_loader_changes_the_cachequant_output(model, family):
    import comfy.sd

    generator = torch.Generator().manual_seed(5)
    lora = {}
    for name, module in model.get_model_object("diffusion_model").named_modules():
        if isinstance(module, nn.Linear) and ".0." in name:  # every Linear of each stage's first block
            key = "lora_unet_" + name.replace(".", "_")
            lora[f"{key}.lora_up.weight"] = torch.randn(module.out_features, 4, generator=generator) * 0.3
            lora[f"{key}.lora_down.weight"] = torch.randn(4, module.in_features, generator=generator) * 0.3
    with_lora, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)
    plain, _ = run(cachequant(model, family, "none"), family)
    lora_out, counts = run(cachequant(with_lora, family, "none"), family)
    assert not torch.equal(plain, lora_out) and span_counts(model, counts)[0][0] == FULL
    # a LoRA chained after the node changes the weights the plan was calibrated for: refused, naming it
    after = comfy.sd.load_lora_for_models(cachequant(model, family, "none"), None, lora, 1.0, 0.0)[0]
    with pytest.raises(ValueError, match="fingerprint|calibrated"):
        run(after, family)


def test_a_model_neither_u_net_nor_supported_dit_is_refused_naming_both(model, family):
    clone = model.clone()
    clone.add_object_patch("diffusion_model", nn.Linear(4, 4))
    with pytest.raises(TypeError, match=r"Linear.*U-Net.*Flux.*WanModel.*NextDiT"):
        cachequant(clone, family)
