"""The one-port live server (aiohttp): the page, portrait upload, WebRTC signaling and the websocket API.

aiohttp is used because aiortc's own examples build on it and because the websocket API, static files
and POST signaling then share one port and one event loop.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from pathlib import Path

from aiohttp import web

from .engines import create_engine
from .hub import LimitError, SessionHub
from .portrait import MAX_UPLOAD_BYTES, PortraitError
from .session import LiveSession
from .webrtc import answer_offer
from .wsapi import MAX_AUDIO_MESSAGE, MAX_MESSAGE
from .wsapi import handle as handle_ws

WEB_ROOT = Path(__file__).resolve().parent.parent / "web" / "live"


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


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


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(WEB_ROOT / "index.html")


async def info(request: web.Request) -> web.Response:
    hub: SessionHub = request.app["hub"]
    return web.json_response({
        "engine": hub.engine.name, "sessions": len(hub.sessions), "max_sessions": hub.max_sessions,
        "limits": {"max_message_bytes": MAX_MESSAGE, "max_audio_message_bytes": MAX_AUDIO_MESSAGE,
                   "max_portrait_bytes": MAX_UPLOAD_BYTES},
    })


async def default_portrait(request: web.Request) -> web.Response:
    return web.Response(body=request.app["hub"].default_png(), content_type="image/png")


async def upload_portrait(request: web.Request) -> web.Response:
    try:
        data = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return _error(413, f"portrait is larger than {MAX_UPLOAD_BYTES} bytes")
    try:
        pid = await request.app["hub"].add_portrait(data)
    except PortraitError as exc:
        return _error(400, str(exc))
    return web.json_response({"portrait": pid})


async def offer(request: web.Request) -> web.Response:
    try:
        return web.json_response(await answer_offer(request.app["hub"], await _json_body(request)))
    except LimitError as exc:
        return _error(503, str(exc))
    except (PortraitError, ValueError) as exc:
        return _error(400, str(exc))


async def sessions(request: web.Request) -> web.Response:
    hub: SessionHub = request.app["hub"]
    return web.json_response([s.stats() for s in hub.sessions.values()])


async def session_stats(request: web.Request) -> web.Response:
    return web.json_response(_session(request).stats())


async def session_state(request: web.Request) -> web.Response:
    session = _session(request)
    try:
        body = await _json_body(request)
        session.states.force(body.get("state") if isinstance(body, dict) else None)
    except ValueError as exc:
        return _error(400, str(exc))
    return web.json_response(session.stats())


async def session_condition(request: web.Request) -> web.Response:
    """Change an engine's condition mid-stream (the video engine's class/prompt); same body as the
    websocket `condition` message without its "type"."""
    session = _session(request)
    try:
        body = await _json_body(request)
        if not isinstance(body, dict):
            raise ValueError('the body must be a JSON object such as {"prompt": "7"}')
        return web.json_response(session.engine_session.control(body))
    except ValueError as exc:
        return _error(400, str(exc))


async def session_stop(request: web.Request) -> web.Response:
    session = _session(request)
    await session.close()
    return web.json_response(session.stats())


async def _on_startup(app: web.Application) -> None:
    engine = create_engine(app["engine_name"], **app["engine_options"])
    app["hub"] = SessionHub(engine, max_sessions=app["max_sessions"])
    await app["hub"].warm_up()


async def _on_shutdown(app: web.Application) -> None:
    """Close websockets and sessions before the loop stops, so no task outlives the server."""
    await asyncio.gather(*(c.ws.close(code=1001, message=b"server shutdown") for c in list(app["connections"])),
                         return_exceptions=True)
    await app["hub"].close()


def build_app(engine: str = "embedded", max_sessions: int = 4,
              engine_options: dict[str, object] | None = None) -> web.Application:
    app = web.Application(client_max_size=MAX_UPLOAD_BYTES + 1024)
    app["engine_name"] = engine
    app["engine_options"] = dict(engine_options or {})
    app["max_sessions"] = max_sessions
    app["connections"] = set()
    app.on_startup.append(_on_startup)
    app.on_shutdown.append(_on_shutdown)
    app.router.add_get("/", index)
    app.router.add_get("/ws", handle_ws)
    app.router.add_get("/api/info", info)
    app.router.add_get("/api/portraits/default.png", default_portrait)
    app.router.add_post("/api/portraits", upload_portrait)
    app.router.add_post("/api/offer", offer)
    app.router.add_get("/api/sessions", sessions)
    app.router.add_get("/api/sessions/{sid}", session_stats)
    app.router.add_post("/api/sessions/{sid}/state", session_state)
    app.router.add_post("/api/sessions/{sid}/condition", session_condition)
    app.router.add_post("/api/sessions/{sid}/stop", session_stop)
    app.router.add_static("/live/", WEB_ROOT)
    return app


class LiveServer:
    """Start/stop wrapper used by the CLI, the bench and the tests (port 0 picks a free port)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, engine: str = "embedded", max_sessions: int = 4,
                 ssl_context: ssl.SSLContext | None = None, engine_options: dict[str, object] | None = None):
        self.host, self.port = host, port
        self.ssl_context = ssl_context
        self.app = build_app(engine, max_sessions, engine_options)
        self._runner = web.AppRunner(self.app, handle_signals=False)

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://{self.host}:{self.port}"

    @property
    def hub(self) -> SessionHub:
        return self.app["hub"]

    async def start(self) -> LiveServer:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, shutdown_timeout=2.0, ssl_context=self.ssl_context)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        await self._runner.cleanup()
