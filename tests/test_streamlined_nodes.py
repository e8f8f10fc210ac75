"""Step rehash and slicing nodes: shipped workflows run headless, stats reach the UI, bad stacks are refused."""

import json
import logging
import re
from pathlib import Path

import pytest
import torch

from livecache.accel.deepcache import DeepCacheConfig
from livecache.accel.rehash import StepRehashConfig
from livecache.accel.slicing import SlicingConfig
from livecache.cli import main as cli_main
from livecache.models.pipeline import DiffusionModel
from livecache.nodes.diffusers_nodes import DecodeImages
from livecache.nodes.streamlined_nodes import ApplySlicing, ApplyStepRehash

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"


@pytest.mark.parametrize("name, expected", [
    ("rehash_ddim_api.json", r"Step rehash: [1-9]\d* of 20 steps skipped"),
    ("streamlined_stack.json", r"Slicing: \d+ sliced calls run as \d+ slices"),
])
def test_shipped_workflows_run_headless_and_report_stats(tmp_path, caplog, name, expected):
    caplog.set_level(logging.INFO, logger="livecache")
    assert cli_main(["run", str(WORKFLOWS / name), "--output", str(tmp_path)]) == 0
    assert len(list(tmp_path.glob("*.png"))) == 4
    assert any(re.search(expected, r.getMessage()) for r in caplog.records)


def test_every_streamlined_workflow_has_its_technique():
    api = {p.name: json.loads(p.read_text()) for p in WORKFLOWS.glob("*_api.json")}
    kinds = {name: {n["class_type"] for n in wf.values()} for name, wf in api.items()}
    assert "LiveCacheStepRehash" in kinds["rehash_ddim_api.json"] and "LiveCacheSlicing" in kinds["slicing_api.json"]
    assert {"LiveCacheDeepCache", "LiveCacheSlicing", "LiveCacheStepRehash"} <= kinds["streamlined_stack_api.json"]


def bare_model():
    return DiffusionModel("test", torch.nn.Linear(1, 1), {}, lambda prompt: torch.zeros(1, 1, 1))


def test_nodes_return_a_copy_with_one_more_config():
    model = bare_model()
    (rehashed,) = ApplyStepRehash().apply(model, 0.2, 2, "reuse")
    (sliced,) = ApplySlicing().apply(rehashed, "spatial", 8, True)
    assert model.accelerations == () and rehashed.accelerations == (StepRehashConfig(0.2, 2, "reuse"),)
    assert sliced.accelerations[-1] == SlicingConfig("spatial", 8, vae=False)  # the VAE only slices by batch


def test_nodes_refuse_stacks_that_cannot_work():
    (rehashed,) = ApplyStepRehash().apply(bare_model(), 0.1, 1, "reuse")
    with pytest.raises(ValueError, match="step rehash is applied twice"):
        ApplyStepRehash().apply(rehashed, 0.1, 1, "reuse")
    cached = bare_model().with_acceleration(DeepCacheConfig())
    with pytest.raises(ValueError, match="'extrapolate' cannot stack with DeepCache"):
        ApplyStepRehash().apply(cached, 0.1, 1, "extrapolate")
    with pytest.raises(ValueError, match="max_skips must be"):
        ApplyStepRehash().apply(bare_model(), 0.1, 0, "reuse")


def test_decode_slices_the_vae_decoder(close_reassociated):
    from livecache.bench.slicing_bench import _vae

    vae = _vae(tiny=True)
    model = DiffusionModel("test", torch.nn.Linear(1, 1), {}, lambda p: None, vae=vae, latent_scale=1.0)
    latents = {"samples": torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))}
    calls = []
    handle = vae.decoder.conv_in.register_forward_pre_hook(lambda *_: calls.append(1))
    (plain,) = DecodeImages().decode(model, latents)
    (sliced,) = DecodeImages().decode(ApplySlicing().apply(model, "batch", 4, True)[0], latents)
    handle.remove()
    assert len(calls) == 1 + 3
    close_reassociated(sliced, plain)
    assert "forward" not in vae.decoder.__dict__
