"""CacheQuant and quantization nodes on the embedded model, and their shipped workflows run headless."""

import json
from pathlib import Path

import pytest

from livecache.accel.cache_schedule import CalibratedSchedule
from livecache.accel.deepcache import DeepCacheConfig
from livecache.cli import main as cli_main
from livecache.nodes.cachequant_nodes import ApplyCacheQuant, CalibrateSchedule, LoadSchedule, Quantize
from livecache.nodes.diffusers_nodes import LoadDiffusersModel

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"
CALIBRATION = {"calibration_prompts": "1, 7", "calibration_seeds": 1, "steps": 6, "scheduler": "ddim", "guidance": 2.0}


@pytest.fixture(scope="module")
def digits():
    return LoadDiffusersModel().load("embedded:digits")[0]


@pytest.mark.parametrize("name, prefix", [("cachequant.json", "cachequant"), ("dgq_api.json", "dgq"),
                                          ("stacked_api.json", "stacked")])
def test_shipped_workflows_run_headless(tmp_path, name, prefix):
    assert cli_main(["run", str(WORKFLOWS / name), "--output", str(tmp_path)]) == 0
    assert len(sorted(tmp_path.glob(f"{prefix}_*.png"))) == 4
    if prefix == "cachequant":
        saved = json.loads((tmp_path / "schedules" / "digits_ddim20_k7.json").read_text())
        assert saved["model"] == "embedded:digits" and saved["schedule"].count("F") == 7


def test_schedule_nodes_save_load_and_refuse_mismatches(tmp_path, monkeypatch, digits, tiny_unet):
    monkeypatch.setenv("LIVECACHE_OUTPUT", str(tmp_path))
    (schedule,) = CalibrateSchedule().calibrate(digits, 3, 0, save_as="s/digits", objective="output", **CALIBRATION)
    assert schedule.k == 3 and schedule.cost <= schedule.uniform_cost
    (loaded,) = LoadSchedule().load(digits, "s/digits.json")
    assert loaded == schedule == CalibratedSchedule.load(tmp_path / "s" / "digits.json")
    other = type(digits)("tiny", tiny_unet, digits.scheduler_config, digits.encode_prompt)
    with pytest.raises(ValueError, match="calibrated for model embedded:digits"):
        LoadSchedule().load(other, "s/digits.json")
    with pytest.raises(ValueError, match="inside the output folder"):
        LoadSchedule().load(digits, "../elsewhere.json")
    (model,) = ApplyCacheQuant().apply(digits, "none", True, True, 3, 0, schedule=loaded,
                                       **{**CALIBRATION, "steps": 20})  # the schedule's own step count wins
    assert digits.accelerations == () and model.accelerations[0].schedule == loaded
    with pytest.raises(ValueError, match="two feature caches cannot share one U-Net"):
        ApplyCacheQuant().apply(digits.with_acceleration(DeepCacheConfig()), "w8a8", True, True, 3, 0, **CALIBRATION)


def test_quantize_node_names_bad_bits(digits):
    with pytest.raises(ValueError, match="weight_bits must be 8, 6 or 4, got 5"):
        Quantize().apply(digits, "dgq", 5, 8, 0, False, **CALIBRATION)
    with pytest.raises(ValueError, match="W8A8 means 8-bit weights"):
        Quantize().apply(digits, "w8a8", 4, 8, 0, False, **CALIBRATION)
