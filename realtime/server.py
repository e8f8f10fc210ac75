"""The one-port live server (aiohttp): the page, portrait upload, WebRTC signaling and the websocket API.

aiohttp is used because aiortc's own examples build on it and because the websocket API, static files
and POST signaling then share one port and one event loop.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from dataclasses import asdict, dataclass
from pathlib import Path

from aiohttp import web

from .engines import create_engine
from .engines.base import STATES
from .guard import ConnectionGuard
from .hub import (
    CONDITION_FIELDS,
    CONNECT_TIMEOUT_S,
    MAX_FPS,
    MAX_PENDING_DECODES,
    SESSION_FIELDS,
    SIZES,
    LimitError,
    SessionHub,
    condition_value,
)
from .metrics import ServerCounters
from .portrait import MAX_SIDE, MAX_UPLOAD_BYTES, MIN_SIDE, UPLOAD_FORMATS, PortraitError
from .schema import Field, SchemaError, validate
from .session import LiveSession
from .speech import SpeechUnavailable
from .webrtc import AUDIO_RATE as WEBRTC_AUDIO_RATE
from .webrtc import answer_offer
from .wsapi import MAX_AUDIO_MESSAGE, MAX_FRAME_AUDIO_S, MAX_MESSAGE, SAY_FIELDS
from .wsapi import handle as handle_ws

WEB_ROOT = Path(__file__).resolve().parent.parent / "web" / "live"
STATE_BODY = {"state": Field("string", choices=(*STATES, "auto"))}


@dataclass(frozen=True)
class ServerLimits:
    """Every limit that keeps one server serving many clients (`livecache serve` options; /api/info reports them)."""

    max_sessions: int = 4
    connect_timeout_s: float = CONNECT_TIMEOUT_S  # a WebRTC offer must connect within this
    head_timeout_s: float = 10.0  # a new connection must deliver a complete request head within this
    body_timeout_s: float = 60.0  # ... and the request's body within this (a 4 MB portrait at ~0.6 Mbit/s)
    keepalive_s: float = 15.0  # an idle kept-alive connection (or a partial later request) is closed after this
    max_connections_per_address: int = 32


def _error(status: int, message: str, field: str | None = None) -> web.Response:
    body: dict[str, object] = {"error": message}
    if field is not None:
        body["field"] = field
    return web.json_response(body, status=status)


def _bad_request(exc: ValueError) -> web.Response:
    """400 with the client-facing message, naming the field when a schema check failed."""
    return _error(400, str(exc), exc.field if isinstance(exc, SchemaError) else None)


async def _json_body(request: web.Request) -> object:
    try:
        return await request.json()
    except (ValueError, RecursionError) as exc:  # bad syntax or encoding, absurd numbers or nesting
        raise ValueError(f"request body must be JSON: {exc}") from None


def _session(request: web.Request) -> LiveSession:
    hub: SessionHub = request.app["hub"]
    session = hub.sessions.get(request.match_info["sid"])
    if session is None:
        raise web.HTTPNotFound(text=json.dumps({"error": "no such session"}), content_type="application/json")
    return session


@web.middleware
async def bounded_body(request: web.Request, handler):
    """Read every request body whole, within the body deadline and the size limit, before a handler runs: no
    handler can then wait forever on a client that stops sending, and each answers 408/413 the same way."""
    limits: ServerLimits = request.app["limits"]
    if request.body_exists:
        try:
            await asyncio.wait_for(request.read(), limits.body_timeout_s)  # cached: handlers read it again
        except asyncio.TimeoutError:
            request.app["counters"].refused["body_timeout"] += 1
            response = _error(408, f"request body not received within {limits.body_timeout_s:g} s")
            response.force_close()
            return response
        except web.HTTPRequestEntityTooLarge:
            response = _error(413, f"request body is larger than {request.client_max_size} bytes (portraits: "
                              f"at most {MAX_UPLOAD_BYTES} bytes)")
            response.force_close()
            return response
    return await handler(request)


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(WEB_ROOT / "index.html")


async def info(request: web.Request) -> web.Response:
    hub: SessionHub = request.app["hub"]
    return web.json_response({
        "engine": hub.engine.name, "capabilities": hub.engine.traits.as_json(),
        "sessions": len(hub.sessions), "max_sessions": hub.max_sessions,
        "connecting": sum(not s.connected for s in hub.sessions.values()),
        "session_defaults": {"size": hub.engine.default_size, "sizes": list(SIZES),
                             "fps": SESSION_FIELDS["fps"].default, "max_fps": MAX_FPS},
        "audio": {"engine_rate": hub.engine.sample_rate, "webrtc_rate": WEBRTC_AUDIO_RATE,
                  "max_frame_audio_s": MAX_FRAME_AUDIO_S},
        "limits": {"max_message_bytes": MAX_MESSAGE, "max_audio_message_bytes": MAX_AUDIO_MESSAGE,
                   "max_portrait_bytes": MAX_UPLOAD_BYTES, "portrait_sides": [MIN_SIDE, MAX_SIDE],
                   "portrait_formats": list(UPLOAD_FORMATS), "max_pending_decodes": MAX_PENDING_DECODES,
                   **asdict(request.app["limits"])},
        "counters": request.app["counters"].snapshot(),
        "render": hub.worker.render_stats(),
    })


async def default_portrait(request: web.Request) -> web.Response:
    return web.Response(body=request.app["hub"].default_png(), content_type="image/png")


async def upload_portrait(request: web.Request) -> web.Response:
    try:
        pid = await request.app["hub"].add_portrait(await request.read())
    except LimitError as exc:
        return _error(503, str(exc))
    except PortraitError as exc:
        return _error(400, str(exc))
    return web.json_response({"portrait": pid})


async def offer(request: web.Request) -> web.Response:
    try:
        return web.json_response(await answer_offer(request.app["hub"], await _json_body(request)))
    except LimitError as exc:
        return _error(503, str(exc))
    except ValueError as exc:  # PortraitError and SchemaError included
        return _bad_request(exc)


async def sessions(request: web.Request) -> web.Response:
    hub: SessionHub = request.app["hub"]
    return web.json_response([s.stats() for s in hub.sessions.values()])


async def session_stats(request: web.Request) -> web.Response:
    return web.json_response(_session(request).stats())


async def session_state(request: web.Request) -> web.Response:
    session = _session(request)
    try:
        body = validate(await _json_body(request), STATE_BODY, "the body")
        await session.force_state(str(body["state"]))
    except SchemaError as exc:
        return _bad_request(exc)
    except ValueError as exc:  # an engine without states
        return _error(400, str(exc), "state")
    return web.json_response(session.stats())


async def session_condition(request: web.Request) -> web.Response:
    """Change an engine's condition mid-stream (the video engine's class/prompt); same body as the
    websocket `condition` message without its "type". The engine applies it on its worker, in turn with the
    session's frames."""
    session = _session(request)
    try:
        body = validate(await _json_body(request), CONDITION_FIELDS, 'the body (such as {"prompt": "7"})')
        return web.json_response(await session.condition(condition_value(body)))
    except ValueError as exc:
        return _bad_request(exc)


async def session_interrupt(request: web.Request) -> web.Response:
    """Barge-in for any session (the page's WebRTC sessions have no websocket): the `interrupted` event."""
    session = _session(request)
    if request.body_exists:
        try:
            validate(await _json_body(request), {}, "the body")
        except ValueError as exc:
            return _bad_request(exc)
    return web.json_response(await session.interrupt())


async def session_say(request: web.Request) -> web.Response:
    """Speak text as the avatar of an interactive session (espeak-ng); 503 when the server cannot synthesise."""
    session = _session(request)
    try:
        body = validate(await _json_body(request), SAY_FIELDS, 'the body (such as {"text": "Hello"})')
        return web.json_response(await session.say(str(body["text"])))
    except SpeechUnavailable as exc:
        return _error(503, str(exc))
    except SchemaError as exc:
        return _bad_request(exc)
    except ValueError as exc:
        return _error(400, str(exc), "text")


async def session_stop(request: web.Request) -> web.Response:
    session = _session(request)
    await session.close("api")
    return web.json_response(session.stats())


async def _on_startup(app: web.Application) -> None:
    engine = create_engine(app["engine_name"], **app["engine_options"])
    limits: ServerLimits = app["limits"]
    app["hub"] = SessionHub(engine, max_sessions=limits.max_sessions, connect_timeout_s=limits.connect_timeout_s,
                            counters=app["counters"])
    await app["hub"].warm_up()


async def _on_shutdown(app: web.Application) -> None:
    """End sessions (their clients hear `stopped`, reason "shutdown"), then close the remaining websockets,
    before the loop stops, so no task outlives the server."""
    hub: SessionHub = app["hub"]
    await hub.end_sessions("shutdown")
    await asyncio.gather(*(c.ws.close(code=1001, message=b"server shutdown") for c in list(app["connections"])),
                         return_exceptions=True)
    await hub.close()


# the HTTP API, by handler name: the single server and the Ray ingress serve the same routes with their own handlers
ROUTES = (("GET", "/", "index"), ("GET", "/ws", "ws"), ("GET", "/api/info", "info"),
          ("GET", "/api/portraits/default.png", "default_portrait"), ("POST", "/api/portraits", "upload_portrait"),
          ("POST", "/api/offer", "offer"), ("GET", "/api/sessions", "sessions"),
          ("GET", "/api/sessions/{sid}", "session_stats"), ("POST", "/api/sessions/{sid}/state", "session_state"),
          ("POST", "/api/sessions/{sid}/condition", "session_condition"),
          ("POST", "/api/sessions/{sid}/interrupt", "session_interrupt"),
          ("POST", "/api/sessions/{sid}/say", "session_say"), ("POST", "/api/sessions/{sid}/stop", "session_stop"))


def guarded_app(limits: ServerLimits, handlers: dict[str, object]) -> web.Application:
    """An app with the connection guard, the bounded body reads, the counters and every route of ROUTES served by
    `handlers` (name -> aiohttp handler), plus the page's static files."""
    counters = ServerCounters()
    guard = ConnectionGuard(counters, limits.max_connections_per_address, limits.head_timeout_s)
    app = web.Application(client_max_size=MAX_UPLOAD_BYTES + 1024, middlewares=[guard.middleware, bounded_body])
    app.update(limits=limits, counters=counters, guard=guard, connections=set())
    for method, path, name in ROUTES:
        app.router.add_route(method, path, handlers[name])  # type: ignore[arg-type]
    app.router.add_static("/live/", WEB_ROOT)
    return app


def build_app(engine: str = "embedded", limits: ServerLimits | None = None,
              engine_options: dict[str, object] | None = None) -> web.Application:
    app = guarded_app(limits or ServerLimits(), {
        "index": index, "ws": handle_ws, "info": info, "default_portrait": default_portrait,
        "upload_portrait": upload_portrait, "offer": offer, "sessions": sessions, "session_stats": session_stats,
        "session_state": session_state, "session_condition": session_condition,
        "session_interrupt": session_interrupt, "session_say": session_say, "session_stop": session_stop})
    app["engine_name"] = engine
    app["engine_options"] = dict(engine_options or {})
    app.on_startup.append(_on_startup)
    app.on_shutdown.append(_on_shutdown)
    return app


class LiveServer:
    """Start/stop wrapper used by the CLI, the bench and the tests (port 0 picks a free port).

    It listens with `loop.create_server` on aiohttp's protocol factory (`runner.server`) wrapped in the
    connection guard, which is why it does not use aiohttp's TCPSite.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, engine: str = "embedded",
                 limits: ServerLimits | None = None, ssl_context: ssl.SSLContext | None = None,
                 engine_options: dict[str, object] | None = None, app: web.Application | None = None):
        self.host, self.port = host, port
        self.ssl_context = ssl_context
        self.limits = limits or ServerLimits()
        # `app`: another front on the same listener (the Ray ingress), with a ConnectionGuard as app["guard"]
        self.app = app if app is not None else build_app(engine, self.limits, engine_options)
        self._runner = web.AppRunner(self.app, handle_signals=False, shutdown_timeout=2.0,
                                     keepalive_timeout=self.limits.keepalive_s)
        self._listener: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://{self.host}:{self.port}"

    @property
    def hub(self) -> SessionHub:
        return self.app["hub"]

    async def start(self) -> LiveServer:
        await self._runner.setup()
        assert self._runner.server is not None
        factory = self.app["guard"].protocol_factory(self._runner.server)
        tls = {"ssl": self.ssl_context, "ssl_handshake_timeout": self.limits.head_timeout_s} if self.ssl_context else {}
        self._listener = await asyncio.get_running_loop().create_server(factory, self.host, self.port, **tls)
        self.port = self._listener.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()  # no new connections; the runner then shuts the open ones down
        await self._runner.cleanup()
