"""The embedded default model: a class-conditional pixel-space digits U-Net and its prompt encoder.

It is a plain diffusers `UNet2DConditionModel` (SD-shaped: cross-attention down/up blocks, a mid
block, skip connections), so every technique and adapter that works on Stable Diffusion's U-Net
works on it unchanged. Prompts are digit classes; `DigitPromptEncoder` turns one into the
`encoder_hidden_states` the U-Net cross-attends to (index 10 is the empty prompt for CFG).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .digits import NUM_CLASSES, RESOLUTION, UNCONDITIONAL, parse_digit_prompt

WEIGHTS_ROOT = Path(__file__).resolve().parent / "weights"
DIGITS_DIR = WEIGHTS_ROOT / "digits"
FEATURES_FILE = WEIGHTS_ROOT / "digit_features.safetensors"
# the trained ILF feedback modules that ship, by model name (`livecache train ilf`)
ILF_FILES = {"embedded:digits": WEIGHTS_ROOT / "ilf" / "digits.safetensors",
             "embedded:dit": WEIGHTS_ROOT / "ilf" / "dit.safetensors"}
EMBED_DIM = 64

UNET_CONFIG: dict = {
    "sample_size": RESOLUTION,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "cross_attention_dim": EMBED_DIM,
    "attention_head_dim": 8,
    "norm_num_groups": 16,
}

SCHEDULER_CONFIG: dict = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "epsilon",
    "clip_sample": True,
    "set_alpha_to_one": True,
    "steps_offset": 0,
}


class DigitPromptEncoder(nn.Module):
    """Maps digit prompts to `[B, 1, EMBED_DIM]` cross-attention states."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(NUM_CLASSES + 1, EMBED_DIM)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding(labels).unsqueeze(1)

    def encode(self, prompt: str) -> torch.Tensor:
        """The states for one prompt (`[1, 1, EMBED_DIM]`); raises naming the prompt if it names no digit."""
        return self(torch.tensor([parse_digit_prompt(prompt)]))

    def unconditional(self) -> torch.Tensor:
        return self(torch.tensor([UNCONDITIONAL]))


def build_digits_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**UNET_CONFIG)
