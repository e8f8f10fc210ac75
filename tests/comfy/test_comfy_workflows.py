"""The example workflows of workflows/comfyui/ (the user's own checkpoint → our MODEL nodes → KSampler) in the
real ComfyUI: converted, loaded in the real frontend in Chromium, queued there, and run headless.

Three independent checks per UI workflow:
- its conversion to the API twin, from the node schemas the server publishes (/object_info: input order, which
  inputs are widgets, the extra `control_after_generate` value after seed-like widgets, linked widgets);
- the frontend's own conversion (`app.graphToPrompt()`) of the file loaded in the page gives the same twin, and
  every node type is known to the page;
- with the checkpoint name replaced by the tiny SD1.5-class checkpoint (saved by ComfyUI's own code, its model
  family registered in the server by a one-file custom node) and sizes/steps made small by widget name, the
  workflow queued in the page writes its images, and `livecache run --comfy-root` runs the same file headless.
"""

from __future__ import annotations

import copy
import json
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from livecache.graph.ui_format import has_seed_control, is_widget, ui_to_api

sys.path.insert(0, str(Path(__file__).parent))  # the tests run in importlib mode: the helpers sit beside them
from comfy_harness import CHROMIUM, FLAGS, RUN_TIMEOUT, Server, run_cli  # noqa: E402
from tiny_checkpoint import save_tiny_checkpoint  # noqa: E402

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows" / "comfyui"
# the workflows on a user's checkpoint (Load Checkpoint → …); the DiT ones start at UNETLoader and run on the
# tiny DiT families in test_comfy_dit_workflow.py
UI_FILES = sorted(p for p in WORKFLOWS.glob("*.json")
                  if not p.stem.endswith("_api") and '"CheckpointLoaderSimple"' in p.read_text())
SCHEDULE = "schedules/my_checkpoint_24_steps.json"  # what the CacheQuant workflow saves and the load workflow reads
TINY = {"ckpt_name": "tiny.safetensors", "width": 64, "height": 64, "steps": 6, "full_steps": 3,
        "calibration_seeds": 1, "training_steps": 2}
TINY_FAMILY = """
import sys
sys.path.insert(0, {tests!r})
from tiny_checkpoint import register_tiny_family
register_tiny_family()  # the tiny checkpoint's model family, as a custom node pack adds one
NODE_CLASS_MAPPINGS = {{}}
"""


def test_every_model_technique_has_a_workflow_with_a_twin():
    types = {node["type"] for path in UI_FILES for node in json.loads(path.read_text())["nodes"]}
    for node in ("LiveCacheDeepCacheModel", "LiveCacheStepRehashModel", "LiveCacheQuantizeModel",
                 "LiveCacheSlicingModel", "LiveCacheCacheQuantModel", "LiveCacheCalibrateScheduleModel",
                 "LiveCacheLoadScheduleModel", "LiveCacheTrainILFModel", "LiveCacheApplyILFModel"):
        assert node in types, node
    for path in UI_FILES:
        assert path.with_name(path.stem + "_api.json").is_file(), path.name
        chain = [n["type"] for n in json.loads(path.read_text())["nodes"]]
        assert {"CheckpointLoaderSimple", "KSampler", "VAEDecode", "SaveImage"} <= set(chain), path.name


@pytest.fixture(scope="module")
def server(comfy_root, repo, tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy-workflows")
    (base / "models" / "checkpoints").mkdir(parents=True)
    save_tiny_checkpoint(base / "models" / "checkpoints" / TINY["ckpt_name"])
    srv = Server(comfy_root, base, repo, {"tiny_family": TINY_FAMILY.format(tests=str(Path(__file__).parent))})
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def object_info(server) -> dict[str, Any]:
    return get(f"{server.url}/object_info")


def schema_classes(info: dict[str, Any]) -> dict[str, type]:
    """Stand-ins that answer `INPUT_TYPES()` from /object_info (its `input_order`), for the converter."""

    def stand_in(name: str, entry: dict[str, Any]) -> type:
        spec = {part: {key: tuple(entry["input"][part][key]) for key in entry["input_order"].get(part, [])}
                for part in ("required", "optional")}
        return type(name, (), {"INPUT_TYPES": staticmethod(lambda: spec)})

    return {name: stand_in(name, entry) for name, entry in info.items()}


def widget_positions(entry: dict[str, Any]) -> dict[str, int]:
    """Where each widget's value sits in a node's `widgets_values`, by the node's published schema."""
    positions, position = {}, 0
    for part in ("required", "optional"):
        for name in entry["input_order"].get(part, []):
            spec = entry["input"][part][name]
            if is_widget(spec):
                positions[name] = position
                position += 1 + bool(has_seed_control(name, spec))
    return positions


def tiny(ui: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    """The workflow as a user edits it for the tiny checkpoint: checkpoint picked, sizes and steps small."""
    ui = copy.deepcopy(ui)
    for node in ui["nodes"]:
        linked = {entry["name"] for entry in node["inputs"] if entry.get("link") is not None}
        positions = widget_positions(info[node["type"]])
        for name, value in TINY.items():
            if name in positions and name not in linked:
                node["widgets_values"][positions[name]] = value
        if node["type"] == "PrimitiveInt":  # the CacheQuant workflow's one steps value for all three nodes
            node["widgets_values"][0] = TINY["steps"]
    return ui


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_the_ui_file_converts_to_its_twin_by_the_published_schemas(path, object_info):
    twin = json.loads(path.with_name(path.stem + "_api.json").read_text())
    assert ui_to_api(json.loads(path.read_text()), schema_classes(object_info)) == twin


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    request = urllib.request.Request(f"{server.url}/settings/Comfy.TutorialCompleted", data=b"true", method="POST")
    urllib.request.urlopen(request, timeout=30).close()  # no first-run templates dialog over the canvas
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page()
            page.errors = []
            page.on("pageerror", lambda error: page.errors.append(str(error)))
            page.goto(server.url)
            page.wait_for_function("() => window.app?.graph && window.LiteGraph?.registered_node_types",
                                   timeout=120_000)
            yield page
        finally:
            browser.close()


def queue_in_page(page, server, ui: dict[str, Any]) -> dict[str, Any]:
    """Load `ui` into the page, press Queue, and wait for ComfyUI's history entry of that prompt."""
    before = set(get(f"{server.url}/history"))
    page.evaluate("(wf) => window.app.loadGraphData(wf)", ui)
    page.evaluate("() => window.app.queuePrompt(0, 1)")
    deadline = time.monotonic() + RUN_TIMEOUT
    while time.monotonic() < deadline:
        done = {k: v for k, v in get(f"{server.url}/history").items() if k not in before}
        if done:
            (entry,) = done.values()
            if entry["status"].get("completed") or entry["status"].get("status_str") == "error":
                return entry
        time.sleep(1)
    raise AssertionError(f"the queued workflow did not finish in {RUN_TIMEOUT} s:\n{server.tail()}")


@pytest.fixture(scope="module")
def schedule_saved(server, object_info, page) -> Path:
    """The schedule the CacheQuant workflow saves, which the load workflow reads (made once if no test made it)."""
    saved = server.base / "output" / SCHEDULE
    if not saved.is_file():
        entry = queue_in_page(page, server, tiny(json.loads((WORKFLOWS / "cachequant_checkpoint.json").read_text()),
                                                 object_info))
        assert entry["status"]["status_str"] == "success", entry["status"]
    return saved


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_the_ui_file_loads_in_the_frontend_queues_and_saves_images(path, server, object_info, page, request):
    if "load_schedule" in path.stem:
        request.getfixturevalue("schedule_saved")
    ui = json.loads(path.read_text())
    page.evaluate("(wf) => window.app.loadGraphData(wf)", ui)
    missing = page.evaluate("(types) => types.filter((t) => !window.LiteGraph.registered_node_types[t])",
                            [node["type"] for node in ui["nodes"]])
    assert missing == [], missing
    dialogs = page.evaluate("() => [...document.querySelectorAll('.p-dialog')].map((d) => d.innerText)")
    assert not [d for d in dialogs if "missing" in d.lower() or "error" in d.lower()], dialogs
    converted = page.evaluate("async () => (await window.app.graphToPrompt()).output")
    frontend = {i: {"class_type": n["class_type"], "inputs": n["inputs"]} for i, n in converted.items()}
    assert frontend == json.loads(path.with_name(path.stem + "_api.json").read_text())

    entry = queue_in_page(page, server, tiny(ui, object_info))
    assert entry["status"]["status_str"] == "success", (entry["status"], server.tail())
    images = entry["outputs"]["8"]["images"]
    assert images, entry["outputs"]
    for image in images:
        file = server.base / "output" / image["subfolder"] / image["filename"]
        assert file.is_file() and file.read_bytes().startswith(b"\x89PNG"), file
    assert not page.errors, page.errors


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_livecache_run_runs_the_ui_file_headless(path, comfy_root, server, object_info, request):
    if "load_schedule" in path.stem:
        request.getfixturevalue("schedule_saved")
    prefix = widget_positions(object_info["SaveImage"])["filename_prefix"]
    ui = tiny(json.loads(path.read_text()), object_info)
    saver = next(node for node in ui["nodes"] if node["type"] == "SaveImage")
    saver["widgets_values"][prefix] = f"headless_{path.stem}"
    result = run_cli(comfy_root, server.base, ui)
    assert result.returncode == 0, result.stderr[-4000:]
    images = sorted((server.base / "output").glob(f"headless_{path.stem}_*.png"))
    assert images and images[-1].read_bytes().startswith(b"\x89PNG"), result.stdout
    assert f"node 8: saved {images[-1]}" in result.stdout, result.stdout
