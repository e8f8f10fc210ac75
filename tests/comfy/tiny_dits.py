"""Tiny random instances of ComfyUI's own DiT classes (`comfy.ldm`), each in a ModelPatcher, as a checkpoint loads them.

Each family is built through its `comfy.supported_models` entry (the config ComfyUI's model detection would
produce, shrunk to a narrow model with a few blocks), so the MODEL is ComfyUI's model class around ComfyUI's
diffusion model class, sampled by ComfyUI's own sampling code. ComfyUI leaves layers uninitialised
(checkpoints fill them): every parameter is drawn from a private seeded generator.

Families whose model detection reads every size from the weights (SD3: width 64 per block; Wan: 128 per
head) are then saved with ComfyUI's own code and loaded back through its diffusion-model loader (what
UNETLoader runs), so ComfyUI's detection picks the family, exactly as for a user's file. The others' detection
fixes sizes that only full-sized models have (Flux: 24 heads; Qwen-Image: width 3072), so they stay as built.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from livecache.bench.comfy_workloads import seeded_weights


@dataclass(frozen=True)
class TinyDiT:
    """How to build one family's tiny MODEL and what its sampler inputs look like."""

    supported_model: str  # the class name in comfy.supported_models
    config: dict[str, Any]
    latent_channels: int
    context_dim: int
    cond_extras: dict[str, Any] = field(default_factory=dict)  # per-cond entries (pooled output, guidance)
    latent_frames: int = 0  # > 0: a video latent [B, C, T, H, W]
    detectable: bool = False  # ComfyUI's model detection finds this config in the saved weights


FAMILIES: dict[str, TinyDiT] = {
    "flux": TinyDiT("Flux", {
        "image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 32, "context_in_dim": 32,
        "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2, "depth": 2, "depth_single_blocks": 3,
        "axes_dim": [8, 12, 12], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True},
        latent_channels=16, context_dim=32, cond_extras={"pooled_output": (1, 32), "guidance": 3.5}),
    # what detection reads from SD3's weights: width 64 x depth, one head per block, 16x16 position table
    "sd3": TinyDiT("SD3", {
        "in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 4, "input_size": None,
        "adm_in_channels": 32, "context_embedder_config": {"target": "torch.nn.Linear",
                                                           "params": {"in_features": 32, "out_features": 256}},
        "num_patches": 256, "pos_embed_max_size": 16, "pos_embed_scaling_factor": None, "qk_norm": "rms",
        "x_block_self_attn_layers": []},
        latent_channels=16, context_dim=32, cond_extras={"pooled_output": (1, 32)}, detectable=True),
    # Wan's detection: one head per 128 channels; the text width is fixed at 4096 by the model class
    "wan": TinyDiT("WAN21_T2V", {
        "image_model": "wan2.1", "model_type": "t2v", "dim": 128, "ffn_dim": 128, "num_heads": 1, "num_layers": 4,
        "in_dim": 16, "out_dim": 16, "text_dim": 4096, "patch_size": (1, 2, 2), "freq_dim": 256,
        "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6},
        latent_channels=16, context_dim=4096, latent_frames=2, detectable=True),
    "qwen_image": TinyDiT("QwenImage", {
        "image_model": "qwen_image", "in_channels": 64, "out_channels": 16, "num_layers": 4, "attention_head_dim": 32,
        "num_attention_heads": 2, "joint_attention_dim": 32, "axes_dims_rope": (8, 12, 12)},
        latent_channels=16, context_dim=32, latent_frames=1),
    "lumina2": TinyDiT("Lumina2", {
        "image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 64, "cap_feat_dim": 32, "n_layers": 4,
        "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 2, "qk_norm": True, "axes_dims": [8, 12, 12],
        "axes_lens": [300, 64, 64], "rope_theta": 10000.0, "ffn_dim_multiplier": 2.0},
        latent_channels=16, context_dim=32),
}


def tiny_dit(family: str, seed: int = 0) -> Any:
    """ComfyUI's MODEL of `family` with seeded random weights, on the CPU (through ComfyUI's loader where its
    detection can find the family)."""
    built = _built(family, seed)
    if not FAMILIES[family].detectable:
        return built
    with tempfile.TemporaryDirectory() as folder:
        path = save_dit(built, Path(folder) / f"{family}.safetensors")
        return load_dit(path, family)


def save_tiny_dit(family: str, path: Path, seed: int = 0) -> Path:
    """Write `family`'s tiny diffusion-model file (what a user puts in `models/diffusion_models`)."""
    return save_dit(_built(family, seed), path)


def save_dit(model: Any, path: Path) -> Path:
    """Save a MODEL's diffusion model as a diffusion-model file (what `models/diffusion_models` holds), with
    ComfyUI's own writer."""
    import comfy.utils

    comfy.utils.save_torch_file(model.model.diffusion_model.state_dict(), str(path))
    return path


def load_dit(path: Path, family: str) -> Any:
    """Load a diffusion-model file through ComfyUI's loader; its model detection must pick `family`."""
    import comfy.sd

    model = comfy.sd.load_diffusion_model(str(path))
    found = type(model.model.model_config).__name__
    if found != FAMILIES[family].supported_model:
        raise AssertionError(f"ComfyUI detected {found} in {path.name}, not {FAMILIES[family].supported_model}")
    return model


def _built(family: str, seed: int) -> Any:
    import comfy.model_patcher
    import comfy.supported_models

    spec = FAMILIES[family]
    model_config = getattr(comfy.supported_models, spec.supported_model)(dict(spec.config))
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({}, device=torch.device("cpu"))
    seeded_weights(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def conditioning(family: str, seed: int) -> list[list[Any]]:
    """A CONDITIONING value for `family` with seeded random text embeddings (and pooled output)."""
    spec = FAMILIES[family]
    generator = torch.Generator().manual_seed(seed)
    extras = {key: torch.randn(*value, generator=generator) if isinstance(value, tuple) else value
              for key, value in spec.cond_extras.items()}
    return [[torch.randn(1, 8, spec.context_dim, generator=generator), extras]]


def latent(family: str, size: int = 8) -> torch.Tensor:
    spec = FAMILIES[family]
    frames = (spec.latent_frames,) if spec.latent_frames else ()
    return torch.zeros(1, spec.latent_channels, *frames, size, size)
