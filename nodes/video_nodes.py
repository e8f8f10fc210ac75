"""Nodes for the causal AR video model: load it, set the causal cache, sample frames as IMAGE.

The model value (`LC_VIDEO_MODEL`) is immutable: the cache node returns a new value carrying a new
`CausalCacheConfig`, the sampler builds a fresh stream per run, so re-running a graph never sees
state from a previous run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import torch

from ..accel.causal_cache import CausalCacheConfig
from ..models.loading import resolve_inside
from ..models.video import SAMPLERS, CausalVideoDiT, generate, load_video_model, parse_video_prompt
from .context import host_progress, model_roots
from .fields import bool_field, choice_field, declare, int_field, link, seed_field, text_field
from .kinds import Node
from .ui_messages import send_stats
from .validation import verdict

EMBEDDED_VIDEO = "embedded:video"


@dataclass(frozen=True)
class VideoModel:
    """What flows along `LC_VIDEO_MODEL` links: the network and how to run its causal cache."""

    model: CausalVideoDiT
    cache: CausalCacheConfig


@lru_cache(maxsize=4)
def _load_cached(folder: str | None) -> CausalVideoDiT:
    return load_video_model(None if folder is None else Path(folder))


class LoadVideoModel(Node, category="video", returns={"video_model": "LC_VIDEO_MODEL"}, function="load"):
    """Load the embedded causal video model or one trained with `livecache train video --out`."""

    DESCRIPTION = "Loads a causal autoregressive video model (no cache sharing until the Causal Cache node)."
    INPUT_TYPES = declare({"source": text_field(
        EMBEDDED_VIDEO, "'embedded:video' for the model that ships with LiveCache, or a folder name inside your "
                        "model folders holding config.json + model.safetensors from `livecache train video`.")})

    @classmethod
    def VALIDATE_INPUTS(cls, source: str | None = None) -> bool | str:
        return verdict(cls, {"source": source}, lambda: isinstance(source, str) and _video_folder(source))

    def load(self, source: str) -> tuple[VideoModel]:
        folder = _video_folder(source)
        model = _load_cached(None if folder is None else str(folder))
        return (VideoModel(model, CausalCacheConfig(enabled=False, window=model.config.context)),)


def _video_folder(source: str) -> Path | None:
    """None for the embedded model, else the folder inside the model roots (refused outside them)."""
    source = source.strip()
    return None if source in ("", EMBEDDED_VIDEO) else resolve_inside(source, model_roots())


class CausalCache(Node, category="video", returns={"video_model": "LC_VIDEO_MODEL"}, function="apply"):
    """Ca2-VDM causal cache sharing: conditional frames' keys/values are computed once and reused."""

    DESCRIPTION = ("Shares the keys/values of already generated frames across all denoising steps and clips "
                   "instead of recomputing them; same frames, work per clip flat in the context length.")
    INPUT_TYPES = declare({
        "video_model": link("LC_VIDEO_MODEL", "The model; it is not modified, a copy is returned."),
        "enable": bool_field(True, "On: cache shared. Off: recompute the context every step (baseline)."),
        "window": int_field(4, 1, 256, "Past frames the model attends to; older ones are evicted, so memory stays "
                                       "flat on long videos. The embedded model was trained with 4."),
    })

    def apply(self, video_model: VideoModel, enable: bool, window: int) -> tuple[VideoModel]:
        return (replace(video_model, cache=CausalCacheConfig(enabled=enable, window=window)),)


class VideoSampler(Node, category="video", returns={"frames": "IMAGE"}, function="sample"):
    """Generate a video clip by clip; each clip is denoised in a few steps conditioned on the last frames."""

    DESCRIPTION = "Autoregressive video: IMAGE frames [N, H, W, 3] in 0..1, N = chunks x chunk_length."
    INPUT_TYPES = declare({
        "video_model": link("LC_VIDEO_MODEL", "The video model (Load Video Model, or Causal Cache)."),
        "prompt": text_field("shapes", "What moves: a digit ('7', 'a seven'), 'shapes' or 'texture'."),
        "chunks": int_field(8, 1, 1024, "Clips to generate one after another (AR steps)."),
        "chunk_length": int_field(4, 1, 16, "Frames per clip (the embedded model was trained with 4)."),
        "steps": int_field(3, 1, 100, "Denoising steps per clip: 1-4 with 'lcm', more with 'ddim'."),
        "sampler": choice_field(SAMPLERS, "lcm", "lcm: few-step consistency-style; ddim: plain multi-step."),
        "seed": seed_field("Noise seed; the same seed and settings give the same video."),
    }, unique_id=True)

    @classmethod
    def VALIDATE_INPUTS(cls, prompt: str | None = None) -> bool | str:
        return verdict(cls, {"prompt": prompt}, lambda: isinstance(prompt, str) and parse_video_prompt(prompt))

    def sample(self, video_model: VideoModel, prompt: str, chunks: int, chunk_length: int, steps: int,
               sampler: str, seed: int, unique_id: str | None = None) -> tuple[torch.Tensor]:
        label = torch.tensor([parse_video_prompt(prompt)])
        started = time.perf_counter()
        video = generate(video_model.model, video_model.cache, label, chunks, chunk_length, steps, sampler, seed,
                         progress=host_progress())
        seconds = time.perf_counter() - started
        mode = f"cache shared, window {video_model.cache.window}" if video_model.cache.enabled else "recompute"
        send_stats(unique_id, f"AR video: {chunks} clips x {chunk_length} frames in {seconds:.2f} s ({mode})",
                   {"seconds": seconds, "frames": chunks * chunk_length, "cache": video_model.cache.enabled})
        return (((video[0].permute(0, 2, 3, 1) + 1) / 2).clamp(0, 1).contiguous(),)
