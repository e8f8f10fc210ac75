"""A tiny SD1.5-shaped checkpoint file that ComfyUI's own Load Checkpoint node loads.

ComfyUI recognises a checkpoint by matching its U-Net's shape against the model families in
`comfy.supported_models.models`; SD1.5's entry wants 320 base channels (an 860M-parameter U-Net).
`register_tiny_family()` adds one more family, SD1.5's class with 32 base channels and a 2-layer,
64-wide CLIP text encoder (SD1.5's tokenizer), the way a custom node pack adds a model family.
`save_tiny_checkpoint()` then builds that model with seeded weights and writes it with ComfyUI's
own `comfy.sd.save_checkpoint` (U-Net, CLIP and a TAESD-shaped VAE), about 20 MB.
"""

from __future__ import annotations

from pathlib import Path

from livecache.bench.comfy_workloads import _init_weights

CONTEXT = 64
CLIP_CONFIG = {
    "hidden_act": "quick_gelu", "hidden_size": CONTEXT, "intermediate_size": 4 * CONTEXT, "num_attention_heads": 2,
    "num_hidden_layers": 2, "max_position_embeddings": 77, "vocab_size": 49408, "layer_norm_eps": 1e-5,
    "bos_token_id": 0, "eos_token_id": 49407, "pad_token_id": 1, "projection_dim": CONTEXT,
}


def register_tiny_family() -> type:
    import comfy.sd1_clip
    import comfy.supported_models
    import comfy.supported_models_base

    for family in comfy.supported_models.models:
        if family.__name__ == "TinySD15":
            return family

    class TinyClip(comfy.sd1_clip.SDClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):  # noqa: B006 (ComfyUI's signature)
            super().__init__(device=device, return_projected_pooled=False, dtype=dtype, model_options=model_options,
                             textmodel_json_config=dict(CLIP_CONFIG))

    class TinyClipModel(comfy.sd1_clip.SD1ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):  # noqa: B006
            super().__init__(device=device, dtype=dtype, model_options=model_options, clip_model=TinyClip, **kwargs)

    class TinySD15(comfy.supported_models.SD15):
        unet_config = {**comfy.supported_models.SD15.unet_config, "context_dim": CONTEXT, "model_channels": 32}
        unet_extra_config = {"num_heads": 2, "num_head_channels": -1}

        def clip_target(self, state_dict={}):  # noqa: B006
            return comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, TinyClipModel)

    comfy.supported_models.models.insert(0, TinySD15)
    return TinySD15


def save_tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    """Write the tiny model's checkpoint to `path` (a .safetensors file) with ComfyUI's own saver."""
    import comfy.model_patcher
    import comfy.sd
    import comfy.taesd.taesd
    import torch

    family = register_tiny_family()
    config = family({"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
                     "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 32,
                     "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
                     "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
                     "context_dim": CONTEXT, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
                     "use_temporal_attention": False, "use_temporal_resblock": False, "num_heads": 2,
                     "num_head_channels": -1})
    config.set_inference_dtype(torch.float32, None)
    base = config.get_model({}, device=torch.device("cpu"))
    _init_weights(base.diffusion_model, seed)
    model = comfy.model_patcher.ModelPatcher(base, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    clip = comfy.sd.CLIP(config.clip_target())
    _init_weights(clip.cond_stage_model, seed + 1)
    for embedding in clip.cond_stage_model.modules():
        if isinstance(embedding, torch.nn.Embedding):
            torch.nn.init.normal_(embedding.weight, std=0.02, generator=torch.Generator().manual_seed(seed + 2))
    taesd = comfy.taesd.taesd.TAESD()
    _init_weights(taesd, seed + 3)
    comfy.sd.save_checkpoint(str(path), model, clip, comfy.sd.VAE(sd=taesd.state_dict()))
    return path
