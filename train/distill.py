"""Training data for the diffusion avatar, made offline: the procedural avatar animating speech.

The teacher is the procedural avatar (`pipelines/procedural.py`, the embedded engine's renderer) driven
exactly as a live session drives it — the same audio windows on the same clock, the same voice-activity
states — by speech that `espeak-ng` synthesises here (no download). Each frame gives one example: the
audio window, the state label, and the model's square crop around the mouth before head motion
(`crop_box`). Speech is placed between silences of random length and gain, and some sentences are spoken
while the state is forced to listening or idle (mouth closed), so the state label means something.
Colour-shifted copies of the default portrait teach the model to take skin and lip colours from the
reference rather than memorising one face.

Teacher and crop geometry come from `pipelines/`, shared with the live engines; `train/avatar.py` only
sees arrays.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..models.audio_features import resample
from ..models.avatar import AvatarSpec
from ..pipelines.avatar import crop_box, crop_square
from ..pipelines.frames import RenderRequest, SessionOptions
from ..pipelines.portrait import default_portrait, prepare
from ..pipelines.procedural import ProceduralSession
from ..pipelines.rig import FaceRig
from ..pipelines.states import StateTracker

SENTENCES = (
    "Hello there, how are you doing today?",
    "The quick brown fox jumps over the lazy dog.",
    "I can repeat whatever you say, with moving lips.",
    "Please open the window, it is rather warm in here.",
    "Seven bright boats sailed past the old harbour wall.",
    "Mama made me a big bowl of warm pea soup.",
    "Look at the moon, it is full and very bright tonight.",
    "We will meet at half past nine near the station.",
    "She sells sea shells by the sea shore every summer.",
    "Why would anyone want to eat only apples and oranges?",
    "Good morning, welcome to the live avatar demonstration.",
    "Numbers one, two, three, four, five, six, seven, eight.",
    "Fresh fish and chips are served on Fridays at noon.",
    "Thank you very much, see you again soon, goodbye.",
)
VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-029")
COLOUR_GAINS = ((1.0, 1.0, 1.0), (0.85, 0.95, 1.1), (1.1, 0.9, 0.85), (0.75, 0.75, 0.8))


class SpeechError(RuntimeError):
    """espeak-ng is missing or failed; the message says how to install it."""


def speak(text: str, voice: str = "en-us", speed: int = 160, rate: int = 16000) -> np.ndarray:
    """`text` spoken by espeak-ng as float mono audio at `rate`."""
    import soundfile

    if shutil.which("espeak-ng") is None:
        raise SpeechError("espeak-ng not found: install it with `apt-get install -y espeak-ng`")
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "speech.wav"
        result = subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(wav), text],
                                capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise SpeechError(f"espeak-ng failed ({result.returncode}): {result.stderr.strip()}")
        audio, source_rate = soundfile.read(str(wav), dtype="float32")
    if audio.ndim > 1:
        audio = audio.mean(axis=1)
    return resample(audio, source_rate, rate)


@dataclass
class AvatarDataset:
    """Arrays the trainer reads: crops uint8 [N, R, R, 3], audio windows float32 [N, S], states int64 [N],
    the reference crop index per frame [N] and the reference crops uint8 [P, R, R, 3]."""

    crops: np.ndarray
    windows: np.ndarray
    states: np.ndarray
    reference_index: np.ndarray
    references: np.ndarray


def make_dataset(spec: AvatarSpec | None = None, sentences: int = len(SENTENCES), fps: float = 25.0,
                 seed: int = 0, sizes: tuple[int, ...] = (384, 512)) -> AvatarDataset:
    """Render the teacher over espeak-ng speech; `sentences` bounds the work (tests use 1 or 2)."""
    spec = spec or AvatarSpec()
    rng = np.random.default_rng(seed)
    rate, ctx = spec.sample_rate, int(round(spec.audio_context_s * spec.sample_rate))
    crops, windows, states, ref_index, references = [], [], [], [], []
    for i in range(sentences):
        gains = COLOUR_GAINS[i % len(COLOUR_GAINS)]
        size = sizes[i % len(sizes)]
        portrait = np.clip(default_portrait(512) * np.array(gains, np.float32), 0, 255).astype(np.uint8)
        image, layout = prepare(portrait, size)
        box = crop_box(layout, spec, size)
        references.append(crop_square(image, box, spec.resolution))
        session = ProceduralSession(FaceRig(image, layout), SessionOptions(size=size, seed=i))
        speech = speak(SENTENCES[i % len(SENTENCES)], VOICES[i % len(VOICES)], int(rng.integers(130, 200)), rate)
        speech *= float(10 ** (rng.uniform(-9, 3) / 20)) / max(1e-3, float(np.abs(speech).max()))
        lead, tail = (int(rng.uniform(0.3, 1.2) * rate) for _ in range(2))
        audio = np.concatenate([np.zeros(lead + ctx, np.float32), speech, np.zeros(tail, np.float32)])
        tracker = StateTracker(rate)
        if rng.random() < 0.25:  # a forced state: the teacher keeps the mouth shut through the speech
            tracker.force(str(rng.choice(["listening", "idle"])))
        for k in range(int((len(audio) - ctx) / rate * fps)):
            t = (k + 1) / fps
            end = ctx + int(round(t * rate))
            window = audio[end - ctx : end]
            state = tracker.update(t, window)
            frame = session.pose(RenderRequest(session, t, window, state), rate)
            crops.append(crop_square(frame, box, spec.resolution))
            windows.append(window)
            states.append(("speaking", "listening", "idle").index(state))
            ref_index.append(len(references) - 1)
    return AvatarDataset(np.stack(crops), np.stack(windows).astype(np.float32), np.array(states, np.int64),
                         np.array(ref_index, np.int64), np.stack(references))
