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
import sys
from pathlib import Path

import aiohttp
import pytest

import livecache

sys.path.insert(0, str(Path(__file__).parent))  # the tests run in importlib mode: the helpers sit beside them
from comfy_harness import CHROMIUM, FLAGS, RUN_TIMEOUT, Server, get_json, run_prompt  # noqa: E402


@pytest.fixture(scope="module")
def server(comfy_root, repo, tmp_path_factory):
    srv = Server(comfy_root, tmp_path_factory.mktemp("comfy-base"), repo)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


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
