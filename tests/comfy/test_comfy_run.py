"""`livecache run FILE --comfy-root DIR`: a workflow of ComfyUI's own nodes (Load Checkpoint, CLIP Text
Encode, KSampler, VAE Decode, Save Image) with our DeepCache node between loader and sampler, run headless
by ComfyUI's executor in a fresh process, exactly as a user runs it.

The checkpoint is tiny (tiny_checkpoint.py: written by ComfyUI's own saver, recognised by ComfyUI's own
model detection once the tiny family is registered), so the run takes seconds of compute.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # the tests run in importlib mode: the helpers sit beside them
from comfy_harness import run_cli  # noqa: E402


def tiny_workflow(repo: Path) -> dict:
    workflow = json.loads((repo / "workflows" / "comfyui" / "deepcache_checkpoint_api.json").read_text())
    workflow["1"]["inputs"]["ckpt_name"] = "tiny.safetensors"
    workflow["5"]["inputs"].update(width=64, height=64)
    workflow["6"]["inputs"]["steps"] = 6
    return workflow


def test_a_checkpoint_workflow_runs_headless_inside_comfyui(comfy_root, repo, tmp_path):
    result = run_cli(comfy_root, tmp_path, tiny_workflow(repo))
    assert result.returncode == 0, result.stderr[-4000:]
    images = sorted((tmp_path / "output").glob("livecache_checkpoint_*.png"))
    assert len(images) == 1 and images[0].read_bytes().startswith(b"\x89PNG"), result.stdout
    assert f"node 8: saved {images[0]}" in result.stdout
    # ComfyUI's executor ran every node, and our DeepCache node patched the MODEL KSampler sampled with
    assert all(f"node {i} " in result.stderr for i in "12345678"), result.stderr[-4000:]
    assert "DeepCache: 2 full / 4 cached U-Net calls" in result.stderr, result.stderr[-4000:]


def test_comfyuis_own_validation_fails_in_one_line(comfy_root, repo, tmp_path):
    workflow = tiny_workflow(repo)
    workflow["1"]["inputs"]["ckpt_name"] = "missing.safetensors"
    result = run_cli(comfy_root, tmp_path, workflow)
    assert result.returncode == 2, result.stderr[-4000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: node 1 (CheckpointLoaderSimple): Value not in list") and "missing" in last, last
    assert not (tmp_path / "output").exists() or not any((tmp_path / "output").iterdir())


def test_the_cachequant_workflow_calibrates_saves_and_samples_inside_comfyui(comfy_root, repo, tmp_path):
    workflow = json.loads((repo / "workflows" / "comfyui" / "cachequant_checkpoint_api.json").read_text())
    workflow["1"]["inputs"]["ckpt_name"] = "tiny.safetensors"
    workflow["5"]["inputs"].update(width=64, height=64)
    workflow["10"]["inputs"]["value"] = 6  # the steps of calibration and sampling, one Int node wired to all three
    for node in "92":
        workflow[node]["inputs"]["full_steps"] = 3
    result = run_cli(comfy_root, tmp_path, workflow)
    assert result.returncode == 0, result.stderr[-4000:]
    assert len(list((tmp_path / "output").glob("livecache_cachequant_*.png"))) == 1, result.stdout
    assert (tmp_path / "output" / "schedules" / "my_checkpoint_24_steps.json").is_file()
    assert "CacheQuant (DP cache K=3/6 + W8A8" in result.stderr and "3 full / 3 cached U-Net calls" in result.stderr, \
        result.stderr[-4000:]
