"""A real browser joins the live page: Debian chromium, driven by playwright, with a speech WAV as the mic.

Needs `apt-get install chromium` and `pip install playwright` (the browser binary comes from Debian;
`playwright install` is never used).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import soundfile as sf
import torch
from playwright.async_api import async_playwright

from livecache.bench.loopback import spawn_server
from livecache.pipelines.portrait import default_portrait
from livecache.pipelines.testsignal import talk_and_pause

CHROMIUM = "/usr/bin/chromium"
# what only an avatar with a voice has: the mode, the say box, interrupt, mute, the microphone and its meter
AVATAR_ONLY = ("#mode-box", "#say-box", "#interrupt", "#mute", "#mic", ".meter", "#state-badge")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--use-fake-ui-for-media-stream",
         "--use-fake-device-for-media-stream"]


@contextlib.asynccontextmanager
async def open_page(url: str, wav: str | None = None, viewport: dict | None = None):
    """Chromium on the live page (the WAV as its microphone), once the page knows its engine; yields the page and
    the list its script errors go to."""
    args = [*FLAGS, f"--use-file-for-fake-audio-capture={wav}"] if wav else FLAGS
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=args)
        try:
            page = await browser.new_page(viewport=viewport or {"width": 1100, "height": 820})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await page.goto(url + "/")
            await page.wait_for_function("window.live.engine !== null")
            yield page, errors
        finally:
            await browser.close()


@pytest.fixture
def speech_wav(tmp_path):
    """1.5 s of talk, 1.5 s of silence; chromium loops the file as its microphone."""
    path = tmp_path / "speech.wav"
    sf.write(path, talk_and_pause(1.5, 1.5, 1, 48000), 48000, subtype="PCM_16")
    return path


def keep(shot: Path) -> None:
    """Copy a screenshot to LIVECACHE_SCREENSHOTS (a folder) to look at: does it look like a product?"""
    folder = os.environ.get("LIVECACHE_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(folder) / shot.name)


async def upload(page, path: Path) -> tuple[str, str]:
    """Pick a portrait file in the page; returns (message text, message class) once it has answered."""
    await page.evaluate("document.getElementById('message').textContent = ''")
    await page.set_input_files("#portrait-file", str(path))
    settled = "!['', 'checking the portrait…'].includes(document.getElementById('message').textContent)"
    await page.wait_for_function(settled)
    return await page.inner_text("#message"), await page.get_attribute("#message", "class")


async def join_and_watch(url: str, wav: str, seconds: float, portraits: Path) -> dict:
    async with open_page(url, wav) as (page, errors):
        rejected = await upload(page, portraits / "garbage.png")
        accepted = await upload(page, portraits / "face.png")
        await page.check("input[name=mode][value=mirror]")  # the avatar says back what the microphone hears
        await page.click("#start")
        await page.wait_for_function("window.live.framesShown > 0", timeout=10000)
        first_ms = await page.evaluate("window.live.firstFrameMs")
        shown_before = await page.evaluate("window.live.framesShown")
        mouth = []
        for _ in range(int(seconds / 0.1)):
            mouth.append(await page.evaluate("window.live.sampleMouth()"))
            await asyncio.sleep(0.1)
        shown = await page.evaluate("window.live.framesShown") - shown_before
        await page.wait_for_function("window.live.stats.steady_fps > 0", timeout=5000)
        stats = await page.evaluate("window.live.stats")
        shown_metrics = await page.inner_text("#metrics")
        await page.click("#stop")
        return {"rejected": rejected, "accepted": accepted, "portrait": await page.evaluate("window.live.portrait"),
                "first_ms": first_ms, "shown": shown, "mouth": mouth, "stats": stats, "errors": errors,
                "metrics_text": shown_metrics}


@pytest.fixture
def portraits(tmp_path):
    """A broken upload and a good one (the default face, re-encoded as the user's own file)."""
    (tmp_path / "garbage.png").write_bytes(b"\x89PNG but not really")
    cv2.imwrite(str(tmp_path / "face.png"), cv2.cvtColor(default_portrait(640), cv2.COLOR_RGB2BGR))
    return tmp_path


def test_browser_joins_and_sees_the_mouth_move(speech_wav, portraits):
    seconds = 6.0
    with spawn_server() as url:
        seen = asyncio.run(join_and_watch(url, str(speech_wav), seconds, portraits))
    assert not seen["errors"]
    assert seen["rejected"][1] == "error" and "not a decodable image" in seen["rejected"][0]
    assert seen["accepted"][1] != "error" and seen["portrait"] != "default"
    assert seen["first_ms"] < 5000  # generous: the reviewer's bar is 1 s on an idle machine
    assert seen["shown"] > 10 * seconds  # frames keep arriving (25 fps when the machine is not shared)
    mouth = np.array([m for m in seen["mouth"] if m is not None])
    assert mouth.size > 0.8 * seconds / 0.1
    assert mouth.max() > 0.03  # open while the WAV speaks
    assert np.percentile(mouth, 20) < 0.01  # closed in its silences
    assert 0 < seen["stats"]["steady_fps"] <= 1.1 * 25 and seen["stats"]["frames"] > 0  # paced, never faster
    assert "time to first frame" in seen["metrics_text"]


async def watch_video_engine(url: str, screenshot: Path) -> dict:
    """The page against `--engine video`: what it shows, a stream started from the prompt box, a change."""
    async with open_page(url, viewport={"width": 1000, "height": 760}) as (page, errors):
        visible = {sel: await page.is_visible(sel) for sel in
                   ("#prompt-box", "#prompt", "#portrait-box", "#portrait-file", ".states", "#stream",
                    "#metrics [data-key=audio_to_mouth_ms]", "#metrics [data-key=state]", *AVATAR_ONLY,
                    "#size", "#conn", "#engine-badge")}
        poster = await page.get_attribute("#stream", "poster")
        await page.fill("#prompt", "texture")
        await page.click("#start")
        await page.wait_for_function("window.live.framesShown > 5", timeout=20000)
        first = await page.inner_text("#message")
        await page.fill("#prompt", "a seven")
        await page.click("#prompt-set")
        await page.wait_for_function("document.getElementById('message').textContent.startsWith('now')")
        changed = await page.inner_text("#message")
        await page.wait_for_function("window.live.stats.frames > 0", timeout=5000)
        await page.screenshot(path=str(screenshot))
        mouth = await page.evaluate("window.live.sampleMouth()")
        tracks = await page.evaluate("window.live.pc.getReceivers().map((r) => r.track.kind)")
        await page.click("#stop")
        return {"visible": visible, "poster": poster, "first": first, "changed": changed, "errors": errors,
                "mouth": mouth, "tracks": tracks, "title": await page.inner_text("h1")}


def test_page_shows_a_prompt_and_the_stream_for_the_video_engine(tmp_path):
    with spawn_server("--engine", "video") as url:
        seen = asyncio.run(watch_video_engine(url, tmp_path / "video-page.png"))
    assert not seen["errors"]
    visible = seen["visible"]
    assert visible["#prompt-box"] and visible["#prompt"] and visible["#stream"]
    assert not any(visible[sel] for sel in ("#portrait-box", "#portrait-file", ".states", *AVATAR_ONLY,
                                            "#metrics [data-key=audio_to_mouth_ms]", "#metrics [data-key=state]"))
    assert visible["#size"] and visible["#conn"] and visible["#engine-badge"]
    assert seen["poster"] is None and seen["title"] == "LiveCache live video"  # no face anywhere
    assert seen["first"] == "drawing: texture" or seen["first"].startswith("first frame")
    assert seen["changed"] == "now drawing: digit 7"
    assert seen["mouth"] is None and seen["tracks"] == ["video"]  # no mouth to sample, no audio track
    assert (tmp_path / "video-page.png").stat().st_size > 10_000
    keep(tmp_path / "video-page.png")


needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")


async def interactive_session(url: str, wav: str, shots: Path) -> dict:
    """The page's interactive mode: the user talks (the WAV as the microphone), the avatar says typed text, the
    Interrupt button cuts it off; mute silences the microphone."""
    async with open_page(url, wav, viewport={"width": 1100, "height": 900}) as (page, errors):
        before = {"phase": await page.inner_text("#conn"), "size": await page.input_value("#size"),
                  "visible": {sel: await page.is_visible(sel) for sel in AVATAR_ONLY}}
        await page.uncheck("#auto-interrupt")  # the WAV talks all along; here the button interrupts
        await page.click("#start")
        await page.wait_for_function("window.live.framesShown > 10", timeout=15000)
        await page.wait_for_function("window.live.micLevel > 0.3", timeout=5000)  # the meter hears the WAV
        await page.wait_for_function("window.live.stats.state === 'listening'", timeout=8000)
        listening = await page.inner_text("#state-badge")
        await page.fill("#say-text", "Hello there, I am the live avatar, and I will keep talking for a while.")
        await page.click("#say-send")
        await page.wait_for_function("document.getElementById('message').textContent.startsWith('speaking')",
                                     timeout=15000)
        await page.wait_for_function("window.live.stats.state === 'speaking'", timeout=8000)
        await page.evaluate("window.live.recordMouth(true)")
        await page.wait_for_function("Math.max(...window.live.mouthLog) > 0.03", timeout=5000)
        await page.screenshot(path=str(shots / "avatar-speaking.png"))
        talking = await page.evaluate("window.live.mouthLog.length")
        await page.click("#interrupt")
        await page.wait_for_function("document.getElementById('message').textContent.startsWith('interrupted')")
        replied = await page.evaluate("window.live.mouthLog.length")
        await page.wait_for_function(f"window.live.mouthLog.length > {replied + 25}", timeout=10000)
        mouth = await page.evaluate("window.live.mouthLog")
        await page.wait_for_function("window.live.stats.interrupts === 1", timeout=5000)
        stats = await page.evaluate("window.live.stats")
        message = await page.inner_text("#message")
        await page.click("#mute")
        await page.wait_for_function("window.live.micLevel === 0", timeout=3000)
        muted = await page.evaluate("window.live.mic.getAudioTracks().every((t) => !t.enabled)")
        await page.screenshot(path=str(shots / "avatar-interrupted-muted.png"))
        await page.click("#stop")
        await page.wait_for_function("window.live.phase !== 'live'")
        return {"before": before, "listening": listening, "talking": talking, "replied": replied,
                "mouth": mouth, "stats": stats, "message": message, "muted": muted, "errors": errors,
                "phase": await page.inner_text("#conn")}


@needs_espeak
def test_interactive_page_speaks_typed_text_and_the_interrupt_button_closes_the_mouth(speech_wav, tmp_path):
    with spawn_server() as url:
        seen = asyncio.run(interactive_session(url, str(speech_wav), tmp_path))
    for shot in ("avatar-speaking.png", "avatar-interrupted-muted.png"):
        keep(tmp_path / shot)
    assert not seen["errors"]
    assert seen["before"]["phase"] == "not connected" and seen["before"]["size"] == "512"
    assert all(seen["before"]["visible"].values()), seen["before"]["visible"]
    assert seen["listening"] == "listening"  # the user talks, the avatar is silent
    mouth = seen["mouth"]
    assert max(mouth[: seen["talking"]]) > 0.03  # it spoke the typed text
    # every frame the browser shows once the reply is in and its few buffered frames are out is closed; the
    # server counts the latency (request to the first closed frame from the cut on, about one frame period)
    assert all(m < 0.01 for m in mouth[seen["replied"] + 8 :]), mouth[seen["replied"] :]
    assert seen["stats"]["interrupts"] == 1 and seen["stats"]["interrupt_latency_ms"] is not None
    assert seen["stats"]["state"] != "speaking" and seen["message"].startswith("interrupted:")
    assert seen["muted"] and seen["phase"] == "session ended"


async def falling_behind(url: str, shots: Path) -> dict:
    """The server's session stats say frames drop (the page's metrics request answered by the test): the page
    warns; a failed control leaves an error, which the next Start clears."""
    drops = {"n": 0}

    async def slow_server(route):
        response = await route.fetch()
        if route.request.method != "GET" or response.status != 200:
            await route.fulfill(response=response)
            return
        stats = await response.json()
        drops["n"] += 7
        stats.update(dropped_frames=drops["n"], steady_fps=11.5)
        await route.fulfill(response=response, json=stats)

    async with open_page(url) as (page, errors):
        await page.click("#start")
        await page.wait_for_function("window.live.framesShown > 30", timeout=15000)
        await page.route(f"{url}/api/sessions/*", slow_server)
        # (a loaded machine may drop real frames first: wait for the warning about the reported ones)
        await page.wait_for_function("(window.live.warning || '').includes('11.5 of 25')", timeout=5000)
        visible = await page.is_visible("#warning")
        warning = await page.inner_text("#warning")
        await page.screenshot(path=str(shots / "avatar-falling-behind.png"))
        await page.unroute_all(behavior="wait")
        await page.fill("#say-text", " ")
        await page.click("#say-send")  # an empty text: an error under the stream
        failed = (await page.inner_text("#message"), await page.get_attribute("#message", "class"))
        await page.click("#stop")
        await page.click("#start")
        await page.wait_for_function("window.live.framesShown > 0", timeout=15000)
        after = (await page.inner_text("#message"), await page.get_attribute("#message", "class"))
        return {"visible": visible, "warning": warning, "failed": failed, "after": after, "errors": errors,
                "warning_after": await page.evaluate("window.live.warning")}


def test_page_warns_when_frames_drop_and_a_new_session_clears_the_error(tmp_path):
    with spawn_server() as url:
        seen = asyncio.run(falling_behind(url, tmp_path))
    keep(tmp_path / "avatar-falling-behind.png")
    assert not seen["errors"]
    assert seen["visible"] and seen["warning"].startswith("The server is falling behind: 11.5 of 25 fps")
    assert "Try 384 px" in seen["warning"]
    assert seen["failed"] == ("type something for the avatar to say", "error")
    assert seen["after"][1] != "error" and seen["after"][0] != seen["failed"][0]
    assert seen["warning_after"] is None  # the old session's warning went with it


async def diffusion_page(url: str, shots: Path) -> dict:
    async with open_page(url) as (page, errors):
        await page.screenshot(path=str(shots / "diffusion-page.png"))
        return {"size": await page.input_value("#size"), "note": await page.inner_text("#size-note"),
                "badge": await page.inner_text("#engine-badge")}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the server would run the diffusion engine on the GPU")
def test_page_preselects_the_size_the_diffusion_engine_holds_on_a_cpu(tmp_path):
    """Old behaviour: the page sent 512 px whatever the engine and device, 6-10 fps for diffusion on a CPU."""
    with spawn_server("--engine", "diffusion", "--max-sessions", "1") as url:
        seen = asyncio.run(diffusion_page(url, tmp_path))
    keep(tmp_path / "diffusion-page.png")
    assert seen["size"] == "256" and seen["badge"] == "diffusion engine"
    assert seen["note"].startswith("256 px is this server's default for the diffusion engine on its device")
