"""The ingress of `livecache serve --ray`: the same page, HTTP API and websocket API, in front of engine replicas.

It holds no session itself. A new session goes to the replica with the most free slots (`ReplicaPool.place`);
from then on everything of that session goes to that replica: the websocket is relayed frame for frame (the
replica's own server runs the session, batching its engine across all of its sessions), a WebRTC offer is
forwarded and the answer returned, so the media flows between the browser and the replica, and the session's
HTTP controls are forwarded to the replica that owns it. A replica that dies mid-session ends exactly its
sessions: their relays see the connection drop without a close frame and tell the client `engine_lost`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp
from aiohttp import WSMsgType, web

from .hub import LimitError
from .metrics import ServerCounters
from .server import ROUTES, ServerLimits, guarded_app, index
from .server import _error as error_response
from .wsapi import CLOSE_CODES, MAX_MESSAGE

REFRESH_S = 1.0  # how often the ingress reads each replica's load
PROBE_TIMEOUT_S = 2.0  # a replica that does not answer within this is taken as gone
SCALE_WAIT_S = 30.0  # how long a session waits for a replica the autoscaler is adding, before `busy`
MAX_PORTRAITS = 16
ABNORMAL = {None, aiohttp.WSCloseCode.ABNORMAL_CLOSURE}  # the replica's end of the relay vanished


@dataclass
class Replica:
    """What the ingress knows of one replica: its server, its load (refreshed every REFRESH_S) and the sessions
    being opened on it right now (counted before the replica reports them)."""

    id: str
    url: str
    pid: int
    node: str
    info: dict[str, Any] = field(default_factory=dict)
    sessions: list[dict[str, Any]] = field(default_factory=list)
    opening: int = 0
    portraits: dict[str, str] = field(default_factory=dict)  # ingress portrait id -> the replica's id

    @property
    def free(self) -> int:
        return int(self.info.get("max_sessions", 0)) - int(self.info.get("sessions", 0)) - self.opening

    def summary(self) -> dict[str, object]:
        """Per-replica metrics for /api/info: its sessions, their frame rate, its engine's render time."""
        live = [s for s in self.sessions if s.get("phase") == "live"]
        fps = [float(s["steady_fps"]) for s in live if s.get("steady_fps")]
        return {"replica": self.id, "url": self.url, "pid": self.pid, "node": self.node,
                "sessions": self.info.get("sessions", 0), "max_sessions": self.info.get("max_sessions", 0),
                "connecting": self.info.get("connecting", 0),
                "mean_fps": round(sum(fps) / len(fps), 2) if fps else None,
                "render": self.info.get("render"), "counters": self.info.get("counters")}


class ReplicaPool:
    """The replicas the directory lists, their load, and which replica owns each session."""

    def __init__(self, directory: Any, http: aiohttp.ClientSession, max_replicas: int, counters: ServerCounters,
                 scale_wait_s: float = SCALE_WAIT_S) -> None:
        self.directory = directory
        self.http = http
        self.max_replicas = max_replicas
        self.counters = counters
        self.scale_wait_s = scale_wait_s
        self.replicas: dict[str, Replica] = {}
        self.owners: dict[str, tuple[str, float]] = {}  # session id -> (replica id, when it was opened)
        self._refreshed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._keep_fresh())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _keep_fresh(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_S)
            await self.refresh()

    async def refresh(self) -> None:
        """Re-read the directory and every replica's load; forget replicas that stopped answering (Serve starts
        a replacement, which registers itself) and sessions their replicas no longer have."""
        listed: dict[str, dict[str, Any]] = await self.directory.replicas.remote()
        for rid, entry in listed.items():
            if rid not in self.replicas:
                self.replicas[rid] = Replica(rid, entry["url"], int(entry["pid"]), str(entry["node"]))
        for rid in [r for r in self.replicas if r not in listed]:
            del self.replicas[rid]
        probes = await asyncio.gather(*(self._probe(r) for r in self.replicas.values()))
        for replica, alive in zip(list(self.replicas.values()), probes, strict=True):
            if not alive:
                del self.replicas[replica.id]
                await self.directory.forget.remote(replica.id)
        self._prune_owners()
        self._refreshed.set()
        self._refreshed = asyncio.Event()

    async def _probe(self, replica: Replica) -> bool:
        try:
            timeout = aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)
            async with self.http.get(replica.url + "/api/info", timeout=timeout) as res:
                replica.info = await res.json()
            async with self.http.get(replica.url + "/api/sessions", timeout=timeout) as res:
                replica.sessions = await res.json()
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            return False
        return True

    def _prune_owners(self) -> None:
        live = {s["session"] for r in self.replicas.values() for s in r.sessions}
        settled = time.monotonic() - 2 * REFRESH_S  # a session opened since the last probe is not listed yet
        for sid, (rid, opened) in list(self.owners.items()):
            if rid not in self.replicas or (sid not in live and opened < settled):
                del self.owners[sid]

    async def place(self) -> Replica:
        """The replica with the most free slots; while every replica is full but the cluster may still grow, wait
        for the autoscaler's new replica. LimitError (`busy`) only when the cluster is at its limit."""
        deadline = time.monotonic() + self.scale_wait_s
        while True:
            candidates = [r for r in self.replicas.values() if r.free > 0]
            if candidates:
                best = max(candidates, key=lambda r: r.free)
                best.opening += 1
                return best
            if len(self.replicas) >= self.max_replicas or time.monotonic() >= deadline:
                self.counters.refused["busy"] += 1
                total = sum(int(r.info.get("max_sessions", 0)) for r in self.replicas.values())
                raise LimitError(f"the cluster is at its limit: {len(self.replicas)} replicas hold {total} sessions;"
                                 " try again later")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._refreshed.wait(), max(0.0, deadline - time.monotonic()))

    def opened(self, replica: Replica, sid: str | None) -> None:
        """A placement finished: the session `sid` now lives on `replica` (None: it did not open)."""
        replica.opening = max(0, replica.opening - 1)
        if sid is not None:
            self.owners[sid] = (replica.id, time.monotonic())
            replica.info["sessions"] = int(replica.info.get("sessions", 0)) + 1
            self.counters.opened += 1

    def adopt(self, replica: Replica, sid: str) -> None:
        """A session opened on `replica` after an earlier `start` on the same connection was refused there."""
        self.owners[sid] = (replica.id, time.monotonic())
        self.counters.opened += 1

    def owner(self, sid: str) -> Replica | None:
        rid = self.owners.get(sid, ("", 0.0))[0]
        return self.replicas.get(rid)

    def capabilities(self) -> dict[str, Any]:
        return next((r.info for r in self.replicas.values() if r.info), {})


class PortraitStore:
    """Uploaded portraits, kept by the ingress (any replica may be the one to need one) and handed to a replica
    the first time a session there uses them; a replica validates each upload as the single server would."""

    def __init__(self, pool: ReplicaPool) -> None:
        self.pool = pool
        self._data: OrderedDict[str, bytes] = OrderedDict()

    async def add(self, data: bytes) -> tuple[int, dict[str, Any]]:
        replica = next(iter(self.pool.replicas.values()), None)
        if replica is None:
            return 503, {"error": "no engine replica is running; try again in a moment"}
        status, body = await self._upload(replica, data)
        if status != 200:
            return status, body
        pid = uuid.uuid4().hex[:12]
        self._data[pid] = data
        replica.portraits[pid] = str(body["portrait"])
        while len(self._data) > MAX_PORTRAITS:
            self._data.popitem(last=False)
        return 200, {"portrait": pid}

    async def _upload(self, replica: Replica, data: bytes) -> tuple[int, dict[str, Any]]:
        async with self.pool.http.post(replica.url + "/api/portraits", data=data) as res:
            return res.status, await res.json()

    async def on(self, replica: Replica, pid: object) -> object:
        """The id `replica` knows portrait `pid` by, uploading it there first; other values pass unchanged (the
        replica reports unknown ids and bad values itself)."""
        if not isinstance(pid, str) or pid not in self._data:
            return pid
        if pid not in replica.portraits:
            status, body = await self._upload(replica, self._data[pid])
            if status != 200:
                return pid
            replica.portraits[pid] = str(body["portrait"])
        return replica.portraits[pid]


def _start_message(data: str) -> dict[str, Any] | None:
    with contextlib.suppress(ValueError, RecursionError):
        message = json.loads(data)
        if isinstance(message, dict) and message.get("type") == "start":
            return message
    return None


class Relay:
    """One client websocket relayed to the replica its session was placed on."""

    def __init__(self, ws: web.WebSocketResponse, pool: ReplicaPool, portraits: PortraitStore) -> None:
        self.ws, self.pool, self.portraits = ws, pool, portraits
        self.session: str | None = None
        self.replica: Replica | None = None
        self.upstream: aiohttp.ClientWebSocketResponse | None = None
        self._down: asyncio.Task[None] | None = None

    async def finished(self) -> None:
        """Wait until the replica's side has ended (the relay's last message has gone to the client)."""
        if self._down is not None:
            await asyncio.gather(self._down, return_exceptions=True)

    async def run(self) -> None:
        async for msg in self.ws:
            if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                break
            data = msg.data if self.upstream is not None else await self._connect(msg.data)
            if data is None:
                continue  # `busy`: the client may send `start` again
            assert self.upstream is not None
            if self.upstream.closed:
                break
            with contextlib.suppress(ConnectionError):
                if isinstance(data, str):
                    await self.upstream.send_str(data)
                else:
                    await self.upstream.send_bytes(data)
        if self.upstream is not None:
            await self.upstream.close()

    async def _connect(self, first: str | bytes) -> str | bytes | None:
        """Place the session (on the connection's first message) and open the relay to that replica; returns
        the first message to pass on (a `start` naming an uploaded portrait names the replica's copy of it), or
        None when there is no replica to take it."""
        try:
            replica = await self.pool.place()
        except LimitError as exc:
            await self.ws.send_json({"type": "error", "code": "busy", "message": str(exc)})
            return None
        try:
            self.upstream = await self.pool.http.ws_connect(replica.url + "/ws", max_msg_size=MAX_MESSAGE)
        except (aiohttp.ClientError, asyncio.TimeoutError):
            self.pool.opened(replica, None)
            await self.ws.send_json({"type": "error", "code": "engine_lost",
                                     "message": "the engine replica chosen for this session is unreachable; "
                                                "start again"})
            return None
        self.replica = replica
        self._down = asyncio.get_running_loop().create_task(self._downstream())
        start = _start_message(first) if isinstance(first, str) else None
        if start is not None and start.get("portrait") is not None:
            start["portrait"] = await self.portraits.on(replica, start["portrait"])
            return json.dumps(start)
        return first

    async def _downstream(self) -> None:
        """Replica to client, until the replica closes: normally (its close code passes on) or by vanishing."""
        up, replica = self.upstream, self.replica
        assert up is not None and replica is not None
        opening = True  # counted in the replica's `opening` until its first answer
        try:
            async for msg in up:
                if msg.type == WSMsgType.BINARY:
                    await self.ws.send_bytes(msg.data)
                    continue
                if msg.type != WSMsgType.TEXT:
                    break
                if self.session is None and '"ready"' in msg.data:
                    self.session = str(json.loads(msg.data)["session"])
                    if opening:
                        self.pool.opened(replica, self.session)
                    else:
                        self.pool.adopt(replica, self.session)
                    opening = False
                elif opening and '"error"' in msg.data:
                    self.pool.opened(replica, None)
                    opening = False
                await self.ws.send_str(msg.data)
        except ConnectionError:  # the client went; the replica hears its upstream close
            pass
        finally:
            if opening:
                self.pool.opened(replica, None)
            await self._ended(up)

    async def _ended(self, up: aiohttp.ClientWebSocketResponse) -> None:
        lost = up.close_code in ABNORMAL and not self.ws.closed
        if self.session is not None:
            self.pool.owners.pop(self.session, None)
        if lost and self.session is not None:
            self.pool.counters.ended["engine_lost"] += 1
            with contextlib.suppress(ConnectionError):
                await self.ws.send_json({"type": "error", "code": "engine_lost",
                                         "message": "the engine replica running this session stopped; start a new "
                                                    "session (it goes to a healthy replica)"})
                await self.ws.send_json({"type": "stopped", "reason": "engine_lost", "session": self.session})
            await self.ws.close(code=CLOSE_CODES["engine_error"], message=b"session ended: engine_lost")
        elif not self.ws.closed:
            await self.ws.close(code=up.close_code or 1000, message=b"session ended")


async def relay_ws(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE)
    await ws.prepare(request)
    relay = Relay(ws, request.app["pool"], request.app["portraits"])
    request.app["connections"].add(relay)
    try:
        await relay.run()
        await relay.finished()
    finally:
        request.app["connections"].discard(relay)
    return ws


async def _forward(request: web.Request, replica: Replica, path: str,
                   rewrite: Callable[[dict[str, Any]], Any] | None = None) -> web.Response:
    """`request` (its method and body) to `replica`'s server; the replica's answer as it is."""
    body: bytes | None = await request.read() if request.body_exists else None
    if rewrite is not None and body:
        with contextlib.suppress(ValueError, RecursionError):
            message = json.loads(body)
            if isinstance(message, dict):
                body = json.dumps(await rewrite(message)).encode()
    try:
        async with request.app["pool"].http.request(request.method, replica.url + path, data=body,
                                                     headers={"Content-Type": "application/json"}) as res:
            return web.Response(body=await res.read(), status=res.status, content_type="application/json")
    except aiohttp.ClientError:
        return error_response(502, "the engine replica of this session is unreachable (engine_lost)")


async def offer(request: web.Request) -> web.Response:
    """WebRTC: the replica answers the offer and runs the peer connection; only SDP passes through here."""
    pool: ReplicaPool = request.app["pool"]
    try:
        replica = await pool.place()
    except LimitError as exc:
        return error_response(503, str(exc))

    async def portrait(message: dict[str, Any]) -> dict[str, Any]:
        if message.get("portrait") is not None:
            message["portrait"] = await request.app["portraits"].on(replica, message["portrait"])
        return message

    response = await _forward(request, replica, "/api/offer", portrait)
    sid = json.loads(response.body).get("session") if response.status == 200 else None  # type: ignore[arg-type]
    pool.opened(replica, sid)
    return response


async def upload_portrait(request: web.Request) -> web.Response:
    status, body = await request.app["portraits"].add(await request.read())
    return web.json_response(body, status=status)


async def session_call(request: web.Request) -> web.Response:
    """GET /api/sessions/{sid} and its POST controls, on the replica that owns the session."""
    replica = request.app["pool"].owner(request.match_info["sid"])
    if replica is None:
        return error_response(404, "no such session")
    return await _forward(request, replica, request.path)


async def info(request: web.Request) -> web.Response:
    """The cluster as one server: engine and capabilities, sessions and capacity summed over the replicas, each
    replica's own metrics, the deployment's shape and the ingress's counters."""
    pool: ReplicaPool = request.app["pool"]
    replicas = list(pool.replicas.values())
    first = pool.capabilities()
    return web.json_response({
        "engine": first.get("engine"), "capabilities": first.get("capabilities"),
        # every replica runs the same engine, so its defaults and audio rates are the cluster's
        "session_defaults": first.get("session_defaults"), "audio": first.get("audio"),
        "sessions": sum(int(r.info.get("sessions", 0)) for r in replicas),
        "max_sessions": request.app["cluster"].max_sessions,
        "connecting": sum(int(r.info.get("connecting", 0)) for r in replicas),
        "limits": {**first.get("limits", {}), **asdict(request.app["limits"])},
        "counters": pool.counters.snapshot(),
        "cluster": {**request.app["cluster"].as_json(), "ingress_pid": os.getpid(),
                    "replicas": [r.summary() for r in replicas]},
    })


async def sessions(request: web.Request) -> web.Response:
    pool: ReplicaPool = request.app["pool"]
    await pool.refresh()
    return web.json_response([{**s, "replica": r.id} for r in pool.replicas.values() for s in r.sessions])


async def _default_png(request: web.Request) -> web.Response:
    return web.Response(body=request.app["default_png"], content_type="image/png")


def build_ingress(pool_factory: Callable[[web.Application], Any], cluster: Any,
                  limits: ServerLimits) -> web.Application:
    """The ingress app (the single server's routes); `pool_factory(app)` makes its ReplicaPool once the loop
    runs."""
    controls = {name: session_call for _, _, name in ROUTES if name.startswith("session_")}
    app = guarded_app(limits, {**controls, "index": index, "ws": relay_ws, "info": info,
                               "default_portrait": _default_png, "upload_portrait": upload_portrait,
                               "offer": offer, "sessions": sessions})
    app["cluster"] = cluster

    async def startup(app: web.Application) -> None:
        import cv2

        from ..pipelines.portrait import default_portrait as portrait

        app["default_png"] = cv2.imencode(".png", cv2.cvtColor(portrait(512), cv2.COLOR_RGB2BGR))[1].tobytes()
        app["pool"] = await pool_factory(app)
        app["portraits"] = PortraitStore(app["pool"])

    app.on_startup.append(startup)
    return app
