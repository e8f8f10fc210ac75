"""Our pack inside ComfyUI's real server: /object_info, a workflow through /prompt and the websocket,
and our frontend extension in real Chromium.

One server for the module (`main.py --cpu` of the vendored ComfyUI 0.3.75) with a fresh base
directory whose custom_nodes/ holds a link to this repository, exactly how users install the pack.
Every wait has a deadline; the server is stopped after the module even when a test fails.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import aiohttp
import pytest

import livecache

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
    def __init__(self, root: Path, base: Path, repo: Path) -> None:
        (base / "custom_nodes").mkdir(parents=True)
        (base / "custom_nodes" / "comfyui-livecache").symlink_to(repo, target_is_directory=True)
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


@pytest.fixture(scope="module")
def server(comfy_root, repo, tmp_path_factory):
    srv = Server(comfy_root, tmp_path_factory.mktemp("comfy-base"), repo)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


async def get_json(url: str):
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        assert response.status == 200, await response.text()
        return await response.json()


def test_object_info_lists_our_nodes_with_valid_schemas(server):
    info = asyncio.run(get_json(f"{server.url}/object_info"))
    assert "KSampler" in info, "not ComfyUI's object_info"
    log = server.tail()
    # ComfyUI's own audio nodes fail without torchaudio (no wheel here); our pack must load cleanly
    ours = [line for line in log.splitlines() if line.rstrip().endswith("custom_nodes/comfyui-livecache")]
    assert ours and "IMPORT FAILED" not in ours[0], log
    for key, cls in livecache.NODE_CLASS_MAPPINGS.items():
        assert key in info, f"{key} missing from /object_info:\n{log}"
        entry = info[key]
        assert entry["display_name"] == livecache.NODE_DISPLAY_NAME_MAPPINGS[key]
        assert entry["category"].startswith("LiveCache/")
        assert entry["python_module"] == "custom_nodes.comfyui-livecache"
        assert entry["output"] == list(cls.RETURN_TYPES)
        assert entry["input_order"]["required"] == list(cls.INPUT_TYPES()["required"])
        for name, spec in entry["input"]["required"].items():
            options = spec[1] if len(spec) > 1 else {}
            assert options.get("tooltip") or spec[0] in ("LC_PIPE", "LATENT", "IMAGE"), (key, name)
            if spec[0] in ("INT", "FLOAT"):
                assert {"min", "max", "step", "default"} <= set(options), (key, name)
    assert info["LiveCacheDeepCacheModel"]["input"]["required"]["model"][0] == "MODEL"
    assert info["LiveCacheDeepCacheModel"]["input"]["optional"]["calibrated_schedule"][0] == "LC_SCHEDULE"
    assert info["LiveCacheStepRehashModel"]["input"]["required"]["model"][0] == "MODEL"


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


def test_shipped_workflow_runs_through_prompt_and_the_websocket(server, repo):
    prompt = json.loads((repo / "workflows" / "deepcache_default_api.json").read_text())
    prompt_id, ours = asyncio.run(asyncio.wait_for(run_prompt(server.url, prompt), RUN_TIMEOUT))
    # the stats belong to the node that applied DeepCache (2), not to the sampler that ran it (3)
    assert ours and ours[0]["node"] == "2" and ours[0]["cached_calls"] > 0, ours
    history = asyncio.run(get_json(f"{server.url}/history/{prompt_id}"))[prompt_id]
    assert history["status"]["status_str"] == "success"
    images = history["outputs"]["5"]["images"]
    assert len(images) == prompt["3"]["inputs"]["batch_size"]
    for image in images:
        path = server.base / "output" / image["subfolder"] / image["filename"]
        assert path.is_file() and path.read_bytes().startswith(b"\x89PNG"), path


async def drive_page(url: str, workflow: dict, node_id: int, screenshot: Path) -> dict:
    from playwright.async_api import async_playwright

    console: list[str] = []
    async with aiohttp.ClientSession() as http:  # no first-run templates dialog over the canvas
        async with http.post(f"{url}/settings/Comfy.TutorialCompleted", json=True) as response:
            assert response.status == 200, await response.text()
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = await browser.new_page()
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
            await page.goto(url)
            await page.wait_for_function(
                "() => window.app?.extensions?.some((e) => e.name === 'LiveCache.Stats')", timeout=120_000)
            # the extension list ComfyUI serves, from which the frontend imported the module that registered it
            scripts = await page.evaluate("async () => (await (await fetch('/extensions')).json())")
            await page.evaluate("(wf) => window.app.loadGraphData(wf)", workflow)
            await page.evaluate("() => window.app.queuePrompt(0, 1)")
            try:  # what the user sees: the stats element of that node's widget, on screen, with text in it
                shown = await page.wait_for_function(
                    """(id) => {
                        const widget = window.app.graph.getNodeById(id)?.widgets?.find(
                            (w) => w.name === 'livecache_stats');
                        const element = widget?.element;
                        if (!element?.value || !element.checkVisibility()) return null;
                        const box = element.getBoundingClientRect();
                        const style = getComputedStyle(element);
                        const readable = style.opacity !== '0' && style.color !== style.backgroundColor;
                        const onTop = document.elementFromPoint(box.x + box.width / 2, box.y + box.height / 2);
                        return box.width > 20 && box.height > 10 && readable && onTop === element
                            ? {text: element.value, others: window.app.graph.nodes.filter((n) => n.id !== id
                                && n.widgets?.some((w) => w.name === 'livecache_stats')).map((n) => n.id)}
                            : null;
                    }""", arg=node_id, timeout=RUN_TIMEOUT * 1000)
            except Exception as error:
                await page.screenshot(path=str(screenshot))
                seen = await page.evaluate("""(id) => {
                    const el = window.app.graph.getNodeById(id)?.widgets?.find((w) => w.name === 'livecache_stats')
                        ?.element;
                    if (!el) return 'no stats element';
                    const b = el.getBoundingClientRect();
                    const top = document.elementFromPoint(b.x + b.width / 2, b.y + b.height / 2);
                    return {value: el.value, box: [b.x, b.y, b.width, b.height], on_top: top?.outerHTML?.slice(0, 200)};
                }""", node_id)
                raise AssertionError(f"no visible stats on node {node_id} ({seen}); "
                                     f"browser console: {console}") from error
            await page.screenshot(path=str(screenshot))
            return {**await shown.json_value(), "scripts": scripts, "console": console}
        finally:
            await browser.close()


def test_our_extension_loads_in_chromium_and_shows_stats_on_the_node(server, repo, tmp_path):
    workflow = json.loads((repo / "workflows" / "deepcache_default.json").read_text())
    sampler = next(node for node in workflow["nodes"] if node["id"] == 3)
    sampler["widgets_values"][2] = 1  # another seed: ComfyUI would serve an already-run prompt from its cache
    screenshot = Path(os.environ.get("LIVECACHE_SCREENSHOT", tmp_path / "stats.png"))
    result = asyncio.run(drive_page(server.url, workflow, 2, screenshot))  # node 2 applies DeepCache
    assert "/extensions/comfyui-livecache/livecache.js" in result["scripts"], result["scripts"]
    assert result["text"].startswith("DeepCache:") and "cached" in result["text"], result
    assert result["others"] == [], result  # not on the sampler or any other node
    assert screenshot.stat().st_size > 0
    # errors from our script, and any uncaught exception on the page (the frontend also logs errors of its
    # own here, e.g. blocked look-ups of node docs on the internet: those are not ours to judge)
    ours = [line for line in result["console"] if "comfyui-livecache/" in line or line.startswith("pageerror")]
    assert not ours, result["console"]
