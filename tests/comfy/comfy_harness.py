"""ComfyUI as the tests drive it: its real server and `livecache run --comfy-root` in a fresh process.

`Server` is `main.py --cpu` of the vendored ComfyUI in a fresh base directory whose custom_nodes/ holds a
link to this repository (how users install the pack); `run_prompt` follows a prompt over the websocket.
`run_cli` runs `livecache run FILE --comfy-root` in a fresh process with the tiny checkpoint
(tiny_checkpoint.py) saved in the base directory. Every wait has a deadline; `Server.stop()` ends the
process even when a test failed.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import aiohttp

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
START_TIMEOUT = 180.0
RUN_TIMEOUT = 180.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, root: Path, base: Path, repo: Path, extra_nodes: dict[str, str] | None = None) -> None:
        """`extra_nodes`: more custom node packs for the server, folder name -> its `__init__.py` source."""
        (base / "custom_nodes").mkdir(parents=True)
        (base / "custom_nodes" / "comfyui-livecache").symlink_to(repo, target_is_directory=True)
        for name, source in (extra_nodes or {}).items():
            (base / "custom_nodes" / name).mkdir()
            (base / "custom_nodes" / name / "__init__.py").write_text(source)
        self.base = base
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = (base / "server.log").open("w")
        self.process = subprocess.Popen(
            [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
             "--base-directory", str(base), "--disable-api-nodes", "--database-url", "sqlite:///:memory:"],
            cwd=root, stdout=self.log, stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},  # tiny models; see conftest.py
        )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}:\n{self.tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"ComfyUI did not listen within {START_TIMEOUT} s:\n{self.tail()}")

    def tail(self) -> str:
        self.log.flush()
        return (self.base / "server.log").read_text()[-6000:]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


async def get_json(url: str):
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def run_prompt(url: str, prompt: dict) -> tuple[str, list[dict]]:
    """POST `prompt`, follow ComfyUI's websocket until it finishes; returns the prompt id and our messages."""
    client = uuid.uuid4().hex
    ours: list[dict] = []
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(f"{url.replace('http', 'ws')}/ws?clientId={client}") as ws:
            async with http.post(f"{url}/prompt", json={"prompt": prompt, "client_id": client}) as response:
                body = await response.json()
                assert response.status == 200, body
            prompt_id = body["prompt_id"]
            async for message in ws:
                if message.type != aiohttp.WSMsgType.TEXT:
                    continue  # binary previews
                event = json.loads(message.data)
                data = event.get("data", {})
                if event["type"] == "livecache.stats":
                    ours.append(data)
                elif event["type"] == "execution_error":
                    raise AssertionError(f"the workflow failed in ComfyUI: {data}")
                elif event["type"] == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
                    return prompt_id, ours
    raise AssertionError("the websocket closed before the workflow finished")


RUN = """
import sys
sys.path.insert(0, {tests!r})
from livecache.graph.comfy_host import use_comfyui
use_comfyui({root!r}, {base!r})
import os
from tiny_checkpoint import register_tiny_family, save_tiny_checkpoint
register_tiny_family()
if not os.path.exists({checkpoint!r}):  # never rewritten under a server that may be reading it
    save_tiny_checkpoint({checkpoint!r})
from livecache.cli import main
sys.exit(main({argv!r}))
"""


def run_cli(comfy_root: Path, base: Path, workflow: dict, *extra: str) -> subprocess.CompletedProcess:
    (base / "models" / "checkpoints").mkdir(parents=True, exist_ok=True)
    path = base / "workflow.json"
    path.write_text(json.dumps(workflow))
    argv = ["run", str(path), "--comfy-root", str(comfy_root), "--comfy-base", str(base), *extra]
    code = RUN.format(tests=str(Path(__file__).parent), root=str(comfy_root), base=str(base),
                      checkpoint=str(base / "models" / "checkpoints" / "tiny.safetensors"), argv=argv)
    return subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=300,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
