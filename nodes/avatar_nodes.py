"""Nodes for the diffusion avatar: a portrait and an AUDIO clip in, the talking-head frames out.

`LiveCacheAvatarDiffusion` drives the same renderer as `livecache serve --engine diffusion`
(`pipelines/avatar.py`) over a whole clip offline: batched frames, the stage pipeline and
the temporal cache, with the state labels from the same voice-activity tracker as live sessions.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from ..models.audio_features import resample
from ..models.avatar import AVATAR_DIR, AvatarSpec
from ..models.loading import resolve_inside
from .context import host_progress, input_roots, model_roots
from .fields import bool_field, choice_field, declare, int_field, link, text_field
from .kinds import Node
from .memory import check_fits
from .validation import verdict

EMBEDDED_AVATAR = "embedded:avatar"
EXAMPLES = Path(__file__).resolve().parent.parent / "workflows"
SIZES = (256, 384, 512)


def _mono(audio: dict, rate: int) -> np.ndarray:
    """The first clip of an AUDIO value as float mono at `rate`; malformed values fail naming what is wrong."""
    waveform = audio.get("waveform") if isinstance(audio, dict) else None
    source_rate = audio.get("sample_rate") if isinstance(audio, dict) else None
    if not isinstance(waveform, torch.Tensor) or waveform.ndim != 3 or waveform.shape[-1] == 0:
        raise ValueError("audio must be an AUDIO: {'waveform': float tensor [B, C, T], 'sample_rate': int}")
    if not isinstance(source_rate, int) or source_rate <= 0:
        raise ValueError(f"audio sample_rate must be a positive integer, got {source_rate!r}")
    mono = waveform[0].float().mean(dim=0).numpy()
    return resample(mono, source_rate, rate)


@lru_cache(maxsize=2)
def _engine(weights: str, steps: int, temporal_cache: bool, max_batch: int, w8a8: bool):
    """Loading is the slow part; renderers are reused across runs with the same settings."""
    from ..pipelines.avatar import DEFAULT_REUSE, AvatarRenderer

    return AvatarRenderer(weights=weights, steps=steps, temporal_cache=DEFAULT_REUSE if temporal_cache else None,
                           max_batch=max_batch, w8a8=w8a8)


class LoadAudioFile(Node, category="io", returns=("AUDIO",), function="load"):
    """Load a WAV/FLAC/OGG file as AUDIO (soundfile), from the input folder or the shipped examples."""

    DESCRIPTION = "Reads an audio file into ComfyUI's AUDIO type ({'waveform': [1, C, T], 'sample_rate'})."
    INPUT_TYPES = declare({"file": text_field(
        "hello_avatar.wav", "A file name inside ComfyUI's input folder (headless: --input / LIVECACHE_INPUT), or one "
                            "of the examples shipped in the pack's workflows/ folder (hello_avatar.wav).")})

    @classmethod
    def VALIDATE_INPUTS(cls, file: str | None = None) -> bool | str:
        return verdict(cls, {"file": file}, lambda: isinstance(file, str) and _audio_path(file))

    def load(self, file: str) -> tuple[dict]:
        import soundfile

        path = _audio_path(file)
        try:
            data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
        except Exception as err:  # soundfile raises its own error types for unreadable files
            raise ValueError(f"{path}: not a readable audio file ({err})") from None
        return ({"waveform": torch.from_numpy(data.T.copy()).unsqueeze(0), "sample_rate": int(rate)},)


def _audio_path(file: str) -> Path:
    return resolve_inside(file.strip(), [*input_roots(), EXAMPLES],
                          "the input folders or the pack's example clips")


class DefaultPortrait(Node, category="avatar", returns=("IMAGE",), function="paint"):
    """The pack's painted default face (no image assets ship), as an IMAGE."""

    DESCRIPTION = "The default portrait the live server uses, painted in code."
    INPUT_TYPES = declare({"size": int_field(512, 128, 1024, "Side of the square portrait in pixels.", step=64)})

    def paint(self, size: int) -> tuple[torch.Tensor]:
        from ..pipelines.portrait import default_portrait

        return (torch.from_numpy(default_portrait(size).astype(np.float32) / 255.0).unsqueeze(0),)


def _avatar_folder(weights: str) -> Path:
    return AVATAR_DIR if weights.strip() in ("", EMBEDDED_AVATAR) else resolve_inside(weights.strip(), model_roots())


class AvatarDiffusion(Node, category="avatar", returns={"frames": "IMAGE"}, function="render"):
    """Talking-head frames from a portrait and speech with the diffusion avatar model."""

    DESCRIPTION = ("Latent inpainting of the lower face from audio in 1-4 LCM steps per frame, batched, "
                   "with DeepCache along time; one IMAGE per video frame.")
    INPUT_TYPES = declare({
        "portrait": link("IMAGE", "A frontal face; the first image of the batch is used."),
        "audio": link("AUDIO", "Speech to lip-sync; the first clip, mixed to mono."),
        "weights": text_field(EMBEDDED_AVATAR, "'embedded:avatar' (the small model shipped with the pack) or an "
                                               "avatar weights folder inside your diffusers model folders."),
        "size": choice_field(map(str, SIZES), "256", "Output frame side in pixels."),
        "fps": int_field(25, 1, 60, "Frames per second."),
        "steps": int_field(2, 1, 4, "LCM steps per frame (1 is fastest)."),
        "temporal_cache": bool_field(True, "Reuse deep U-Net features while the audio barely changes."),
        "max_batch": int_field(8, 1, 64, "Frames per U-Net call (the first call renders one frame)."),
        "w8a8": bool_field(False, "Int8 U-Net (W8A8, calibrated when the model loads)."),
    })

    @classmethod
    def VALIDATE_INPUTS(cls, weights: str | None = None) -> bool | str:
        return verdict(cls, {"weights": weights}, lambda: isinstance(weights, str) and _avatar_folder(weights))

    def render(self, portrait: torch.Tensor, audio: dict, weights: str, size: str, fps: int, steps: int,
               temporal_cache: bool, max_batch: int, w8a8: bool = False) -> tuple[torch.Tensor]:
        from ..pipelines.avatar import clip_frames
        from ..pipelines.frames import SessionOptions

        if not isinstance(portrait, torch.Tensor) or portrait.ndim != 4 or portrait.shape[-1] != 3:
            raise ValueError("portrait must be an RGB IMAGE: a float [B, H, W, 3] tensor")
        if int(size) not in SIZES:
            raise ValueError(f"size must be one of {list(SIZES)}, got {size!r}")
        speech = _mono(audio, AvatarSpec.sample_rate)
        count, side = clip_frames(len(speech), AvatarSpec.sample_rate, fps), int(size)
        if count == 0:
            raise ValueError(f"the audio is shorter than one frame at {fps} fps")
        # The IMAGE output (float32) is the one thing that grows with the clip: refuse before loading the model
        # when it cannot fit, then fill it frame by frame as frames are rendered (no list, stack or copies).
        check_fits(count * side * side * 3 * 4, f"the avatar clip ({count} frames of {side}x{side}, float32 IMAGE)",
                   "shorten the audio, or lower fps or size")
        engine = _engine(str(_avatar_folder(weights)), steps, temporal_cache, max_batch, w8a8)
        rgb = (portrait[0].float().clamp(0, 1).numpy() * 255).round().astype(np.uint8)
        session = engine.open_session(rgb, SessionOptions(size=side, fps=float(fps)))
        out = np.empty((count, side, side, 3), np.float32)
        for k, frame in enumerate(engine.render_clip(session, speech, fps, frames=count, progress=host_progress())):
            np.divide(frame.image, np.float32(255.0), out=out[k])
        return (torch.from_numpy(out),)
