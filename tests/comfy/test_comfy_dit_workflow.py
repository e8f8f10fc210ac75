"""The DiT MODEL workflows (diffusion model loader → Block Cache / CacheQuant for MODEL → KSampler) in ComfyUI.

`workflows/comfyui/blockcache_dit.json` and `cachequant_dit.json` (UI format) convert, with ComfyUI's own node
classes, to their API twins; each
the API twin runs headless through `livecache run --comfy-root` in a fresh process: ComfyUI's UNETLoader loads a
tiny random SD3 file written by ComfyUI's own saver (its model detection picks SD3), our node patches the MODEL
and ComfyUI's KSampler samples it. The text encoders and the VAE of the shipped workflow are full-sized
downloads, so the run swaps those nodes for a test node handing the sampler seeded random SD3 conditioning,
and saves the latent (ComfyUI's Save Latent) instead of decoding it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

RUN = """
import sys
sys.path.insert(0, {tests!r})
from livecache.graph.comfy_host import use_comfyui
use_comfyui({root!r}, {base!r})
from tiny_dits import conditioning, save_tiny_dit
save_tiny_dit("sd3", __import__("pathlib").Path({model!r}))

class TinySD3Conditioning:  # stands in for the text encoders: seeded random SD3 conditioning
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "test"

    @classmethod
    def INPUT_TYPES(cls):
        return {{"required": {{"seed": ("INT", {{"default": 0, "min": 0, "max": 99}})}}}}

    def make(self, seed):
        return (conditioning("sd3", seed),)

import nodes
nodes.NODE_CLASS_MAPPINGS["TinySD3Conditioning"] = TinySD3Conditioning
from livecache.cli import main
sys.exit(main({argv!r}))
"""

CONVERT = """
import json, sys
from pathlib import Path
from livecache.graph.comfy_host import load_comfyui
from livecache.graph.ui_format import ui_to_api
from livecache.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
classes = load_comfyui(Path({root!r}), Path({base!r}), None, None, NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS)
print(json.dumps(ui_to_api(json.loads(Path({ui!r}).read_text()), classes)))
"""

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows" / "comfyui"

# each workflow: its node 2 (our node), what the 6-step test run sets on it, and what its stats line says
OURS = {
    "blockcache_dit": ("LiveCacheBlockCacheModel", {}, ("Block cache: 2 full / 4 cached transformer calls",)),
    "cachequant_dit": ("LiveCacheCacheQuantModel", {"steps": 6, "full_steps": 3, "calibration_seeds": 1},
                       ("CacheQuant (DP cache K=3/6 + W8A8", "3 full / 3 cached transformer calls")),
}


def python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=300,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})


@pytest.mark.parametrize("name", list(OURS))
def test_the_ui_workflow_converts_to_its_api_twin_with_comfyuis_nodes(comfy_root, tmp_path, name):
    result = python(CONVERT.format(root=str(comfy_root), base=str(tmp_path), ui=str(WORKFLOWS / f"{name}.json")))
    assert result.returncode == 0, result.stderr[-4000:]
    converted = json.loads(result.stdout.strip().splitlines()[-1])
    assert converted == json.loads((WORKFLOWS / f"{name}_api.json").read_text())


@pytest.mark.parametrize("name", list(OURS))
def test_the_api_workflow_runs_headless_on_a_tiny_sd3_through_comfyuis_loader(comfy_root, tmp_path, name):
    node, settings, expected = OURS[name]
    workflow = json.loads((WORKFLOWS / f"{name}_api.json").read_text())
    assert [workflow[i]["class_type"] for i in ("1", "2", "7")] == ["UNETLoader", node, "KSampler"]
    assert workflow["2"]["inputs"]["model"] == ["1", 0] and workflow["7"]["inputs"]["model"] == ["2", 0]
    workflow["2"]["inputs"].update(settings)
    workflow["1"]["inputs"]["unet_name"] = "tiny_sd3.safetensors"
    for node, seed in (("4", 1), ("5", 2)):
        workflow[node] = {"class_type": "TinySD3Conditioning", "inputs": {"seed": seed}}
    for node in ("3", "8", "9", "10"):
        del workflow[node]
    workflow["6"]["inputs"].update(width=64, height=64)
    workflow["7"]["inputs"]["steps"] = 6
    workflow["11"] = {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": "livecache_dit"}}
    folder = tmp_path / "models" / "diffusion_models"
    folder.mkdir(parents=True)
    path = tmp_path / "workflow.json"
    path.write_text(json.dumps(workflow))
    argv = ["run", str(path), "--comfy-root", str(comfy_root), "--comfy-base", str(tmp_path)]
    result = python(RUN.format(tests=str(Path(__file__).parent), root=str(comfy_root), base=str(tmp_path),
                               model=str(folder / "tiny_sd3.safetensors"), argv=argv))
    assert result.returncode == 0, result.stderr[-4000:]
    # our node patched the MODEL KSampler sampled (block cache: interval 3 over 6 steps; CacheQuant: K=3)
    assert all(text in result.stderr for text in expected), result.stderr[-4000:]
    latents = sorted((tmp_path / "output").glob("livecache_dit_*.latent"))
    assert len(latents) == 1, result.stdout
