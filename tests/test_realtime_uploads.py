"""Portrait uploads: header-first limits (decompression bombs), formats, broken files, orientation, and the
decoder that runs them off the render workers with a bound on how many are in flight."""

from __future__ import annotations

import asyncio
import io
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from livecache.pipelines.portrait import PortraitError, default_portrait
from livecache.realtime import hub as hub_module
from livecache.realtime import portrait as portrait_module
from livecache.realtime.engines import create_engine
from livecache.realtime.engines.base import SessionOptions
from livecache.realtime.hub import LimitError, SessionHub
from livecache.realtime.portrait import KEEP_SIDE, decode_upload


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def zero_png(w: int, h: int) -> bytes:
    """A valid greyscale PNG of zeros: tens of kilobytes on disk, w*h bytes once decoded."""
    packer = zlib.compressobj(9)
    rows_per_block = max(1, (1 << 22) // (w + 1))
    parts, left = [], h
    while left:
        n = min(left, rows_per_block)
        parts.append(packer.compress(b"\x00" * ((w + 1) * n)))
        left -= n
    parts.append(packer.flush())
    header = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", b"".join(parts)) + _chunk(b"IEND", b"")


def png_header(w: int, h: int) -> bytes:
    """Just the signature and IHDR of a w x h PNG: enough for a header-first check, nothing to decode."""
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + _chunk(b"IEND", b"")


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


FACE = Image.fromarray(default_portrait(512))


def test_a_decompression_bomb_is_refused_from_its_header_without_decoding():
    """8192x8192 zeros is 65 KB as a file; decoding it took 0.35 s and ~450 MB before the header was read first."""
    # a fresh process measures its own peak memory; portrait.py alone keeps it small (no torch import)
    script = (
        "import importlib, resource, sys, types\n"
        "package = sys.modules['lc'] = types.ModuleType('lc')\n"  # the repository as a package, minus its
        "package.__path__ = [sys.argv[1]]\n"  # ComfyUI entry (__init__.py), which would import torch
        "portrait = importlib.import_module('lc.realtime.portrait')\n"
        "data = sys.stdin.buffer.read()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"
        "    portrait.decode_upload(data)\n"
        "except portrait.PortraitError as exc:\n"
        "    print(exc)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n"
    )
    bomb = zero_png(8192, 8192)
    assert len(bomb) < 100_000
    root = str(Path(portrait_module.__file__).parents[1])
    out = subprocess.run([sys.executable, "-c", script, root], input=bomb, capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr.decode()
    message, grown_mb = out.stdout.decode().strip().splitlines()
    assert "8192x8192" in message and "between 128 and 4096" in message
    assert int(grown_mb) < 50, f"decoding grew the process by {grown_mb} MB"


@pytest.mark.parametrize("size", [(128, 4097), (100, 300), (40000, 40000), (32768, 32767)])
def test_oversized_headers_are_refused_with_the_limit(size):
    with pytest.raises(PortraitError, match="sides must be between 128 and 4096"):
        decode_upload(png_header(*size))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (encode(FACE, "GIF"), "not a decodable image"),
        (encode(FACE, "BMP"), "not a decodable image"),
        (encode(FACE, "TIFF"), "not a decodable image"),
        (encode(FACE, "PNG")[:3000], "truncated or corrupt PNG"),
        (encode(FACE, "JPEG")[:2000], "truncated or corrupt JPEG"),
    ],
)
def test_other_formats_and_broken_files_get_clear_errors(data, message):
    with pytest.raises(PortraitError, match=message):
        decode_upload(data)


def test_png_jpeg_and_webp_decode_to_the_same_face():
    reference = np.asarray(FACE, np.float32)
    for fmt in ("PNG", "JPEG", "WEBP"):
        rgb = decode_upload(encode(FACE, fmt, quality=95) if fmt != "PNG" else encode(FACE, fmt))
        assert rgb.shape == (512, 512, 3) and rgb.dtype == np.uint8
        assert np.abs(rgb.astype(np.float32) - reference).mean() < 4.0, fmt


def test_large_jpeg_is_decoded_at_a_reduced_scale_and_kept_small():
    big = FACE.resize((4000, 4000))
    rgb = decode_upload(encode(big, "JPEG", quality=90))
    assert rgb.shape == (KEEP_SIDE, KEEP_SIDE, 3)


def test_exif_orientation_is_applied():
    tall = Image.fromarray(np.concatenate([np.full((200, 300, 3), 255, np.uint8),
                                           np.zeros((100, 300, 3), np.uint8)]))  # white on top of black
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    rgb = decode_upload(encode(tall, "JPEG", exif=exif, quality=95))
    assert rgb.shape == (300, 300, 3)
    assert rgb[:, :50].mean() < 40 and rgb[:, -50:].mean() > 215  # the black band is now on the left


def test_animated_image_gives_its_first_frame_and_alpha_is_dropped():
    frames = [Image.new("RGBA", (200, 200), (255, 0, 0, 255)), Image.new("RGBA", (200, 200), (0, 0, 255, 128))]
    data = encode(frames[0], "PNG", save_all=True, append_images=frames[1:])
    rgb = decode_upload(data)
    assert rgb.shape == (200, 200, 3) and tuple(rgb[100, 100]) == (255, 0, 0)


def test_sixteen_bit_greyscale_is_scaled_not_clipped():
    grey = Image.fromarray(np.full((200, 200), 32768, np.uint16))
    rgb = decode_upload(encode(grey, "PNG"))
    assert abs(int(rgb[0, 0, 0]) - 128) <= 1


def test_uploads_decode_off_the_render_workers_and_are_bounded(monkeypatch):
    """Uploads stuck in decoding must not delay a session's frames, and past the bound they are refused."""
    release = threading.Event()

    def stuck_decode(data: bytes) -> np.ndarray:
        release.wait(10)
        return default_portrait(256)

    monkeypatch.setattr(hub_module, "_validated", stuck_decode)

    async def run():
        hub = SessionHub(create_engine("embedded"), max_sessions=2)
        try:
            uploads = [asyncio.create_task(hub.add_portrait(b"x")) for _ in range(hub.decoder.max_pending)]
            await asyncio.sleep(0.2)
            with pytest.raises(LimitError, match="being decoded"):
                await hub.add_portrait(b"x")
            session = await asyncio.wait_for(hub.open(SessionOptions(size=256), "websocket", "default"), 5)
            frames = session.frames()
            first = await asyncio.wait_for(anext(frames), 5)
            second = await asyncio.wait_for(anext(frames), 5)
            release.set()
            ids = await asyncio.wait_for(asyncio.gather(*uploads), 10)
            await session.close("client")
            return first, second, ids, hub.counters.snapshot()
        finally:
            release.set()
            await hub.close()

    first, second, ids, counters = asyncio.run(run())
    assert second.t > first.t and len(set(ids)) == len(ids)
    assert counters["refused"] == {"decode_busy": 1} and counters["sessions_ended"] == {"client": 1}
