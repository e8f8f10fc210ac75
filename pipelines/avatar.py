"""The diffusion avatar renderer: the lower face inpainted by a few-step latent diffusion model from audio.

The model (`models/avatar.py`: diffusers U-Net + VAE + LCM scheduler, weights folder layout there)
renders a square crop around the mouth; this renderer prepares the portrait, runs the model's stages
and pastes each crop back with the soft mask, then moves the head like the procedural avatar does.
The live engine (`livecache serve --engine diffusion`, `realtime/engines/diffusion.py`), the ComfyUI
node and `livecache bench avatar` all render through it.

Per frame: audio features (log-mel of the window ending at `t`) → U-Net, 1–4 LCM steps → VAE decode
→ paste. What makes it fast, each switchable so `livecache bench avatar` can measure it:
- `reference_cache`: the masked reference latent is encoded once per session, not per frame;
- `temporal_cache`: DeepCache along time (`accel/temporal_cache.py`): frames whose audio features
  barely moved from the last fully computed frame reuse its deep U-Net features;
- `max_batch`: frames of all sessions (or of a clip) go through the U-Net and VAE together;
- `pipeline`: features, U-Net and decode run as overlapped stages (`pipelines/stages.py`);
- `first_chunk`: offline clips start with a short chunk so the first frame is out early;
- `w8a8`: the U-Net's Linear/Conv2d layers in int8 (`accel/quant.py`, calibrated at start-up; off by default);
- `bf16`: U-Net and VAE in bfloat16 (default on GPUs only: on CPUs the shipped model's tensors are
  too small for bf16 to pay for the conversions; docs/benchmarks.md, avatar).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

from ..accel.progress import Progress
from ..accel.temporal_cache import TemporalDeepCache, TemporalReuse, TemporalReuseConfig
from ..adapters.diffusers_unet import deep_modules, read_timestep
from ..models.avatar import AVATAR_DIR, STATES, AvatarModel, AvatarSpec, load_model, mel_features, mouth_mask
from .frames import RenderedFrame, RenderRequest, SessionOptions
from .portrait import FaceLayout, prepare
from .procedural import HeadMotion
from .stages import run_stages
from .states import StateTracker

DARK = 0.3  # luminance (0..1) below which a lips-box pixel counts as open mouth
OPEN_FRACTION = 0.3  # dark fraction of the lips box that reads as a fully open mouth
_REUSE_MEL_FRAMES = 4  # the newest mel frames (~70 ms) decide whether a frame may reuse deep features
DEFAULT_REUSE = TemporalReuseConfig()


def crop_box(layout: FaceLayout, spec: AvatarSpec, size: int) -> tuple[int, int, int]:
    """(x, y, side) of the model's square crop in portrait pixels, kept inside the image."""
    mw = layout.mouth_width
    side = min(size, int(round(spec.crop_scale * mw)))
    cx, cy = layout.mouth[0], layout.mouth[1] + spec.crop_dy * mw
    x = int(np.clip(round(cx - side / 2), 0, size - side))
    y = int(np.clip(round(cy - side / 2), 0, size - side))
    return x, y, side


def lips_box(layout: FaceLayout) -> tuple[int, int, int, int]:
    """The same mouth box the procedural avatar reports, so clients watch the same pixels."""
    mw, (mx, my) = layout.mouth_width, layout.mouth
    return int(mx - 0.45 * mw), int(my - 0.2 * mw), int(0.9 * mw), int(0.6 * mw)


class AvatarSession:
    """One portrait prepared for the model: its crop box, reference latent, paste mask and head motion."""

    _serial = itertools.count()

    def __init__(self, image: np.ndarray, layout: FaceLayout, spec: AvatarSpec, reference: torch.Tensor,
                 options: SessionOptions) -> None:
        self.image = image
        self.layout = layout
        self.options = options
        self.key = next(self._serial)  # cache key: unlike id(), never reused by a later session
        self.box = crop_box(layout, spec, image.shape[0])
        self.crop = crop_square(image, self.box, spec.resolution)
        self.reference = reference  # masked reference latent: encoded once, reused by every frame
        side = self.box[2]
        mask = mouth_mask(spec, spec.resolution)
        self.mask = cv2.resize(mask, (side, side), interpolation=cv2.INTER_LINEAR)[..., None]
        lx, ly, lw, lh = lips_box(layout)
        k = spec.resolution / side
        x0, y0 = self.box[:2]
        self.lips_in_crop = (int((lx - x0) * k), int((ly - y0) * k), max(1, int(lw * k)), max(1, int(lh * k)))
        self.motion = HeadMotion(image.shape[0], np.random.default_rng(options.seed))
        self._closed = self._dark_share(self.crop.astype(np.float32) / 255.0)  # the lip line of the portrait

    @property
    def mouth_box(self) -> tuple[int, int, int, int]:
        return lips_box(self.layout)

    @property
    def region(self) -> tuple[int, int, int, int]:
        """(x, y, w, h) of the portrait pixels the model renders (what the bench compares)."""
        x, y, side = self.box
        return x, y, side, side

    def _dark_share(self, crop: np.ndarray) -> float:
        x, y, w, h = self.lips_in_crop
        luminance = crop[y : y + h, x : x + w] @ np.array([0.299, 0.587, 0.114], np.float32)
        return float((luminance < DARK).mean()) if luminance.size else 0.0

    def mouth_opening(self, crop: np.ndarray) -> float:
        """0..1 from the rendered crop (float RGB 0..1): dark (open-mouth) pixels in the lips box beyond
        those of the closed reference mouth."""
        return float(np.clip((self._dark_share(crop) - self._closed) / OPEN_FRACTION, 0.0, 1.0))

    def paste(self, crop: np.ndarray) -> np.ndarray:
        """The portrait with `crop` (float RGB 0..1 at model resolution) blended in over the mouth."""
        x, y, side = self.box
        frame = self.image.copy()
        patch = cv2.resize(crop, (side, side), interpolation=cv2.INTER_LINEAR) * 255.0
        region = frame[y : y + side, x : x + side].astype(np.float32)
        blended = region * (1 - self.mask) + patch * self.mask
        frame[y : y + side, x : x + side] = np.clip(blended, 0, 255).astype(np.uint8)
        return frame


def crop_square(image: np.ndarray, box: tuple[int, int, int], resolution: int) -> np.ndarray:
    x, y, side = box
    return cv2.resize(image[y : y + side, x : x + side], (resolution, resolution), interpolation=cv2.INTER_AREA)


@dataclass
class _Chunk:
    """Frames travelling through the stages together."""

    requests: list[RenderRequest]
    mel: torch.Tensor | None = None  # the conditioning features (log-mel here, Whisper tokens for MuseTalk)
    signal: torch.Tensor | None = None  # what the temporal cache compares between frames
    latents: torch.Tensor | None = None


@dataclass
class StageClock:
    """Seconds and frames per stage, summed over calls: what the bench reports per frame."""

    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    frames: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, stage: str, seconds: float, frames: int) -> None:
        self.seconds[stage] += seconds
        self.frames[stage] += frames

    def per_frame_ms(self) -> dict[str, float]:
        return {k: 1000 * self.seconds[k] / max(1, self.frames[k]) for k in self.seconds}


class AvatarRenderer:
    """Renders for many sessions on one worker; `render_clip` renders a whole audio clip offline."""

    session_class: type[AvatarSession] = AvatarSession  # the live engine substitutes its EngineSession

    def __init__(self, weights: str | Path | None = None, model: AvatarModel | None = None, steps: int | None = None,
                 bf16: bool | None = None, reference_cache: bool = True,
                 temporal_cache: TemporalReuseConfig | None = DEFAULT_REUSE,
                 max_batch: int = 4, pipeline: bool = True, first_chunk: int = 1, seed: int = 0,
                 device: str | None = None, w8a8: bool = False, dtype: torch.dtype | None = None) -> None:
        if max_batch < 1 or first_chunk < 1:
            raise ValueError(f"max_batch and first_chunk must be >= 1, got {max_batch} and {first_chunk}")
        self.model = model if model is not None else load_model(Path(weights) if weights else AVATAR_DIR)
        spec = self.model.spec
        self.steps = spec.steps if steps is None else steps
        if not 1 <= self.steps <= 4:
            raise ValueError(f"steps must be 1..4 (LCM), got {self.steps}")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if bf16 is None:  # `livecache bench avatar`: bf16 lost to fp32 on CPU at this model's tiny sizes
            bf16 = device != "cpu"
        self.device = torch.device(device)
        self.model.to(dtype or (torch.bfloat16 if bf16 else torch.float32), device)  # `dtype` (fp16) wins
        self.sample_rate = spec.sample_rate
        self.audio_context_s = spec.audio_context_s
        self.max_batch = max_batch
        self.pipeline = pipeline
        self.first_chunk = first_chunk
        self.reference_cache = reference_cache
        self.clock = StageClock()
        size = self.model.latent_size
        generator = torch.Generator().manual_seed(seed)
        self._noise = torch.randn(1, self.model.latent_channels, size, size, generator=generator)
        self._lock = threading.Lock()  # the U-Net stage and its caches serve one chunk at a time
        self._cache: TemporalDeepCache | None = None
        self._reuse: TemporalReuse | None = None
        self._quant = self._quantize() if w8a8 else None
        if temporal_cache is not None:
            unet = self.model.unet
            self._cache = TemporalDeepCache(temporal_cache).apply(
                unet, deep_modules(unet, temporal_cache.cache_branch_id), read_timestep)
            self._reuse = TemporalReuse(temporal_cache)

    def _quantize(self):
        """W8A8 (`accel/quant.py`): int8 weights per channel, dynamic 8-bit activations, calibrated on a few
        frames of the default portrait speaking a synthetic speech-like signal."""
        from ..accel.quant import QuantConfig
        from ..adapters.diffusers_quant import calibrate_quantization
        from ..adapters.diffusers_site import apply_technique
        from .portrait import default_portrait
        from .testsignal import speech_like

        session = self.open_session(default_portrait(256), SessionOptions(size=256))
        audio = speech_like(1.0, self.sample_rate)

        def run() -> None:
            for _ in self.render_clip(session, audio, fps=8.0):
                pass

        plan = calibrate_quantization(self.model.unet, QuantConfig(method="w8a8"), [run])
        self.clock = StageClock()  # calibration frames are not rendering work
        return apply_technique(self.model.unet, plan)

    @property
    def quant_backend(self) -> str | None:
        """'int8' (real int8 kernels) or 'simulated' when W8A8 is on; None when off."""
        return self._quant.stats.backend if self._quant is not None else None

    # -- sessions ----------------------------------------------------------------------------
    def open_session(self, portrait: np.ndarray, options: SessionOptions) -> AvatarSession:
        image, layout = prepare(portrait, options.size)
        spec = self.model.spec
        box = crop_box(layout, spec, options.size)
        reference = self.model.encode_reference(_to_tensor([crop_square(image, box, spec.resolution)]))
        return self.session_class(image, layout, spec, reference, options)

    @property
    def cache_stats(self) -> tuple[int, int]:
        """(full, reused) U-Net calls since the renderer started; (0, 0) without the temporal cache."""
        return (self._cache.stats.full_calls, self._cache.stats.cached_calls) if self._cache else (0, 0)

    # -- stages ------------------------------------------------------------------------------
    def _features(self, chunk: _Chunk) -> _Chunk:
        start = time.perf_counter()
        chunk.mel, chunk.signal = self._audio_features(np.stack([_window(r.audio, self.model) for r in chunk.requests]))
        self.clock.add("audio features", time.perf_counter() - start, len(chunk.requests))
        return chunk

    def _audio_features(self, windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(what the U-Net is conditioned on, what the temporal cache compares between frames) for windows
        [B, T]: here log-mel frames and their newest ones."""
        mel = torch.from_numpy(mel_features(windows, self.sample_rate, self.model.audio_encoder.config))
        return mel, mel[:, -_REUSE_MEL_FRAMES:]

    def _latents(self, reference: torch.Tensor, features: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """Clean latents for a chunk (called under the U-Net lock): audio tokens, then the LCM steps."""
        noise = self._noise.expand(len(reference), -1, -1, -1)
        return self.model.denoise(reference, self.model.audio_tokens(features), states, self.steps, noise)

    def _denoise(self, chunk: _Chunk) -> _Chunk:
        start = time.perf_counter()
        requests = chunk.requests
        if self.reference_cache:
            reference = torch.cat([_session(r).reference for r in requests])
        else:  # the baseline the bench compares against: encode the reference crop for every frame
            reference = self.model.encode_reference(_to_tensor([_session(r).crop for r in requests]))
        states = torch.tensor([STATES.index(r.state) for r in requests])
        with self._lock:
            if self._cache is not None and self._reuse is not None:
                key = tuple((_session(r).key, r.state) for r in requests)
                self._cache.begin_frame(self._reuse.decide(key, chunk.signal), key)
            chunk.latents = self._latents(reference, chunk.mel, states)
        self.clock.add("U-Net", time.perf_counter() - start, len(requests))
        return chunk

    def _finish(self, chunk: _Chunk) -> list[RenderedFrame]:
        start = time.perf_counter()
        crops = self.model.decode(chunk.latents).permute(0, 2, 3, 1).numpy()
        self.clock.add("VAE decode", time.perf_counter() - start, len(crops))
        start = time.perf_counter()
        frames = []
        for req, crop in zip(chunk.requests, crops, strict=True):
            session = _session(req)
            opening = session.mouth_opening(crop)
            image = session.motion.apply(session.paste(crop), req.t, req.state, opening)
            frames.append(RenderedFrame(image, req.t, req.state, opening))
        self.clock.add("paste + head motion", time.perf_counter() - start, len(frames))
        return frames

    def _stream(self, chunks: Iterable[list[RenderRequest]]) -> Iterator[RenderedFrame]:
        stages = (self._features, self._denoise, self._finish)
        for frames in run_stages((_Chunk(c) for c in chunks), stages, parallel=self.pipeline):
            yield from frames

    # -- interface ---------------------------------------------------------------------------
    def render_batch(self, requests: Sequence[RenderRequest]) -> list[RenderedFrame]:
        """One batch; with the pipeline on, its halves overlap (features and decode beside the U-Net)."""
        requests = list(requests)
        if self.pipeline and len(requests) >= 2:
            half = (len(requests) + 1) // 2
            return list(self._stream([requests[:half], requests[half:]]))
        return self._finish(self._denoise(self._features(_Chunk(requests))))

    def render_clip(self, session: AvatarSession, audio: np.ndarray, fps: float,
                    frames: int | None = None, progress: Progress | None = None) -> Iterator[RenderedFrame]:
        """Frames for a whole clip of float mono audio at the model's rate (offline: nodes, the bench).

        States come from the same voice-activity tracker as live sessions. The first chunk holds
        `first_chunk` frames and later ones `max_batch`, so the first frame is out after one small
        U-Net call while the rest still run batched. `progress` (default: none) counts the frames and
        may stop the clip before any further chunk is rendered.
        """
        count = clip_frames(len(audio), self.sample_rate, fps) if frames is None else frames
        tracker = StateTracker(self.sample_rate)
        ctx = int(self.audio_context_s * self.sample_rate)

        def requests() -> Iterator[RenderRequest]:
            for k in range(count):
                t = (k + 1) / fps  # frame k shows the audio up to its end, like the live clock's window
                end = min(len(audio), int(round(t * self.sample_rate)))
                window = audio[max(0, end - ctx) : end]
                yield RenderRequest(session, t, window, tracker.update(t, window))

        source = requests()
        sizes = itertools.chain([min(self.first_chunk, self.max_batch)], itertools.repeat(self.max_batch))
        chunks = iter(lambda: list(itertools.islice(source, next(sizes))), [])
        return (progress or Progress(bar=False)).loop(self._stream(chunks), "rendering avatar", "frame", total=count)

    def close(self) -> None:
        if self._cache is not None:
            self._cache.remove()
            self._cache = None
        if self._quant is not None:
            self._quant.remove()
            self._quant = None


def clip_frames(samples: int, rate: int, fps: float) -> int:
    """Frames `render_clip` makes for `samples` of audio at `rate`: known before rendering, so callers can
    size (or refuse) their output first."""
    return int(samples / rate * fps)


def _session(request: RenderRequest) -> AvatarSession:
    if not isinstance(request.session, AvatarSession):
        raise TypeError(f"the diffusion avatar got a {type(request.session).__name__}, not its own session")
    return request.session


def _window(audio: np.ndarray, model: AvatarModel) -> np.ndarray:
    """The newest `audio_context_s` of a window, left-padded with silence at a session's start."""
    n = int(round(model.spec.audio_context_s * model.spec.sample_rate))
    audio = np.asarray(audio, np.float32)[-n:]
    return np.pad(audio, (n - len(audio), 0)) if len(audio) < n else audio


def _to_tensor(crops: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(crops).astype(np.float32) / 255.0).permute(0, 3, 1, 2)
