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
    config = ClusterConfig(sessions_per_replica=2, min_replicas=2, max_replicas=2, replica_cpus=0.5)
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


def test_sessions_spread_over_replicas_and_a_killed_replica_ends_only_its_sessions(cluster):
    base = cluster.server.url

    async def run():
        async with aiohttp.ClientSession() as http:
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
            return ready, busy, listed, info, interrupted, lost, after, remaining, final

    ready, busy, listed, info, interrupted, lost, after, remaining, final = cluster.loop.run_until_complete(run())
    assert len({r["session"] for r in ready}) == 4
    assert busy["code"] == "busy" and "cluster is at its limit" in busy["message"]
    per_replica = sorted(r["sessions"] for r in info["cluster"]["replicas"])
    assert per_replica == [2, 2] and len({s["replica"] for s in listed}) == 2
    assert info["sessions"] == 4 and info["max_sessions"] == 4
    assert interrupted[0] == 200 and "dropped_ms" in interrupted[1]
    assert len(lost) == 2 and all(e["code"] == "engine_lost" and s["reason"] == "engine_lost" for e, s in lost)
    assert len(after) == 2 and all(n >= 10 for n in after), after  # 2 s at 25 fps: the others kept streaming
    assert remaining == 0
    assert final["counters"]["sessions_ended"].get("engine_lost") == 2


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
    empty = SimpleNamespace(current_num_replicas=2, policy_state={}, aggregated_metrics={})
    assert session_policy(empty)[0] == 2  # no metrics yet: keep what runs
