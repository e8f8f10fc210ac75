"""The shared audio features against librosa's own pipeline, and clip resampling through soxr."""

import librosa
import numpy as np
import pytest
import torch

from livecache.models.audio_features import log_mel, mel_filterbank, resample
from livecache.models.avatar import AudioConfig, mel_features


def test_mel_features_match_librosa_melspectrogram(close_reassociated):
    """Our framing (newest audio in the last frame) + log_mel is librosa's uncentred mel spectrogram, frame by frame."""
    config = AudioConfig()
    rng = np.random.default_rng(0)
    need = config.n_fft + (config.frames - 1) * config.hop
    audio = (rng.standard_normal((3, need)) * np.array([[0.3], [0.01], [0.0]])).astype(np.float32)
    ours = np.exp(mel_features(audio, 16000, config).astype(np.float64)) - 1e-6
    theirs = librosa.feature.melspectrogram(y=audio, sr=16000, n_fft=config.n_fft, hop_length=config.hop,
                                            center=False, power=2.0, n_mels=config.n_mels, fmin=60.0, fmax=7600.0,
                                            htk=True, norm="slaney", window="hann")
    assert ours.shape == (3, config.frames, config.n_mels)
    for row in range(2):  # the silent row is log(1e-6) on both sides, nothing to scale against
        close_reassociated(torch.from_numpy(ours[row]).float(), torch.from_numpy(theirs[row].T.copy()).float(),
                           ulps=256)  # float32 FFTs in another order (pocketfft vs librosa's stft) and exp(log)
    assert np.allclose(mel_features(audio[2:], 16000, config), np.log(1e-6))


def test_short_window_is_left_padded_with_silence():
    config = AudioConfig()
    tone = np.sin(np.arange(800) * 0.3).astype(np.float32)
    mel = mel_features(tone[None], 16000, config)[0]
    assert np.allclose(mel[0], np.log(1e-6)) and mel[-1].max() > 0.0


def test_filterbank_is_area_normalised_triangles_up_to_nyquist():
    bank = mel_filterbank(8000, 400, 32)  # fmax is capped at the Nyquist rate
    freqs = np.fft.rfftfreq(400, 1 / 8000)
    assert bank.shape == (32, 201) and bank.dtype == np.float32 and (bank >= 0).all()
    assert freqs[bank.sum(axis=0) > 0].max() <= 4000.0
    assert log_mel(np.zeros((2, 400), np.float32), 8000, 32).shape == (2, 32)


@pytest.mark.parametrize("source", [8000, 22050, 24000, 48000])
def test_resample_keeps_duration_and_pitch(source):
    t = np.arange(source) / source
    out = resample(np.sin(2 * np.pi * 440.0 * t).astype(np.float32), source, 16000)
    assert out.dtype == np.float32 and abs(out.size - 16000) <= 1
    spectrum = np.abs(np.fft.rfft(out * np.hanning(out.size)))
    assert abs(np.fft.rfftfreq(out.size, 1 / 16000)[spectrum.argmax()] - 440.0) <= 1.0


def test_resample_refuses_bad_input():
    same = np.ones(10, np.float32)
    assert resample(same, 16000, 16000) is same
    with pytest.raises(ValueError, match="positive"):
        resample(same, 0, 16000)
    with pytest.raises(ValueError, match="mono"):
        resample(np.ones((2, 10), np.float32), 48000, 16000)
