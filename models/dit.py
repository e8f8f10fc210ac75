"""The embedded DiT: a small class-conditional diffusion transformer on the digits domain.

It is diffusers' own `DiTTransformer2DModel` (patchify, adaLN-zero blocks conditioned on the
timestep and the class, a final adaLN + unpatchify), sized to train in ~20 minutes on 2 CPU cores.
So it is addressed by the same DiT site (`adapters.diffusers_dit`, family "DiT") and block cache as
every diffusers transformer, and by the W8A8/DGQ layer quantizers on its block linears.

`DigitDiT` only adds the calling convention every sampler of the pack uses,
`model(x, t, encoder_hidden_states=states)`: the "prompt states" of this model are a one-token
one-hot class vector (`DitPromptEncoder`; index 10 is the empty prompt, which is also the class the
DiT's label embedding reserves for classifier-free guidance). The scheduler is the digits U-Net's
(DDIM, cosine schedule, epsilon prediction), so both embedded models sample the same way.

`load_dit()` is the loader (`embedded:dit` in the nodes and workflows).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DiTTransformer2DModel
from torch import nn

from .digits import NUM_CLASSES, RESOLUTION, parse_digit_prompt
from .embedded import WEIGHTS_ROOT
from .loading import WeightsError, load_scheduler_config, load_state_into, read_config, weight_file
from .pipeline import DiffusionModel

DIT_DIR = WEIGHTS_ROOT / "dit"
EMBEDDED_DIT = "embedded:dit"
# guidance 3 draws the asked digit more often than the U-Net's 2 (75% vs 63% by our classifier, 20 DDIM steps)
DIT_GUIDANCE = 3.0

# 16×16 digits in 4×4 patches (2×2 pixels of the 8×8 scans): 16 tokens of width 64, 8 adaLN-zero blocks
# (~0.8 M parameters, 1.6 MB in fp16); 2×2 patches cost 4× more per step, too slow to train here
DIT_CONFIG: dict[str, Any] = {
    "sample_size": RESOLUTION,
    "in_channels": 1,
    "out_channels": 1,
    "patch_size": 4,
    "num_layers": 8,
    "num_attention_heads": 4,
    "attention_head_dim": 16,
    "num_embeds_ada_norm": NUM_CLASSES,
    "norm_num_groups": 1,
}


class DigitDiT(DiTTransformer2DModel):
    """`DiTTransformer2DModel` that also reads its class from one-hot `encoder_hidden_states`."""

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor | float | None = None,
                encoder_hidden_states: torch.Tensor | None = None, class_labels: torch.Tensor | None = None,
                cross_attention_kwargs: dict[str, Any] | None = None, return_dict: bool = True) -> Any:
        batch = hidden_states.shape[0]
        if class_labels is None:
            if encoder_hidden_states is None:
                raise ValueError("the digits DiT needs class_labels or one-hot encoder_hidden_states [B, 1, 11]")
            class_labels = labels_of(encoder_hidden_states)
        if class_labels.shape[0] != batch:
            raise ValueError(f"{class_labels.shape[0]} class labels for a batch of {batch}")
        timestep = torch.as_tensor(timestep, device=hidden_states.device)
        if timestep.ndim == 0:  # samplers pass one level per call; the adaLN embedders want one per sample
            timestep = timestep.expand(batch)
        return super().forward(hidden_states, timestep=timestep, class_labels=class_labels,
                               cross_attention_kwargs=cross_attention_kwargs, return_dict=return_dict)


def labels_of(states: torch.Tensor) -> torch.Tensor:
    """Class indices from one-hot states `[B, 1, NUM_CLASSES + 1]`; anything else raises naming the shape."""
    if states.ndim != 3 or states.shape[1:] != (1, NUM_CLASSES + 1):
        raise ValueError(f"the digits DiT reads one-hot class states of shape [B, 1, {NUM_CLASSES + 1}], "
                         f"got {tuple(states.shape)}")
    return states[:, 0].argmax(-1)


class DitPromptEncoder:
    """Digit prompts to the one-hot states `DigitDiT` reads (no weights: the class embedding is the DiT's)."""

    def __call__(self, labels: torch.Tensor) -> torch.Tensor:
        return F.one_hot(labels, NUM_CLASSES + 1).float().unsqueeze(1)

    def encode(self, prompt: str) -> torch.Tensor:
        """`[1, 1, 11]` for one prompt; raises naming the prompt if it names no digit."""
        return self(torch.tensor([parse_digit_prompt(prompt)]))


def build_dit() -> DigitDiT:
    """A freshly initialised embedded DiT (the training script seeds torch before calling this)."""
    return DigitDiT(**DIT_CONFIG)


def load_dit(folder: Path = DIT_DIR, dtype: torch.dtype = torch.float32) -> DiffusionModel:
    """The embedded DiT as a `DiffusionModel` (`transformer/` + `scheduler/` in `folder`).

    The transformer travels in the `unet` field, as every sampler calls it the same way; the sites
    tell a DiT from a U-Net by its class.
    """
    folder = Path(folder)
    if not (folder / "transformer").is_dir():
        raise WeightsError(f"{folder / 'transformer'}: missing; run `livecache train dit` to build the embedded DiT")
    config = read_config(folder / "transformer")
    try:
        model = DigitDiT.from_config(config)
    except Exception as err:
        raise WeightsError(f"{folder / 'transformer' / 'config.json'}: not a digits DiT config ({err})") from None
    model = nn.Module.to(load_state_into(model, weight_file(folder / "transformer")), dtype).eval()
    encoder = DitPromptEncoder()
    name = EMBEDDED_DIT if folder.resolve() == DIT_DIR.resolve() else folder.name
    return DiffusionModel(name, model, load_scheduler_config(folder / "scheduler"), encoder.encode,
                          default_guidance=DIT_GUIDANCE)

