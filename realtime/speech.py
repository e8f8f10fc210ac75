"""Text to the avatar's speech with no weights: espeak-ng (the Debian package `espeak-ng`) as a subprocess.

A `say` message makes the interactive mode work with nothing downloaded. The text goes to espeak-ng on its
standard input (never on the command line, so no text can pass for an option), the process runs off the event
loop with a deadline, and at most `MAX_SYNTHESES` run at once on the whole server, so a flood of `say` costs
bounded CPU. A missing binary is a clear `SpeechUnavailable`, not a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import shutil
import wave

import numpy as np

ESPEAK = "espeak-ng"
VOICE = "en"
MAX_SAY_CHARS = 300  # about 15-20 s of speech, inside the interactive speech timeline's buffer
SAY_TIMEOUT_S = 10.0
MAX_SYNTHESES = 2
MAX_WAV_BYTES = 8 * 1024 * 1024  # far beyond 300 characters of speech; refuses a runaway process's output

_slots = asyncio.Semaphore(MAX_SYNTHESES)  # binds to the running loop on first use


class SpeechUnavailable(RuntimeError):
    """Speech synthesis cannot run here (no espeak-ng, or it failed); the message says what to do."""


def check_text(text: str) -> str:
    """The text to speak, stripped; ValueError for empty or overlong text (the caller names the field)."""
    text = text.strip()
    if not text:
        raise ValueError("text must not be empty")
    if len(text) > MAX_SAY_CHARS:
        raise ValueError(f"text is {len(text)} characters long; the limit is {MAX_SAY_CHARS} (send several say "
                         "messages for longer speech)")
    return text


def read_wav(data: bytes) -> tuple[np.ndarray, int]:
    """(int16 mono samples, rate) from espeak-ng's WAV. Streaming to stdout, espeak-ng cannot know the length
    and writes a placeholder one, so the samples are what follows the header, however long the header says."""
    try:
        with wave.open(io.BytesIO(data)) as wav:
            if wav.getsampwidth() != 2:
                raise SpeechUnavailable(f"{ESPEAK} wrote {8 * wav.getsampwidth()}-bit audio; expected 16-bit")
            rate, channels = wav.getframerate(), wav.getnchannels()
            frames = wav.readframes(len(data))
    except (wave.Error, EOFError) as exc:
        raise SpeechUnavailable(f"{ESPEAK} wrote no readable WAV: {exc}") from None
    samples = np.frombuffer(frames[: len(frames) // (2 * channels) * 2 * channels], "<i2").reshape(-1, channels)
    return samples.mean(axis=1).astype(np.int16) if channels > 1 else samples[:, 0].copy(), rate


async def synthesize(text: str, binary: str = ESPEAK, voice: str = VOICE) -> tuple[np.ndarray, int]:
    """Speak `text` (already checked) with espeak-ng; (int16 mono samples, their rate). Raises
    SpeechUnavailable when the binary is missing, fails or overruns its deadline."""
    path = shutil.which(binary)
    if path is None:
        raise SpeechUnavailable(f"say needs {binary}, which is not installed on the server "
                                f"(Debian/Ubuntu: apt-get install {binary}); or send the avatar's speech as audio")
    async with _slots:
        proc = await asyncio.create_subprocess_exec(
            path, "--stdout", "--stdin", "-b", "1", "-v", voice, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(proc.communicate(text.encode()), SAY_TIMEOUT_S)
        except asyncio.TimeoutError:
            await _kill(proc)
            raise SpeechUnavailable(f"{binary} did not finish within {SAY_TIMEOUT_S:g} s") from None
        except asyncio.CancelledError:  # the session ended meanwhile: leave no process behind
            await _kill(proc)
            raise
    if proc.returncode != 0:
        reason = err.decode(errors="replace").strip()[:200] or f"exit status {proc.returncode}"
        raise SpeechUnavailable(f"{binary} failed: {reason}")
    if len(out) > MAX_WAV_BYTES:
        raise SpeechUnavailable(f"{binary} wrote {len(out)} bytes of audio; the limit is {MAX_WAV_BYTES}")
    return read_wav(out)


async def _kill(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    await proc.wait()
