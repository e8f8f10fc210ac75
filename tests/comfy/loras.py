"""Random LoRAs for the tiny SD1.5-class models, loaded by ComfyUI's own LoRA code (shared by the MODEL tests)."""

from __future__ import annotations

import torch


def with_lora(model, rank: int = 4, strength: float = 0.3, seed: int = 5):
    """`model` with a random LoRA on every attention projection, applied by ComfyUI's own LoRA loader."""
    import comfy.sd

    generator = torch.Generator().manual_seed(seed)
    lora = {}
    for name, module in model.get_model_object("diffusion_model").named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v"):
            key = "lora_unet_" + name.replace(".", "_")
            lora[f"{key}.lora_up.weight"] = torch.randn(module.out_features, rank, generator=generator) * 0.3
            lora[f"{key}.lora_down.weight"] = torch.randn(rank, module.in_features, generator=generator) * 0.3
    patched, _ = comfy.sd.load_lora_for_models(model, None, lora, strength, 0.0)
    assert len(patched.patches) == len(lora) // 2  # every LoRA key found its layer
    return patched
