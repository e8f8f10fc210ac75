"""`livecache bench realtime`: live sessions driven from loopback clients, measured from the client side.

For 1, 2 and 4 concurrent sessions (websocket and WebRTC) it reports time to first frame, steady FPS,
audio-to-mouth latency, dropped frames and, for websocket sessions, interruption latency. The client speaks a
fixed pattern (silence, then talk/pause) in real time; audio-to-mouth is the time from sending a speech onset
to receiving the first frame whose mouth is open — measured by the client (frame header for websocket, decoded
pixels for WebRTC), so it includes transport, playout delay, rendering and smoothing. The server runs in its own process
(`livecache serve`, started by `loopback.spawn_server`); nothing here imports it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from statistics import median

ONSET_LEAD_S = 1.0
TALK_S = 1.0
PAUSE_S = 1.0
OPEN_HEADER = 0.25  # header "mouth" (0..1) counted as open
OPEN_PIXELS = 0.02  # dark-pixel fraction counted as open (see loopback.mouth_openness)
CLOSED_HEADER = 0.05  # header "mouth" counted as closed after an interruption (the server's own bar)
INTERRUPT_SPEECH_S = 3.0  # the avatar's speech each interruption cuts off


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[1].replace("\n", " ")
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 2, 4], help="concurrency levels (default 1 2 4)")
    parser.add_argument("--transport", choices=["ws", "webrtc", "both"], default="both")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each session (default 8)")
    parser.add_argument("--size", type=int, choices=[256, 384, 512],
                        help="frame size (default: the engine's own, /api/info session_defaults)")
    parser.add_argument("--fps", type=float, default=25.0)
    parser.add_argument("--engine", default="embedded", help="the engine of the server it starts (default embedded)")
    parser.add_argument("--url", help="measure a running server (http://HOST:PORT) instead of starting one; its "
                        "engine is read from its /api/info")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    parser.add_argument("--ray", action="store_true",
                        help="instead: sessions held at --fps (websocket, at each --sessions level) and the "
                             "first-frame time, for the single-process server and `serve --ray` with one and two "
                             "replicas (a local Ray instance each), in the same run")


def _onsets() -> list[float]:
    """Seconds from the first audio sample to each speech onset of the pattern."""
    return [ONSET_LEAD_S + i * (TALK_S + PAUSE_S) for i in range(8)]


def _onset_latency(frames: list[tuple[float, float]], audio_start: float | None, threshold: float) -> float | None:
    """Median over onsets of (first open frame received - onset sent), frames as (received, openness)."""
    if audio_start is None:
        return None
    lat = []
    for onset in _onsets():
        sent = audio_start + onset
        opened = next((t for t, o in frames if t >= sent and o >= threshold), None)
        if opened is not None and opened - sent < TALK_S:
            lat.append(opened - sent)
    return 1000.0 * median(lat) if lat else None


def _steady_fps(times: list[float]) -> float:
    """Frames per second after the first second (start-up excluded, as a viewer would judge it)."""
    later = [t for t in times if t >= times[0] + 1.0] if times else []
    return (len(later) - 1) / (later[-1] - later[0]) if len(later) > 1 and later[-1] > later[0] else 0.0


async def _ws_one(url: str, seconds: float, options: dict) -> dict:
    from ..examples.ws_client import stream, to_pcm16
    from ..pipelines.testsignal import talk_and_pause
    from .loopback import ws_url

    audio = to_pcm16(talk_and_pause(TALK_S, PAUSE_S, 8, 16000, lead_s=ONSET_LEAD_S))
    r = await stream(ws_url(url), audio, 16000, seconds, options)
    if r.errors and not r.frames:
        raise RuntimeError(r.errors[0]["message"])
    times = [t for t, _ in r.frames]
    start = r.chunks_sent[0] if r.chunks_sent else None
    return {
        "ttff_ms": 1000.0 * (times[0] - r.started) if times else None,
        "fps": _steady_fps(times),
        "a2m_ms": _onset_latency([(t, h["mouth"]) for t, h in r.frames], start, OPEN_HEADER),
        "server": r.stats,
    }


async def _rtc_one(url: str, seconds: float, options: dict) -> dict:
    from ..pipelines.testsignal import talk_and_pause
    from .loopback import RTC_RATE, rtc_session

    audio = talk_and_pause(TALK_S, PAUSE_S, 8, RTC_RATE, lead_s=ONSET_LEAD_S)
    r = await rtc_session(url, audio, seconds, options)
    times = [t for t, _ in r.frames]
    return {
        "ttff_ms": 1000.0 * (times[0] - r.offered) if times else None,
        "fps": _steady_fps(times),
        "a2m_ms": _onset_latency(r.frames, r.audio_started, OPEN_PIXELS),
        "server": r.stats,
    }


async def _interrupt_one(url: str, options: dict) -> dict:
    """An interactive websocket session: the avatar's speech sent ahead of real time, interrupted mid-sentence
    once the mouth moves. Client side: from sending `interrupt` to receiving the first frame from the cut on
    (pts >= the event's `at`) whose mouth is closed; also the server's own `interrupt_latency_ms`."""
    import asyncio
    import time

    import websockets

    from ..examples.ws_client import to_pcm16, unpack_frame
    from ..pipelines.testsignal import speech_like
    from .loopback import ws_url

    speech = to_pcm16(speech_like(INTERRUPT_SPEECH_S, 16000, options.get("seed", 0))).tobytes()
    async with websockets.connect(ws_url(url), max_size=16 * 1024 * 1024) as ws:
        await ws.send(json.dumps({"type": "start", "mode": "interactive", **options}))

        async def recv() -> dict | bytes:
            message = await asyncio.wait_for(ws.recv(), 10)
            return unpack_frame(message)[0] if isinstance(message, bytes) else json.loads(message)

        while (await recv()).get("type") != "ready":
            pass
        for i in range(0, len(speech), 32000):
            await ws.send(speech[i : i + 32000])
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:  # wait until the avatar is talking
            event = await recv()
            if event.get("type") == "frame" and event.get("mouth", 0.0) > OPEN_HEADER:
                break
        sent = time.monotonic()
        await ws.send(json.dumps({"type": "interrupt"}))
        cut, closed = None, None
        while closed is None and time.monotonic() < sent + 3.0:
            event = await recv()
            if event.get("type") == "interrupted":
                cut = float(event["at"])
            elif event.get("type") == "frame" and cut is not None and event["pts"] >= cut \
                    and event.get("mouth", 0.0) <= CLOSED_HEADER:
                closed = time.monotonic()
        await ws.send(json.dumps({"type": "stats"}))
        while (stats := await recv()).get("type") != "stats":
            pass
        await ws.send(json.dumps({"type": "stop"}))
    return {"interrupt_ms": None if closed is None else 1000.0 * (closed - sent), "server": stats}


async def _level(url: str, transport: str, n: int, seconds: float, options: dict) -> dict:
    import asyncio

    one = _ws_one if transport == "ws" else _rtc_one
    runs = await asyncio.gather(*(one(url, seconds, {**options, "seed": i}) for i in range(n)))
    # interruption is measured on websocket sessions, where frame headers carry the mouth and the media time
    cuts = await asyncio.gather(*(_interrupt_one(url, {**options, "seed": i}) for i in range(n))) \
        if transport == "ws" else []

    server = [r["server"] for r in runs]
    return {
        "transport": transport, "sessions": n,
        "ttff_ms": _median(r["ttff_ms"] for r in runs), "fps": _median(r["fps"] for r in runs),
        "audio_to_mouth_ms": _median(r["a2m_ms"] for r in runs),
        "server_audio_to_mouth_ms": _median(s.get("audio_to_mouth_ms") for s in server),
        "dropped_frames": sum(int(s.get("dropped_frames", 0)) for s in server),
        "interrupt_ms": _median(c["interrupt_ms"] for c in cuts),
        "server_interrupt_ms": _median(c["server"].get("interrupt_latency_ms") for c in cuts),
    }


def _median(values: Iterable[float | None]) -> float | None:
    """Median over sessions, ignoring sessions that had nothing to report."""
    present = [v for v in values if v is not None]
    return round(median(present), 1) if present else None


async def _run(args: argparse.Namespace, url: str) -> list[dict]:
    transports = ["ws", "webrtc"] if args.transport == "both" else [args.transport]
    options = {"fps": args.fps} if args.size is None else {"size": args.size, "fps": args.fps}
    results = []
    if not args.json:
        print(_header(), flush=True)
    for transport in transports:
        for n in args.sessions:
            results.append(await _level(url, transport, n, args.seconds, options))
            if not args.json:
                print(_row(results[-1]), flush=True)
    return results


COLUMNS = [("transport", 9), ("sessions", 8), ("ttff_ms", 9), ("fps", 7), ("audio_to_mouth_ms", 17),
           ("server_audio_to_mouth_ms", 24), ("dropped_frames", 14), ("interrupt_ms", 12),
           ("server_interrupt_ms", 19)]


def _header() -> str:
    return "  ".join(name.rjust(width) for name, width in COLUMNS)


def _row(result: dict) -> str:
    return "  ".join(("-" if result[name] is None else str(result[name])).rjust(width) for name, width in COLUMNS)


HELD = 0.95  # a level is held when every session's steady FPS reaches this share of the target


async def _idle(url: str, timeout_s: float = 30.0) -> None:
    """Until the server holds no session: the last sessions' slots are freed (the ingress learns it late)."""
    import asyncio
    import time

    import aiohttp

    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            async with http.get(url + "/api/info") as res:
                if (await res.json())["sessions"] == 0:
                    return
            await asyncio.sleep(0.5)


async def _held(url: str, levels: list[int], seconds: float, options: dict) -> dict:
    """The most concurrent websocket sessions (of `levels`) that all keep the target FPS, and the median
    first-frame time of one session alone."""
    import asyncio
    held, ttff = 0, None
    for n in sorted(levels):
        await _idle(url)
        runs = await asyncio.gather(*(_ws_one(url, seconds, {**options, "seed": i}) for i in range(n)))
        ttff = ttff if ttff is not None else _median(r["ttff_ms"] for r in runs)
        if min(r["fps"] for r in runs) < HELD * options["fps"]:
            break
        held = n
    return {"ttff_ms": ttff, "held": held, "top_level": max(levels)}  # held == top_level: at least that many


def _rss_mb(pid: int) -> float:
    """Resident memory of a local process (Linux /proc)."""
    with open(f"/proc/{pid}/status") as status:
        kb = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return round(kb / 1024, 1)


async def _fault(url: str, seconds: float, options: dict) -> dict:
    """Two sessions per replica on the two-replica cluster, one replica SIGKILLed: the longest gap between
    frames the survivors see from the kill on, and the ingress's and surviving replica's resident memory idle
    before the sessions and idle again after they close."""
    import asyncio
    import os
    import signal
    import time

    import aiohttp

    async with aiohttp.ClientSession() as http:
        async def info() -> dict:
            async with http.get(url + "/api/info") as res:
                return await res.json()

        async def sessions() -> list[dict]:
            async with http.get(url + "/api/sessions") as res:
                return await res.json()

        await _idle(url)
        start = await info()
        pids = {r["replica"]: r["pid"] for r in start["cluster"]["replicas"]}
        ingress = start["cluster"]["ingress_pid"]
        before = {"ingress": _rss_mb(ingress), **{rid: _rss_mb(pid) for rid, pid in pids.items()}}
        clients = []
        for _ in range(2 * len(pids)):
            ws = await http.ws_connect(url.replace("http", "ws", 1) + "/ws")
            await ws.send_str(json.dumps({"type": "start", **options}))
            while (reply := json.loads((await asyncio.wait_for(ws.receive(), 30)).data))["type"] != "ready":
                if reply["type"] == "error":
                    raise RuntimeError(f"fault run: a session was refused: {reply['message']}")
            clients.append(ws)
        owners = {s["session"]: s["replica"] for s in await sessions()}
        await asyncio.sleep(1.0)
        victim = sorted(pids)[0]
        os.kill(pids[victim], signal.SIGKILL)
        killed = time.monotonic()

        async def longest_gap(ws: aiohttp.ClientWebSocketResponse) -> float | None:
            last, gap = killed, 0.0
            while time.monotonic() < killed + seconds:
                msg = await asyncio.wait_for(ws.receive(), 5)
                if msg.type == aiohttp.WSMsgType.BINARY:
                    gap, last = max(gap, time.monotonic() - last), time.monotonic()
                elif msg.type != aiohttp.WSMsgType.TEXT:
                    return None  # this one was on the killed replica
            return gap

        gaps = [g for g in await asyncio.gather(*(longest_gap(ws) for ws in clients)) if g is not None]
        for ws in clients:
            await ws.close()
        survivor = next(rid for rid in pids if rid != victim)
        await _idle(url)
        await asyncio.sleep(2.0)
        after = {"ingress": _rss_mb(ingress), survivor: _rss_mb(pids[survivor])}
    return {"sessions": len(owners), "survivors": len(gaps), "max_gap_ms": round(1000 * max(gaps), 1),
            "rss_mb": {"ingress": [before["ingress"], after["ingress"]],
                       "replica": [before[survivor], after[survivor]]}}


def _ray_main(args: argparse.Namespace) -> list[dict]:
    """Single process, then one and two replicas of `levels[-1]` sessions each, one server at a time."""
    import asyncio

    from .loopback import spawn_server

    top = str(max(args.sessions))
    options = {"fps": args.fps} if args.size is None else {"size": args.size, "fps": args.fps}
    setups = [("single process", 1, ["--max-sessions", top])]
    setups += [("ray", r, ["--ray", "--sessions-per-replica", top, "--min-replicas", str(r), "--max-replicas",
                           str(r), "--replica-cpus", "0"]) for r in (1, 2)]
    levels = sorted(set(args.sessions) | {2 * n for n in args.sessions})  # two replicas may hold twice as many
    rows = []
    for name, replicas, extra in setups:
        with spawn_server("--engine", args.engine, *extra, timeout_s=120.0) as url:
            found = asyncio.run(_held(url, levels if replicas > 1 else args.sessions, args.seconds, options))
            if replicas > 1:
                fault = asyncio.run(_fault(url, args.seconds, options))
        rows.append({"setup": name, "replicas": replicas, **found})
        if not args.json:
            held = f"{'>=' if found['held'] == found['top_level'] else ''}{found['held']}"
            print(f"{name:>15}  {replicas:>8}  {held:>22}  "
                  f"{'-' if found['ttff_ms'] is None else found['ttff_ms']:>9}", flush=True)
    rows.append({"setup": "fault", **fault})
    if not args.json:
        print(f"replica killed with {fault['sessions']} sessions on 2 replicas: the {fault['survivors']} others' "
              f"longest gap between frames {fault['max_gap_ms']} ms; resident MB idle before / after: "
              f"ingress {fault['rss_mb']['ingress']}, surviving replica {fault['rss_mb']['replica']}", flush=True)
    return rows


def main(args: argparse.Namespace) -> int:
    import asyncio
    import os

    from .loopback import spawn_server

    if max(args.sessions) < 1:
        print("--sessions must be positive", file=sys.stderr)
        return 2
    try:
        if args.ray:
            _announce(args, args.engine, f"{os.cpu_count()} CPU cores")
            if not args.json:
                print(f"{'setup':>15}  {'replicas':>8}  {'sessions held at ' + format(args.fps, 'g') + ' fps':>22}"
                      f"  {'ttff_ms':>9}", flush=True)
            results = _ray_main(args)
        elif args.url:
            url = args.url.rstrip("/")
            engine = asyncio.run(remote_engine(url))
            _announce(args, engine, "a remote server")
            results = asyncio.run(_run(args, url))
        else:
            engine = args.engine
            _announce(args, engine, f"{os.cpu_count()} CPU cores")
            with spawn_server("--engine", args.engine, "--max-sessions", str(max(args.sessions))) as url:
                results = asyncio.run(_run(args, url))
    except (OSError, RuntimeError, ValueError) as exc:  # aiohttp's client errors are OSErrors
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"engine": engine, "url": args.url, "size": args.size, "fps_target": args.fps,
                          "cpu_cores": None if args.url else os.cpu_count(), "results": results}, indent=2))
    return 0


def _announce(args: argparse.Namespace, engine: str, where: str) -> None:
    if not args.json:
        size = "the engine's default size" if args.size is None else f"{args.size}x{args.size}"
        print(f"realtime bench: engine {engine}, {size} @ {args.fps:g} fps target, "
              f"{args.seconds:g} s per session, {where}; times from the client side")


async def remote_engine(url: str) -> str:
    """The engine a running server serves, from its /api/info (what `--engine` says is only this machine's)."""
    import aiohttp

    async with aiohttp.ClientSession() as http, http.get(f"{url}/api/info") as res:
        if res.status != 200:
            raise RuntimeError(f"{url}/api/info answered {res.status}: is this a livecache server?")
        return str((await res.json())["engine"])
