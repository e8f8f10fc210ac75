"""`livecache bench dit --comfy-root DIR`, part (c): ComfyUI's own Flux class through ComfyUI's KSampler path.

ComfyUI's `Flux` model (comfy.ldm.flux, in a ModelPatcher, built from its `comfy.supported_models` entry)
with seeded random weights (`comfy_workloads.seeded_weights`), fp32 and a bf16 copy of the same weights,
sampled by `comfy.sample.sample` (what KSampler runs) with the same seed for every row: uncached fp32 and
bf16; ours through the nodes a user wires (Block Cache for MODEL, reuse and forecast; CacheQuant for
MODEL, its DP schedule calibrated through ComfyUI's sampler on other seeds, + W8A8); ComfyUI's own
EasyCache and LazyCache nodes. Rows are `dit_bench.Row`s (the same columns, JSON and plot); block
calls count transformer blocks whose first Linear ran (a skipped block, or a call a peer answers, does not).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import torch

from ..adapters.comfy_dit import layout_of
from ..nodes.comfy_dit_nodes import BlockCacheModel
from ..nodes.comfy_model_nodes import CacheQuantModel
from .comfy_workloads import PEER_CACHES, seeded_weights, with_peer_cache
from .scoring import fidelity_ssim, timed_rounds

WORK = "ComfyUI Flux"


def flux_config(hidden: int, heads: int, depth: int, single: int) -> dict[str, Any]:
    """A Flux-shaped config for ComfyUI's Flux class: Flux's block types and order, narrower and shallower."""
    head = hidden // heads
    axes = [head - 2 * (3 * head // 8), 3 * head // 8, 3 * head // 8]
    return {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 64, "context_in_dim": 64,
            "hidden_size": hidden, "mlp_ratio": 4.0, "num_heads": heads, "depth": depth,
            "depth_single_blocks": single, "axes_dim": axes, "theta": 10000, "patch_size": 2, "qkv_bias": True,
            "guidance_embed": True}


def flux_model(config: dict[str, Any], dtype: torch.dtype, seed: int = 0) -> Any:
    """ComfyUI's Flux MODEL for `config`, on the CPU, computing in `dtype`, with the fp32 weights from `seed`
    (rounded to `dtype`: every dtype has the same weights)."""
    import comfy.model_patcher
    import comfy.supported_models

    def built(inference: torch.dtype) -> Any:
        model_config = comfy.supported_models.Flux(dict(config))
        model_config.set_inference_dtype(inference, None)
        return model_config.get_model({}, device=torch.device("cpu"))

    model = built(torch.float32)
    seeded_weights(model.diffusion_model, seed)
    if dtype != torch.float32:
        weights = model.diffusion_model.state_dict()
        model = built(dtype)
        model.diffusion_model.load_state_dict(weights)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def conditioning(seed: int, tokens: int = 16, width: int = 64) -> list[list[Any]]:
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, tokens, width, generator=generator),
             {"pooled_output": torch.randn(1, width, generator=generator), "guidance": 3.5}]]


def comfy_flux_rows(config: dict[str, Any], size: int, steps: int, intervals: list[int], runs: int,
                    row_type: Callable[..., Any], log: Callable[[str], None]) -> list[Any]:
    """Every row on ComfyUI's Flux (`size`: the latent side), `runs` timed rounds after one untimed pass each."""
    fp32 = flux_model(config, torch.float32)
    positive, negative = conditioning(1), conditioning(2)
    latent = {"samples": torch.zeros(1, 16, size, size)}
    methods: dict[str, tuple[str, Any]] = {"uncached fp32": ("baseline", fp32),
                                           "uncached bf16": ("baseline", flux_model(config, torch.bfloat16))}
    for n in intervals:
        for mode in ("reuse", "forecast"):
            methods[f"ours block cache N={n} {mode}"] = ("ours", BlockCacheModel().apply(fp32, n, 0, 0, mode, 1)[0])
    k = -(-steps // max(intervals))
    methods[f"ours CacheQuant K={k} (feature DP) + W8A8"] = ("ours", CacheQuantModel().apply(
        fp32, positive, negative, latent, 100, 1, steps, 1.0, "euler", "simple", 1.0, "w8a8", True, True, k, 0,
        "feature")[0])
    for peer in PEER_CACHES:
        methods[f"ComfyUI {peer} (threshold 0.2)"] = ("peer", with_peer_cache(fp32, peer, 0.2))

    def generate(model: Any) -> tuple[torch.Tensor, int]:
        import comfy.sample

        calls = [0]
        blocks = layout_of(model.get_model_object("diffusion_model")).blocks
        hooks = [next(m for m in block.modules() if isinstance(m, torch.nn.Linear)).register_forward_hook(
            lambda *_: calls.__setitem__(0, calls[0] + 1)) for block in blocks]
        try:
            with torch.inference_mode():
                noise = comfy.sample.prepare_noise(latent["samples"], 0)
                out = comfy.sample.sample(model, noise, steps, 1.0, "euler", "simple", positive, negative,
                                          latent["samples"], seed=0, disable_pbar=True)
        finally:
            for hook in hooks:
                hook.remove()
        return out.float(), calls[0]

    rows = {name: row_type(WORK, name, family) for name, (family, _) in methods.items()}
    outputs: dict[str, torch.Tensor] = {}
    for name, (_, model) in methods.items():  # warm-up, fidelity output and block calls
        outputs[name], rows[name].block_calls = generate(model)
    timed_rounds(rows, list(methods), lambda name: generate(methods[name][1]), runs, WORK, log)
    base = statistics.median(rows["uncached fp32"].times)
    for name, row in rows.items():
        row.score(base, outputs[name], outputs["uncached fp32"])
        row.ssim = fidelity_ssim(outputs[name], outputs["uncached fp32"])
    return list(rows.values())

