"""`livecache train dit`: the embedded DiT on the digits, reproducible and resumable on 2 CPU cores.

The objective is the digits U-Net's (`train/embedded.py`): DDPM epsilon prediction under the cosine
schedule, 10% label dropout to the empty class so classifier-free guidance works, one-pixel shifts,
an EMA of the weights is what ships (fp16 safetensors, `models/dit.py` loads it).

Every `CHECKPOINT_EVERY` steps the whole training state — weights, EMA, AdamW moments, the data
generator's state, the step — goes to `<out>/train_checkpoint.safetensors` (written whole or not at
all). Run the same command again after an interruption and it resumes there; the result is the one
an uninterrupted run gives (all randomness comes from the one saved generator). A checkpoint of
other settings is refused rather than mixed in; it is deleted once the model is written.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save

from ..accel.progress import Progress, as_progress
from ..files import write_replacing
from ..models.digits import UNCONDITIONAL, load_digits_tensor
from ..models.dit import DIT_CONFIG, DIT_DIR, DigitDiT, build_dit
from ..models.embedded import SCHEDULER_CONFIG
from ..models.loading import WeightsError, save_component, save_json
from .embedded import augment
from .threads import torch_threads

CHECKPOINT = "train_checkpoint.safetensors"
CHECKPOINT_EVERY = 50
LEARNING_RATE = 2e-3


class TrainState:
    """Everything a resumed run needs, as flat tensors for one safetensors file."""

    def __init__(self, model: DigitDiT, ema: DigitDiT, optimizer: torch.optim.Optimizer,
                 generator: torch.Generator) -> None:
        self.model, self.ema, self.optimizer, self.generator = model, ema, optimizer, generator

    def save(self, file: Path, step: int, settings: dict) -> None:
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        tensors |= {f"ema.{k}": v for k, v in self.ema.state_dict().items()}
        for index, moments in self.optimizer.state_dict()["state"].items():
            tensors |= {f"adam.{index}.{name}": torch.as_tensor(value) for name, value in moments.items()}
        tensors["generator"] = self.generator.get_state()
        data = save({k: v.contiguous() for k, v in tensors.items()},
                    metadata={"step": str(step), "settings": json.dumps(settings, sort_keys=True)})
        write_replacing(file, lambda stream: stream.write(data))

    def load(self, file: Path, settings: dict) -> int:
        """Restore from `file`; returns the step to continue from."""
        from safetensors import safe_open

        with safe_open(str(file), "pt") as handle:
            metadata = handle.metadata() or {}
        if json.loads(metadata.get("settings", "null")) != settings:
            raise WeightsError(f"{file}: a checkpoint of other settings ({metadata.get('settings')}); "
                               "delete it or train with those settings")
        tensors = load_file(str(file))
        self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        self.ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        state = self.optimizer.state_dict()
        moments: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("adam."):
                _, index, name = key.split(".", 2)
                moments.setdefault(int(index), {})[name] = value
        self.optimizer.load_state_dict({"state": moments, "param_groups": state["param_groups"]})
        self.generator.set_state(tensors["generator"])
        return int(metadata["step"])


def train_dit(out_dir: Path = DIT_DIR, steps: int = 2000, batch: int = 64, seed: int = 0,
              checkpoint_every: int = CHECKPOINT_EVERY, progress: Progress | bool = True) -> Path:
    """Train (or resume training) the embedded DiT; returns the folder written.

    One torch thread while it runs (`torch_threads`): this small a model trains ~5× faster that way here.
    """
    with torch_threads(1):
        return _train(Path(out_dir), steps, batch, seed, checkpoint_every, as_progress(progress))


def _train(out_dir: Path, steps: int, batch: int, seed: int, checkpoint_every: int, progress: Progress) -> Path:
    from diffusers import DDPMScheduler

    if steps < 1 or batch < 1 or checkpoint_every < 1:
        raise ValueError(f"steps ({steps}), batch ({batch}) and checkpoint_every ({checkpoint_every}) must be >= 1")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images, labels = load_digits_tensor()
    model = build_dit()
    # eval mode: the label dropout is ours (seeded); the DiT's own would draw from the global generator
    model.eval()
    ema = copy.deepcopy(model)
    noise_schedule = DDPMScheduler(num_train_timesteps=SCHEDULER_CONFIG["num_train_timesteps"],
                                   beta_schedule=SCHEDULER_CONFIG["beta_schedule"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=1e-4)
    state = TrainState(model, ema, optimizer, generator)
    settings = {"steps": steps, "batch": batch, "seed": seed, "config": DIT_CONFIG}
    checkpoint = out_dir / CHECKPOINT
    first = state.load(checkpoint, settings) if checkpoint.is_file() else 0
    for step in progress.loop(range(first, steps), f"train digits DiT (from step {first})", "step"):
        for group in optimizer.param_groups:  # warm-up then cosine decay, a function of the step alone
            group["lr"] = LEARNING_RATE * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = torch.randint(0, len(images), (batch,), generator=generator)
        x0 = augment(images[idx], generator)
        y = torch.where(torch.rand(batch, generator=generator) < 0.1, UNCONDITIONAL, labels[idx])
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, noise_schedule.config.num_train_timesteps, (batch,), generator=generator)
        loss = F.mse_loss(model(noise_schedule.add_noise(x0, noise, t), t, class_labels=y).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters(), strict=True):
                e.lerp_(p, 1 - decay)
        if (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            state.save(checkpoint, step + 1, settings)
    save_component(ema, out_dir / "transformer", dict(DIT_CONFIG, _class_name="DiTTransformer2DModel"),
                   "diffusion_pytorch_model", half=True)
    save_json(out_dir / "scheduler" / "scheduler_config.json", SCHEDULER_CONFIG)
    save_json(out_dir / "model_index.json", {"_class_name": "LiveCacheDigitsDiT", **settings})
    checkpoint.unlink(missing_ok=True)
    return out_dir
