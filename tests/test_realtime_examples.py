"""The reference websocket client as a user runs it: no hidden limit on how much of their audio it sends."""

from __future__ import annotations

import wave

import numpy as np

from livecache.examples import ws_client


def write_wav(path, seconds: float, rate: int = 16000) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.zeros(int(seconds * rate), "<i2").tobytes())


def test_the_client_sends_the_whole_wav_by_default(tmp_path, monkeypatch, capsys):
    """Old behaviour: a hidden `--seconds 5` default cut a 7 s WAV after 5 s without a word."""
    asked: list[float] = []

    async def fake_stream(url, pcm, rate, seconds, **kwargs):
        asked.append(seconds)
        return ws_client.Result(frames=[(0.0, {})])

    monkeypatch.setattr(ws_client, "stream", fake_stream)
    write_wav(tmp_path / "long.wav", 7.0)
    assert ws_client.main(["--wav", str(tmp_path / "long.wav")]) == 0
    assert asked == [7.0 + ws_client.TAIL_S]
    assert capsys.readouterr().err == ""
    assert ws_client.main(["--wav", str(tmp_path / "long.wav"), "--seconds", "2"]) == 0  # asked for: kept, said
    assert asked[-1] == 2.0 and "stops before the end of the 7.0 s" in capsys.readouterr().err
