"""ComfyUI-side workloads for `livecache bench comfy` and the real-ComfyUI tests.

Everything that touches ComfyUI lives below `adapters/` (or in the node classes), so the
benchmark asks this module for ComfyUI objects instead of importing ComfyUI itself:

- `use_comfyui(root)` (from graph.comfy_host) makes a ComfyUI checkout importable (the vendored copy in CI);
- `sd15_model(...)` builds ComfyUI's own SD1.5 model class (`supported_models.SD15` →
  `model_base.BaseModel` → `openaimodel.UNetModel`) with seeded random weights, wrapped in
  ComfyUI's `ModelPatcher`: no checkpoint is needed, and channel widths can be shrunk for tests;
- `sample(...)` runs ComfyUI's KSampler path (`comfy.sample.sample`), CFG batching included;
- `with_peer_cache(...)` applies ComfyUI's own EasyCache or LazyCache node, the peers we measure against.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..graph.comfy_host import use_comfyui  # noqa: F401  (the benches and tests make ComfyUI importable here)


def sd15_model(model_channels: int = 320, context_dim: int = 768, num_heads: int = 8, seed: int = 0,
               dtype: torch.dtype = torch.float32) -> Any:
    """ComfyUI's SD1.5 model with random weights drawn from `seed`, in a ModelPatcher on the CPU.

    The block layout is SD1.5's (channel_mult 1/2/4/4, two res blocks per level, attention on the
    first three levels); `model_channels`/`context_dim` shrink it for fast tests (GroupNorm needs
    multiples of 32). ComfyUI creates layers without initialising them (checkpoints fill them), so
    every layer is initialised here with torch's default init under a private seeded generator.
    """
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    if model_channels % 32 or model_channels < 32:
        raise ValueError(f"model_channels must be a positive multiple of 32 (GroupNorm), got {model_channels}")
    config = comfy.supported_models.SD15({
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "adm_in_channels": None, "dtype": dtype, "in_channels": 4,
        "model_channels": model_channels, "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
        "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
        "context_dim": context_dim, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        "use_temporal_attention": False, "use_temporal_resblock": False,
    })
    config.unet_extra_config = {"num_heads": num_heads, "num_head_channels": -1}
    config.unet_config.update(config.unet_extra_config)
    config.set_inference_dtype(dtype, None)
    model = config.get_model({}, device=torch.device("cpu"))
    _init_weights(model.diffusion_model, seed)
    model.diffusion_model.to(dtype)
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))


def seeded_weights(module: nn.Module, seed: int) -> None:
    """Norm scales 1, other free parameters and saved buffers small and random, every Linear/Conv torch's
    default init. The saved buffers too: ComfyUI allocates them empty as well (SD3's `pos_embed`, which its
    checkpoints carry), and memory left uninitialised holds whatever the allocator last freed (NaNs after
    another model's int8 weights were freed, so a test's outcome would hang on the tests that ran before)."""
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for layer in module.modules():
            for name, parameter in layer.named_parameters(recurse=False):
                if name in ("weight", "scale"):
                    parameter.fill_(1.0)
                else:
                    parameter.normal_(0.0, 0.02)
        saved = module.state_dict().keys()
        for name, buffer in module.named_buffers():
            if name in saved and buffer.is_floating_point():
                buffer.normal_(0.0, 0.02)
    _init_weights(module, seed)


def _init_weights(module: nn.Module, seed: int) -> None:
    """torch's default init for every layer ComfyUI left empty, reproducible from `seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for layer in module.modules():
            for base in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.GroupNorm, nn.LayerNorm):
                if isinstance(layer, base):
                    base.reset_parameters(layer)  # the torch class's init: ComfyUI's op classes skip it
                    break


def conditioning(batch: int, tokens: int, context_dim: int, seed: int) -> list[list[Any]]:
    """A ComfyUI CONDITIONING value with seeded random text embeddings (what CLIPTextEncode returns)."""
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, tokens, context_dim, generator=generator), {}]]


def sample(model: Any, positive: list[list[Any]], negative: list[list[Any]], *, seed: int, steps: int,
           cfg: float = 7.5, sampler_name: str = "euler", scheduler: str = "normal", size: int = 32,
           batch: int = 1) -> torch.Tensor:
    """Denoise a seeded latent with ComfyUI's KSampler path; returns the latent (`[batch, 4, size, size]`).

    Under `torch.inference_mode()`, as ComfyUI's executor runs every prompt.
    """
    import comfy.sample

    with torch.inference_mode():
        latent = torch.zeros(batch, 4, size, size)
        noise = comfy.sample.prepare_noise(latent, seed)
        return comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                                   seed=seed, disable_pbar=True)


PEER_CACHES = ("EasyCache", "LazyCache")


def with_peer_cache(model: Any, peer: str, reuse_threshold: float = 0.2, start_percent: float = 0.15,
                    end_percent: float = 0.95) -> Any:
    """ComfyUI's own EasyCache or LazyCache node (comfy_extras) applied to `model`, with the node's defaults."""
    from comfy_extras import nodes_easycache

    if peer not in PEER_CACHES:
        raise ValueError(f"peer must be one of {PEER_CACHES}, got {peer!r}")
    node = getattr(nodes_easycache, f"{peer}Node")
    return node.execute(model, reuse_threshold, start_percent, end_percent, False).args[0]


class DeepBlockCalls:
    """Counts U-Net calls (`calls`) and those that really ran the middle block (`count`).

    The deep count hooks a layer *inside* the middle block's first res block: DeepCache replaces the
    res block's forward on cached calls and EasyCache/LazyCache skip the whole U-Net, so neither reaches
    it. A call counts once however often the layer runs in it (feature slicing runs it once per slice).
    """

    def __init__(self, model: Any) -> None:
        self.count = 0
        self.calls = 0
        self._deep_ran = False
        unet = model.get_model_object("diffusion_model")
        self._hooks = [
            unet.middle_block[0].in_layers.register_forward_hook(lambda *_: self._deep()),
            unet.register_forward_pre_hook(lambda *_: self._call()),
        ]

    def _call(self) -> None:
        self.calls += 1
        self._deep_ran = False

    def _deep(self) -> None:
        if not self._deep_ran:
            self._deep_ran = True
            self.count += 1

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
