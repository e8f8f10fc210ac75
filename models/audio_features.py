"""Audio features and clip resampling from the field's libraries, one place for nodes, training and benches.

The mel filterbank is librosa's (HTK mel scale, Slaney area normalisation: the filters the embedded avatar's
audio encoder was trained on, equal to 1e-9). Whole clips are resampled with soxr, the resampler librosa itself
uses. Live audio that arrives in chunks stays on PyAV's swresample (realtime/audio.py): soxr's stream holds back
~341 samples at 16 kHz (21 ms, HQ) against swresample's few, which would add to every session's audio-to-mouth
latency. Neither library pulls torch, so the base install stays safe in a user's ComfyUI environment.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

MEL_FMIN = 60.0
MEL_FMAX = 7600.0


@lru_cache(maxsize=4)
def mel_filterbank(rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """librosa's triangular mel filters, [n_mels, n_fft // 2 + 1] float32 (imported lazily: librosa loads numba)."""
    import librosa

    return librosa.filters.mel(sr=rate, n_fft=n_fft, n_mels=n_mels, fmin=MEL_FMIN, fmax=min(MEL_FMAX, rate / 2),
                               htk=True, norm="slaney", dtype=np.float32)


def log_mel(frames: np.ndarray, rate: int, n_mels: int) -> np.ndarray:
    """Log-mel energies of already framed audio: float [..., n_fft] -> [..., n_mels] (periodic Hann window)."""
    n_fft = frames.shape[-1]
    window = np.hanning(n_fft + 1)[:-1].astype(np.float32)  # librosa's "hann" (scipy.signal.get_window, periodic)
    power = np.abs(np.fft.rfft(frames * window, axis=-1)) ** 2
    return np.log(power @ mel_filterbank(rate, n_fft, n_mels).T + 1e-6).astype(np.float32)


def resample(audio: np.ndarray, source_rate: int, rate: int) -> np.ndarray:
    """A whole float mono clip from `source_rate` to `rate` (float32; returned as is when the rates match)."""
    import soxr  # lazily, like librosa: the live path imports this module for the mel features only

    if source_rate <= 0 or rate <= 0:
        raise ValueError(f"sample rates must be positive, got {source_rate} -> {rate}")
    audio = np.ascontiguousarray(audio, np.float32)
    if audio.ndim != 1:
        raise ValueError(f"resample takes mono audio [T], got shape {list(audio.shape)}")
    return audio if source_rate == rate else soxr.resample(audio, source_rate, rate, quality="HQ")
