"""Quantization and slicing on ComfyUI's own MODEL, with LoRAs, sampled by ComfyUI's KSampler path.

Real ComfyUI 0.3.75; the model is ComfyUI's SD1.5 class shrunk to 32 base channels with seeded random
weights (bench/comfy_workloads.py), the LoRA a random low-rank patch loaded by ComfyUI's own LoRA code.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from livecache.accel import quant_gemm
from livecache.accel.deepcache import DeepCacheConfig
from livecache.accel.quant import GEMM_LABELS, QuantConfig
from livecache.accel.slicing import SlicingConfig
from livecache.adapters.comfy_quant import LiveQuantization, apply_quantization, live_tensors
from livecache.adapters.comfy_unet import apply_deepcache, apply_slicing, entries_of
from livecache.bench.comfy_workloads import sample
from livecache.nodes.comfy_model_nodes import QuantizeModel, SlicingModel

sys.path.insert(0, str(Path(__file__).parent))  # the tests run in importlib mode: the helpers sit beside them
from loras import with_lora  # noqa: E402

STEPS = 6



def run(model, conds) -> torch.Tensor:
    return sample(model, *conds, seed=3, steps=STEPS, cfg=5.0, size=16)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def untouched(model) -> bool:
    return all("forward" not in m.__dict__ for m in model.get_model_object("diffusion_model").modules())


def test_quantize_model_runs_int8_on_the_cpu_and_leaves_the_input_untouched(model, conds):
    before = run(model, conds)
    stats = []
    (patched,) = QuantizeModel().apply(model, "w8a8", 8, 8)
    patched = apply_quantization(model, QuantConfig(), lambda session: stats.append(session))
    quantized = run(patched, conds)
    assert not torch.equal(quantized, before)  # it really quantized
    assert relative_error(quantized, before) < 0.05, relative_error(quantized, before)
    line, numbers = stats[0].report()
    assert line.startswith("W8A8: ") and "int8 (x86 kernels" in line and numbers["calls"] == STEPS, line
    assert torch.equal(run(model, conds), before) and untouched(model)


def test_quantized_lora_is_within_quantization_error_of_float_lora_before_or_after_the_node(model, conds):
    plain = run(model, conds)
    lora = with_lora(model)
    float_lora = run(lora, conds)
    lora_effect = relative_error(float_lora, plain)
    quant_error = relative_error(run(apply_quantization(model, QuantConfig()), conds), plain)
    assert lora_effect > 4 * quant_error, (lora_effect, quant_error)  # the LoRA changes far more than int8 does

    after_node = with_lora(apply_quantization(model, QuantConfig()))  # Quantize MODEL → LoRA → KSampler
    before_node = apply_quantization(lora, QuantConfig())  # LoRA → Quantize MODEL → KSampler
    for patched in (after_node, before_node):
        quantized_lora = run(patched, conds)
        # 0.042 measured against a quantization error of 0.041 without the LoRA (the LoRA moves the output 0.23)
        assert relative_error(quantized_lora, float_lora) < 1.5 * quant_error, \
            (relative_error(quantized_lora, float_lora), quant_error)
        assert relative_error(quantized_lora, plain) > 0.5 * lora_effect  # the LoRA still changes the output


def test_the_plan_is_rebuilt_when_the_patches_change_not_on_every_run(model, conds):
    patched = apply_quantization(model, QuantConfig())
    (entry,) = entries_of(patched)
    resolver: LiveQuantization = entry.resolve
    first = run(patched, conds)
    second = run(patched, conds)
    assert resolver.builds == 1 and torch.equal(first, second)
    lora = with_lora(patched)  # a later LoRA node clones the patcher: the entry (and its plan cache) goes with it
    run(lora, conds)
    assert resolver.builds == 2
    run(lora, conds)
    assert resolver.builds == 2


def test_low_vram_loading_patches_on_the_fly_and_the_plan_sees_the_patched_weights(model):
    """A low-VRAM load leaves the module weights unpatched and patches them per call (`weight_function`)."""
    import comfy.model_management

    comfy.model_management.unload_all_models()  # the last sampled patcher stays loaded (its LoRA merged) otherwise
    lora = with_lora(model, seed=7)
    layer_name = next(k[len("diffusion_model."):-len(".weight")] for k in lora.patches)
    cpu = torch.device("cpu")
    lora.patch_model(device_to=cpu)  # a full load: the LoRA is merged into the weights
    try:
        layer = lora.model.diffusion_model.get_submodule(layer_name)
        merged = layer.weight.detach().clone()
        full_plan = LiveQuantization(QuantConfig(backend="simulated"))(lora)
    finally:
        lora.unpatch_model(device_to=cpu)
    assert not torch.equal(layer.weight, merged)  # unpatched again: the merged weight differs from the checkpoint's
    lora.patch_model(device_to=cpu, lowvram_model_memory=1)  # nothing fits: every layer patched on the fly
    try:
        assert layer.weight_function and not torch.equal(layer.weight, merged)
        weight, _ = live_tensors(layer)
        torch.testing.assert_close(weight, merged, rtol=1e-5, atol=1e-6 * float(merged.abs().max()))
        low_plan = LiveQuantization(QuantConfig(backend="simulated"))(lora)
    finally:
        lora.unpatch_model(device_to=cpu)
    full, low = full_plan.layers[layer_name].fake_weight, low_plan.layers[layer_name].fake_weight
    torch.testing.assert_close(low, full, rtol=1e-5, atol=1e-5 * float(full.abs().max()))


def test_a_model_loaded_for_cuda_gets_the_8bit_gemm_and_fp8_runs_through_the_sampler(model, conds, monkeypatch):
    """ComfyUI loading for a GPU (its load device; no GPU here, so only the plan is built for it) gets the
    int8 GEMM on every layer; the fp8 GEMM samples here through `torch._scaled_mm` on the CPU, labelled."""
    on_gpu = model.clone()
    on_gpu.load_device = torch.device("cuda")
    assert LiveQuantization(QuantConfig())(on_gpu).backend == GEMM_LABELS["int8"]
    before = run(model, conds)
    stats = []
    quantized = run(apply_quantization(model, QuantConfig(backend="fp8"), stats.append), conds)
    line, numbers = stats[0].report()
    assert GEMM_LABELS["fp8"] in line and "ran cpu fp8 (torch._scaled_mm)" in line, line
    assert sum(numbers["kernels"].values()) > 0
    # e4m3 keeps 3 mantissa bits (a few % per value): through 6 steps of a random U-Net that is ~10 %
    error = relative_error(quantized, before)
    assert 0 < error < 0.25, error
    # the kernel is only how the product is summed: the dequantized fallback gives the same samples
    dequantized = quant_gemm.GemmKernel("fp8 dequantized", quant_gemm._dequantized)
    monkeypatch.setattr(quant_gemm, "kernel_for", lambda _grid, _device: dequantized)
    fallback = run(apply_quantization(model, QuantConfig(backend="fp8")), conds)
    assert relative_error(fallback, quantized) < 0.01 * error, relative_error(fallback, quantized)


def test_model_nodes_refuse_what_they_cannot_do(model):
    with pytest.raises(ValueError, match="W8A8 means 8-bit weights"):
        QuantizeModel().apply(model, "w8a8", 4, 8)
    with pytest.raises(ValueError, match="not available on a ComfyUI MODEL"):
        apply_quantization(model, QuantConfig("dgq", 4, 8, attention_bits=4))
    with pytest.raises(ValueError, match="holds no VAE"):
        apply_slicing(model, SlicingConfig())
    with pytest.raises(ValueError, match="batch axis only"):
        apply_slicing(model, SlicingConfig("spatial", vae=False))


def test_dgq_on_a_model_is_simulated_and_labelled(model, conds):
    stats = []
    (patched,) = QuantizeModel().apply(model, "dgq", 6, 8)
    patched = apply_quantization(model, entries_of(patched)[0].config.config, stats.append)
    latent = run(patched, conds)
    line, _ = stats[0].report()
    assert line.startswith("DGQ W6A8: ") and "simulated 6-bit" in line, line
    assert torch.isfinite(latent).all() and relative_error(latent, run(model, conds)) < 0.2


def test_slicing_model_computes_the_same_output_in_slices(model, conds):
    before = run(model, conds)
    stats = []
    (node_patched,) = SlicingModel().apply(model, 2)
    patched = apply_slicing(model, SlicingConfig("batch", 2, vae=False), stats.append)
    sliced = run(patched, conds)
    torch.testing.assert_close(sliced, before, rtol=1e-4, atol=1e-5 * float(before.abs().max()))
    assert stats[0].stats.slice_calls == 2 * stats[0].stats.group_calls > 0  # CFG's two halves, one at a time
    torch.testing.assert_close(run(node_patched, conds), before, rtol=1e-4, atol=1e-5 * float(before.abs().max()))
    assert untouched(model)


def test_slicing_stacks_with_deepcache_and_quantization_in_any_chain_order(model, conds):
    deepcache = DeepCacheConfig(cache_interval=2)
    cached = run(apply_deepcache(model, deepcache), conds)
    slicing = SlicingConfig("batch", 2, vae=False)
    for patched in (apply_deepcache(apply_slicing(model, slicing), deepcache),
                    apply_slicing(apply_deepcache(model, deepcache), slicing)):
        torch.testing.assert_close(run(patched, conds), cached, rtol=1e-4, atol=1e-5 * float(cached.abs().max()))
    both = apply_quantization(apply_slicing(apply_deepcache(model, deepcache), slicing), QuantConfig())
    assert relative_error(run(both, conds), cached) < 0.05
    assert untouched(model)
