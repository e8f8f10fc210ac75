"""Scale-out on a local Ray cluster (127.0.0.1): two replicas of the embedded engine behind the ingress, and
workflow batches as Ray tasks. One cluster for the module (replicas import the pack, so starting is the slow
part), shut down at the end."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import pytest
import ray  # the `ray` extra; scripts/test.sh installs it

from livecache.cli import main as cli_main
from livecache.realtime.ray_live import RayLiveServer
from livecache.realtime.ray_serve import ClusterConfig, session_policy

WORKFLOW = json.loads((Path(__file__).parent.parent / "workflows" /
                       "deepcache_default_api.json").read_text())


@pytest.fixture(scope="module")
def cluster():
    ray.init(address="local", include_dashboard=False, num_cpus=2, _node_ip_address="127.0.0.1",
             object_store_memory=100 * 1024 * 1024, log_to_driver=False)
    loop = asyncio.new_event_loop()
    # autoscaled between one and two replicas of two sessions each; short delays so the test sees both ways
    config = ClusterConfig(sessions_per_replica=2, min_replicas=1, max_replicas=2, replica_cpus=0.5,
                           upscale_delay_s=0.5, downscale_delay_s=2.0)
    server = loop.run_until_complete(RayLiveServer(cluster=config).start())
    yield SimpleNamespace(server=server, loop=loop)
    loop.run_until_complete(server.stop())
    loop.close()
    ray.shutdown()


async def get(url: str):
    async with aiohttp.ClientSession() as http, http.get(url) as res:
        return res.status, await res.json()


async def next_json(ws, kind: str) -> dict:
    """The next JSON message of `kind` (frames and other messages skipped), within 10 s."""
    while True:
        msg = await asyncio.wait_for(ws.receive(), 10)
        if msg.type == aiohttp.WSMsgType.TEXT and json.loads(msg.data)["type"] == kind:
            return json.loads(msg.data)
        assert msg.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY), msg


async def frames_within(ws, seconds: float) -> int:
    count, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        msg = await asyncio.wait_for(ws.receive(), 5)
        assert msg.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY), msg
        if msg.type == aiohttp.WSMsgType.TEXT:
            assert json.loads(msg.data)["type"] != "error", msg.data
        count += msg.type == aiohttp.WSMsgType.BINARY
    return count


async def wait_sessions(base: str, count: int, timeout_s: float = 15.0) -> int:
    deadline = time.monotonic() + timeout_s
    while True:
        _, info = await get(base + "/api/info")
        if info["sessions"] == count or time.monotonic() > deadline:
            return info["sessions"]
        await asyncio.sleep(0.25)


def ray_processes(tmp: str) -> list[str]:
    """Command lines of the live processes of the Ray instance whose files are under `tmp` (its raylet, GCS,
    workers and replicas all name their session folder there)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = next(line for line in (proc / "status").read_text().splitlines() if line.startswith("State:"))
        except (OSError, StopIteration):
            continue
        if tmp in cmd and "zombie" not in state:
            found.append(cmd)
    return found


def test_sigint_ends_every_session_with_shutdown_and_stops_ray():
    """Ctrl-C of `livecache serve --ray` (its own local Ray, before the module's cluster starts): the client gets
    `stopped` with reason "shutdown", the command exits 0 and no process of its Ray instance is left."""
    import subprocess
    import sys
    import tempfile

    tmp = tempfile.mkdtemp(prefix="lcray", dir="/tmp")  # short: Ray's socket paths live under it
    proc = subprocess.Popen(
        [sys.executable, "-m", "livecache.cli", "serve", "--ray", "--port", "0", "--min-replicas", "1",
         "--max-replicas", "1", "--sessions-per-replica", "2", "--replica-cpus", "0.5"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "RAY_TMPDIR": tmp})
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "websocket API:" in line:
                break
        assert "websocket API:" in "".join(lines), "".join(lines)
        url = lines[-1].split(" on ", 1)[1].split("/ ", 1)[0]
        while_running = len(ray_processes(tmp))

        async def run():
            async with aiohttp.ClientSession() as http:
                ws = await http.ws_connect(url.replace("http", "ws", 1) + "/ws")
                await ws.send_str(json.dumps({"type": "start", "size": 256}))
                await next_json(ws, "ready")
                frames = await frames_within(ws, 1.0)
                proc.send_signal(signal.SIGINT)
                stopped = await asyncio.wait_for(next_json(ws, "stopped"), 30)
                closed = await asyncio.wait_for(ws.receive(), 30)
                return frames, stopped, closed.type

        frames, stopped, closed = asyncio.run(run())
        output = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    left = ray_processes(tmp)
    deadline = time.monotonic() + 10  # ray.shutdown has signalled them; the last ones may take a moment to go
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = ray_processes(tmp)
    assert frames > 0 and stopped["reason"] == "shutdown", stopped
    assert closed in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)
    assert proc.returncode == 0, output
    assert "stopping: closing sessions" in output
    assert while_running > 0 and left == [], left


async def replica_count(base: str, count: int, timeout_s: float) -> int:
    """The ingress's replica count once it is `count`, or whatever it is after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        _, info = await get(base + "/api/info")
        found = len(info["cluster"]["replicas"])
        if found == count or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.5)


def test_autoscaled_sessions_spread_and_a_killed_replica_ends_only_its_sessions(cluster):
    """One replica when idle; the sessions filling it add the second one (where the next sessions land); `busy`
    only when both are full; a killed replica ends only its sessions; closing them all scales back to one."""
    base = cluster.server.url

    async def run():
        async with aiohttp.ClientSession() as http:
            idle = await replica_count(base, 1, 30.0)
            clients, ready = [], []
            for _ in range(4):
                ws = await http.ws_connect(base.replace("http", "ws", 1) + "/ws")
                await ws.send_str(json.dumps({"type": "start", "size": 256}))
                ready.append(await next_json(ws, "ready"))
                clients.append(ws)
            extra = await http.ws_connect(base.replace("http", "ws", 1) + "/ws")
            await extra.send_str(json.dumps({"type": "start", "size": 256}))
            busy = await next_json(extra, "error")
            await extra.close()
            _, listed = await get(base + "/api/sessions")
            _, info = await get(base + "/api/info")
            owner = {s["session"]: s["replica"] for s in listed}
            # the page reads the session defaults and audio rates from the ingress as from a single server
            assert info["session_defaults"]["size"] in info["session_defaults"]["sizes"]
            assert info["audio"]["webrtc_rate"] == 48000
            # a control through the ingress reaches the replica that owns the session
            async with http.post(f"{base}/api/sessions/{ready[0]['session']}/interrupt") as res:
                interrupted = res.status, await res.json()
            victim = owner[ready[0]["session"]]
            pid = next(r["pid"] for r in info["cluster"]["replicas"] if r["replica"] == victim)
            os.kill(pid, signal.SIGKILL)
            lost, survivors = [], []
            for ws, r in zip(clients, ready, strict=True):
                if owner[r["session"]] == victim:
                    lost.append((await next_json(ws, "error"), await next_json(ws, "stopped")))
                else:
                    survivors.append(ws)
            after = [await frames_within(ws, 2.0) for ws in survivors]
            for ws in survivors:
                await ws.send_str(json.dumps({"type": "stop"}))
                await next_json(ws, "stopped")
            remaining = await wait_sessions(base, 0)
            _, final = await get(base + "/api/info")
            scaled_down = await replica_count(base, 1, 60.0)
            return idle, ready, busy, listed, info, interrupted, lost, after, remaining, final, scaled_down

    idle, ready, busy, listed, info, interrupted, lost, after, remaining, final, scaled_down = \
        cluster.loop.run_until_complete(run())
    assert idle == 1
    assert len({r["session"] for r in ready}) == 4
    owners = [next(s["replica"] for s in listed if s["session"] == r["session"]) for r in ready]
    assert owners[0] == owners[1] != owners[2] == owners[3], owners  # the added replica took the new sessions
    assert busy["code"] == "busy" and "cluster is at its limit" in busy["message"]
    per_replica = sorted(r["sessions"] for r in info["cluster"]["replicas"])
    assert per_replica == [2, 2] and len({s["replica"] for s in listed}) == 2
    assert info["sessions"] == 4 and info["max_sessions"] == 4
    assert interrupted[0] == 200 and "dropped_ms" in interrupted[1]
    assert len(lost) == 2 and all(e["code"] == "engine_lost" and s["reason"] == "engine_lost" for e, s in lost)
    assert len(after) == 2 and all(n >= 10 for n in after), after  # 2 s at 25 fps: the others kept streaming
    assert remaining == 0
    assert final["counters"]["sessions_ended"].get("engine_lost") == 2
    assert scaled_down == 1  # idle again: Serve removed the extra replica


def test_webrtc_offer_is_answered_by_a_replica(cluster):
    from aiortc import RTCPeerConnection, RTCSessionDescription

    base = cluster.server.url

    async def run():
        pc, tracks = RTCPeerConnection(), asyncio.Queue()
        pc.on("track", tracks.put_nowait)
        pc.addTransceiver("video", direction="recvonly")  # a viewer without a microphone
        await pc.setLocalDescription(await pc.createOffer())
        async with aiohttp.ClientSession() as http:
            async with http.post(base + "/api/offer", json={"sdp": pc.localDescription.sdp, "type": "offer"}) as res:
                status, answer = res.status, await res.json()
            assert status == 200, answer
            await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
            frame = await asyncio.wait_for((await asyncio.wait_for(tracks.get(), 10)).recv(), 10)
            _, stats = await get(f"{base}/api/sessions/{answer['session']}")
            async with http.post(f"{base}/api/sessions/{answer['session']}/stop") as res:
                stopped = res.status
        await pc.close()
        return frame, stats, stopped, await wait_sessions(base, 0)

    frame, stats, stopped, remaining = cluster.loop.run_until_complete(run())
    assert frame.width == 512 and stats["session"] and stopped == 200 and remaining == 0


def test_portrait_uploaded_through_the_ingress_is_used_on_every_replica(cluster):
    base = cluster.server.url

    async def start(http, portrait: str) -> tuple[aiohttp.ClientWebSocketResponse, dict]:
        ws = await http.ws_connect(base.replace("http", "ws", 1) + "/ws")
        await ws.send_str(json.dumps({"type": "start", "size": 256, "portrait": portrait}))
        while True:  # the first reply that is `ready` or an error (a third session waits for a replica to start)
            reply = json.loads((await asyncio.wait_for(ws.receive(), 60)).data)
            if reply["type"] in ("ready", "error"):
                return ws, reply

    async def run():
        async with aiohttp.ClientSession() as http:
            # start from a settled idle cluster: a scale-down still under way when the sessions open would stop a
            # replica Serve has already chosen, whatever it holds
            await wait_sessions(base, 0)
            await replica_count(base, 1, 30.0)
            async with http.get(base + "/api/portraits/default.png") as res:
                face = await res.read()
            async with http.post(base + "/api/portraits", data=b"garbage") as res:
                refused = res.status, await res.json()
            async with http.post(base + "/api/portraits", data=face) as res:
                uploaded = res.status, await res.json()
            pid = uploaded[1]["portrait"]
            # three sessions need both replicas (two slots each); the upload went to only one of them
            opened = [await start(http, pid) for _ in range(3)]
            _, listed = await get(base + "/api/sessions")
            frames = [await frames_within(ws, 1.0) for ws, _ in opened]
            unknown_ws, unknown = await start(http, "nope")
            await unknown_ws.close()
            for ws, _ in opened:
                await ws.send_str(json.dumps({"type": "stop"}))
                await next_json(ws, "stopped")
        return refused, uploaded, [r for _, r in opened], listed, frames, unknown, await wait_sessions(base, 0)

    refused, uploaded, ready, listed, frames, unknown, remaining = cluster.loop.run_until_complete(run())
    assert refused[0] == 400 and "decodable" in refused[1]["error"]  # the replica's validation, relayed
    assert uploaded[0] == 200
    assert [r["type"] for r in ready] == ["ready"] * 3, ready
    assert len({s["replica"] for s in listed}) == 2  # the portrait was handed to both replicas
    assert all(n > 0 for n in frames), frames
    assert unknown["type"] == "error" and "unknown portrait" in unknown["message"]
    assert remaining == 0


def test_workflow_batch_on_ray_writes_the_good_results_and_names_the_broken_node(cluster, tmp_path, capsys):
    def workflow(name: str, **deepcache) -> str:
        api = json.loads(json.dumps(WORKFLOW))
        api["3"]["inputs"].update(steps=4, batch_size=1)
        api["2"]["inputs"].update(deepcache)
        api["5"]["inputs"]["filename_prefix"] = name
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(api))
        return str(path)

    files = [workflow("good_a"), workflow("broken", cache_branch_id=15), workflow("good_b")]
    code = cli_main(["run", *files, "--ray", "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1
    assert sorted(p.name for p in (tmp_path / "out").rglob("*.png")) == ["good_a_00000.png", "good_b_00000.png"]
    assert "broken.json: error: node 2 (LiveCacheDeepCache) failed" in err
    assert "2 of 3 workflows ran; 1 failed" in err


def test_session_policy_scales_from_live_sessions():
    def ctx(sessions: list[float], capacity: float = 4.0):
        replicas = [f"r{i}" for i in range(len(sessions))]
        return SimpleNamespace(current_num_replicas=len(sessions), policy_state={},
                               aggregated_metrics={"sessions": dict(zip(replicas, sessions, strict=True)),
                                                   "capacity": {r: capacity for r in replicas}})

    assert session_policy(ctx([3.0]))[0] == 1  # 3 of 4 slots: at the fill target, enough
    assert session_policy(ctx([4.0]))[0] == 2  # full: one more
    assert session_policy(ctx([4.0, 4.0]))[0] == 3
    assert session_policy(ctx([0.0, 0.0]))[0] == 0  # idle: Serve keeps min_replicas
    assert session_policy(ctx([1.0, 0.0]))[0] == 2  # one session would fit one replica, but Serve might stop its
    assert session_policy(ctx([0.2, 0.0, 0.0]))[0] == 3  # a session's last moments in the look-back window
    empty = SimpleNamespace(current_num_replicas=2, policy_state={}, aggregated_metrics={})
    assert session_policy(empty)[0] == 2  # no metrics yet: keep what runs
