"""docs/realtime-protocol.md documents everything the server speaks, and its minimal client runs.

The message types, error codes and HTTP routes are read from the server code with `ast`, not from a
hand-kept list, so a message type, error code or endpoint added later without documentation fails here.
"""

from __future__ import annotations

import ast
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

from livecache.bench.loopback import spawn_server, ws_url
from livecache.pipelines import states
from livecache.realtime import audio, hub, portrait, session, webrtc, wsapi
from livecache.realtime.engines.base import Engine, SessionOptions

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "realtime-protocol.md"
REALTIME = ROOT / "realtime"
ROUTE_METHODS = {"add_get": "GET", "add_post": "POST", "add_put": "PUT", "add_patch": "PATCH",
                 "add_delete": "DELETE", "add_static": "GET", "get": "GET", "post": "POST", "put": "PUT",
                 "patch": "PATCH", "delete": "DELETE"}
ERROR_SENDERS = {"ProtocolError", "error"}  # wsapi: raise ProtocolError(code, ...) / await self.error(code, ...)


def _trees() -> dict[str, ast.Module]:
    return {str(p.relative_to(ROOT)): ast.parse(p.read_text(), str(p)) for p in sorted(REALTIME.rglob("*.py"))}


def _const_str(node: ast.AST) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _is_type_lookup(node: ast.AST) -> bool:
    """`x["type"]` or `x.get("type", ...)`."""
    if isinstance(node, ast.Subscript):
        return _const_str(node.slice) == "type"
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
            and bool(node.args) and _const_str(node.args[0]) == "type")


def dispatched_types(trees: dict[str, ast.Module]) -> set[str]:
    """String literals compared (==, in) with a message's "type", directly or through a local name."""
    found: set[str] = set()
    for tree in trees.values():
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            names = {t.id for n in ast.walk(func) if isinstance(n, ast.Assign) and _is_type_lookup(n.value)
                     for t in n.targets if isinstance(t, ast.Name)}
            for node in ast.walk(func):
                if not isinstance(node, ast.Compare):
                    continue
                sides = [node.left, *node.comparators]
                if not any(_is_type_lookup(s) or (isinstance(s, ast.Name) and s.id in names) for s in sides):
                    continue
                for side in sides:
                    values = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
                    found |= {v for v in map(_const_str, values) if v is not None}
    return found


def sent_types(trees: dict[str, ast.Module]) -> set[str]:
    """`"type"` values of every dict literal the realtime code builds (messages and frame headers)."""
    found: set[str] = set()
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.Dict):
                for key, value in zip(node.keys, node.values, strict=True):
                    if key is not None and _const_str(key) == "type" and _const_str(value) is not None:
                        found.add(_const_str(value))
    return found


def error_codes(trees: dict[str, ast.Module]) -> set[str]:
    """First arguments of `ProtocolError(code, ...)` and `<conn>.error(code, ...)` calls."""
    found: set[str] = set()
    for tree in trees.values():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
            code = _const_str(node.args[0])
            if name in ERROR_SENDERS and code is not None:
                found.add(code)
    return found


def routes(trees: dict[str, ast.Module]) -> set[str]:
    """"METHOD /path" for every `router.add_*(path, ...)` and `web.get(path, ...)` route, and every
    ("METHOD", "/path", handler) row of a `ROUTES` table (server.py's, which both the single server and the Ray
    ingress serve)."""
    found: set[str] = set()
    for tree in trees.values():
        for node in ast.walk(tree):
            if (isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "ROUTES" for t in node.targets)
                    and isinstance(node.value, ast.Tuple)):
                found.update(f"{_const_str(row.elts[0])} {_const_str(row.elts[1])}" for row in node.value.elts
                             if isinstance(row, ast.Tuple) and len(row.elts) == 3)
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args):
                continue
            owner = node.func.value
            owner_name = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", "")
            method = ROUTE_METHODS.get(node.func.attr)
            path = _const_str(node.args[0])
            if method and path and path.startswith("/") and owner_name in ("router", "web"):
                found.add(f"{method} {path}")
            if node.func.attr == "add_route" and len(node.args) > 1 and _const_str(node.args[1]):
                found.add(f"{_const_str(node.args[0])} {_const_str(node.args[1])}")
    return found


def test_extraction_sees_the_known_protocol():
    """Guards the guard: if a refactor hides the dispatch from the extractors, this fails, not the docs test."""
    trees = _trees()
    assert {"start", "stop", "state", "interrupt", "stats", "condition"} <= dispatched_types(trees)
    assert {"ready", "frame", "error", "stopped", "interrupted"} <= sent_types(trees)
    assert {"bad_json", "bad_type", "no_session", "busy", "bad_condition", "engine_error"} <= error_codes(trees)
    assert {"GET /ws", "POST /api/offer", "POST /api/sessions/{sid}/condition"} <= routes(trees)


def test_every_message_type_is_documented():
    text = DOC.read_text()
    trees = _trees()
    missing = sorted(t for t in dispatched_types(trees) | sent_types(trees) if f'"type": "{t}"' not in text)
    assert not missing, f'docs/realtime-protocol.md never shows {{"type": ...}} for: {missing}'


def test_every_error_code_is_documented():
    rows = set(re.findall(r"^\| `([a-z_]+)` \|", DOC.read_text(), re.M))
    missing = sorted(error_codes(_trees()) - rows)
    assert not missing, f"docs/realtime-protocol.md's error table lacks a row for: {missing}"


def test_every_http_route_is_documented():
    text = DOC.read_text()
    missing = sorted(r for r in routes(_trees()) if f"`{r}`" not in text)
    assert not missing, f"docs/realtime-protocol.md's endpoint table lacks: {missing}"


def _limits_row(what: str) -> str:
    rows = [line for line in DOC.read_text().splitlines() if line.startswith(f"| {what} |")]
    assert len(rows) == 1, f"docs/realtime-protocol.md: expected one limits row for {what!r}, found {len(rows)}"
    return rows[0]


@pytest.mark.parametrize(("what", "values"), [
    ("frame size (`size`)", [*hub.SIZES, SessionOptions.size]),
    ("frame rate (`fps`)", [int(hub.MAX_FPS), int(SessionOptions.fps)]),
    ("`seed`", [SessionOptions.seed]),
    ("websocket input `sample_rate`", [*audio.INPUT_RATES]),
    ("engine audio rate (`audio_rate` in `ready` and frame headers)", [Engine.sample_rate]),
    ("WebRTC outgoing audio", [webrtc.AUDIO_RATE, int(webrtc.AUDIO_PTIME * 1000)]),
    ("WebRTC video clock", [webrtc.VIDEO_CLOCK]),
    ("largest websocket message", [wsapi.MAX_MESSAGE]),
    ("largest binary audio message", [wsapi.MAX_AUDIO_MESSAGE]),
    ("largest portrait upload", [portrait.MAX_UPLOAD_BYTES]),
    ("portrait sides", [portrait.MIN_SIDE, portrait.MAX_SIDE]),
    ("largest SDP offer", [webrtc.MAX_SDP]),
    ("frames queued for a slow websocket client", [wsapi.SEND_QUEUE, wsapi.SEND_BUFFER]),
    ("`stats` messages", [f"{wsapi.STATS_EVERY_S:g} s"]),
    ("playout delay", [f"{round(1000 * session.PLAYOUT[t][0])} ms {n}" for t, n in
                       (("webrtc", "WebRTC"), ("websocket", "websocket"))]),
    ("audio buffered ahead of real time", [f"{session.PLAYOUT[t][1]:g} s {n}" for t, n in
                                           (("webrtc", "WebRTC"), ("websocket", "websocket"))]),
    ("speaking hangover, listening period", [f"{states.StateTracker(16000).hangover_s:g} s",
                                             f"{states.StateTracker(16000).listening_s:g} s"]),
])
def test_defaults_and_limits_match_the_code(what, values):
    row = _limits_row(what)
    missing = [v for v in values if not re.search(rf"(?<![\d.]){re.escape(str(v))}(?![\d.])", row)]
    assert not missing, f"{row!r} does not state {missing} (the code's value)"


def test_uploaded_portraits_kept_matches_the_hub():
    keep = inspect.signature(hub.SessionHub).parameters["max_portraits"].default
    assert re.search(rf"\| {keep} \(", _limits_row("uploaded portraits kept"))


def test_minimal_client_in_the_docs_runs(tmp_path):
    block = re.search(r"<!-- minimal-client[^>]*-->\s*```python\n(.*?)```", DOC.read_text(), re.S)
    assert block, "docs/realtime-protocol.md lost its minimal client block"
    script = tmp_path / "client.py"
    script.write_text(block.group(1))
    with spawn_server() as url:
        out = subprocess.run([sys.executable, str(script), ws_url(url)],
                             capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert '"type": "ready"' in out.stdout and '"type": "stopped"' in out.stdout
    frames, opened = map(int, re.search(r"(\d+) frames, mouth open in (\d+)", out.stdout).groups())
    assert frames > 40 and opened > 5
