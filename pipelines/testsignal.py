"""Speech-like test audio made in code: voiced syllables with vowel formants and fricatives, then silence.

The bench, the tests and the browser check need audio with the properties that drive the avatar (voice
activity, loudness envelope, changing spectrum) without a microphone, a TTS binary or data files; a
fixed seed makes every run hear the same thing.
"""

from __future__ import annotations

import numpy as np

# vowel -> (F1, F2, F3) in Hz; the spread covers open/closed and front/back lip shapes
VOWELS = {"a": (730, 1090, 2440), "e": (530, 1840, 2480), "i": (270, 2290, 3010), "o": (570, 840, 2410),
          "u": (300, 870, 2240)}
SYLLABLE_S = 0.22


def _vowel(f0: np.ndarray, formants: tuple[int, int, int], rate: int) -> np.ndarray:
    phase = 2 * np.pi * np.cumsum(f0) / rate
    out = np.zeros(f0.size)
    for k in range(1, int(4000 / f0.max()) + 1):
        freq = k * float(f0.mean())
        gain = sum(np.exp(-0.5 * ((freq - f) / (60 + 0.06 * f)) ** 2) * (1.0 / (1 + i)) for i, f in enumerate(formants))
        out += (gain + 0.02) / k**0.5 * np.sin(k * phase)
    return out


def speech_like(seconds: float, rate: int = 16000, seed: int = 0) -> np.ndarray:
    """`seconds` of continuous syllables (float32, about -20 dBFS while voiced)."""
    rng = np.random.default_rng(seed)
    n_syl = max(1, int(np.ceil(seconds / SYLLABLE_S)))
    n = int(SYLLABLE_S * rate)
    pieces = []
    for i in range(n_syl):
        vowel = VOWELS["aeiou"[rng.integers(5)]]
        f0 = np.linspace(1, 0.9, n) * (115 + 25 * np.sin(i / 3.0)) * (1 + 0.01 * rng.standard_normal(n))
        voiced = _vowel(f0, vowel, rate)
        env = np.sin(np.pi * np.linspace(0, 1, n)) ** 0.6
        syl = voiced / (np.abs(voiced).max() + 1e-9) * env
        if rng.random() < 0.4:  # a fricative onset ("s", "sh"): bright noise in the first 60 ms
            m = int(0.06 * rate)
            syl[:m] += 0.25 * np.diff(rng.standard_normal(m + 1)) * np.linspace(1, 0, m)
        pieces.append(syl)
    audio = np.concatenate(pieces)[: int(seconds * rate)]
    return (0.3 * audio).astype(np.float32)


def talk_and_pause(talk_s: float, pause_s: float, repeats: int, rate: int = 16000, lead_s: float = 0.0,
                   seed: int = 0) -> np.ndarray:
    """Silence for `lead_s`, then `repeats` x (talk, pause): the pattern that shows mouth motion and rest."""
    parts = [np.zeros(int(lead_s * rate), np.float32)]
    for i in range(repeats):
        parts += [speech_like(talk_s, rate, seed + i), np.zeros(int(pause_s * rate), np.float32)]
    return np.concatenate(parts)

