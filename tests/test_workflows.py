"""Headless workflows: both shipped formats run, and every kind of bad workflow fails in one clear line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from livecache import NODE_CLASS_MAPPINGS
from livecache.cli import main as cli_main
from livecache.graph.errors import WorkflowError
from livecache.graph.runner import load_workflow, validate
from livecache.graph.ui_format import ui_to_api

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
API = json.loads((WORKFLOWS / "deepcache_default_api.json").read_text())


def ui_files():
    return sorted(p for p in WORKFLOWS.glob("*.json") if not p.stem.endswith("_api"))


@pytest.mark.parametrize("ui_file", ui_files(), ids=lambda p: p.name)
def test_each_ui_workflow_converts_to_its_api_twin(ui_file):
    twin = ui_file.with_name(ui_file.stem + "_api.json")
    assert twin.is_file(), f"{ui_file.name} has no API-format twin"
    converted = ui_to_api(json.loads(ui_file.read_text()), NODE_CLASS_MAPPINGS)
    assert converted == json.loads(twin.read_text())
    validate(converted, NODE_CLASS_MAPPINGS)


@pytest.mark.parametrize("name", ["deepcache_default.json", "deepcache_default_api.json"])
def test_shipped_workflow_runs_and_writes_images(tmp_path, capsys, name):
    assert cli_main(["run", str(WORKFLOWS / name), "--output", str(tmp_path)]) == 0
    images = sorted(tmp_path.glob("deepcache_default_*.png"))
    assert len(images) == 4
    with Image.open(images[0]) as picture:
        assert picture.size == (128, 128)  # 16×16 digits enlarged 8× by the save node
    assert "saved" in capsys.readouterr().out


def broken(mutate):
    api = json.loads(json.dumps(API))
    mutate(api)
    return api


CASES = {
    "unknown node type": (broken(lambda a: a["3"].update(class_type="KSamplerTurbo")),
                          "node 3 (KSamplerTurbo): unknown node type"),
    "missing input": (broken(lambda a: a["3"]["inputs"].pop("steps")),
                      "node 3 (LiveCacheSampler): missing required input 'steps'"),
    "link to missing node": (broken(lambda a: a["4"]["inputs"].update(samples=["42", 0])),
                             "node 4 (LiveCacheDecode): input 'samples' links to node 42, which does not exist"),
    "link to missing output": (broken(lambda a: a["4"]["inputs"].update(samples=["3", 2])),
                               "node 4 (LiveCacheDecode): input 'samples' links to output 2 of node 3"),
    "type mismatch": (broken(lambda a: a["4"]["inputs"].update(samples=["1", 0])),
                      "node 4 (LiveCacheDecode): input 'samples' expects LATENT but node 1 "
                      "(LiveCacheLoadDiffusers) output 0 is LC_PIPE"),
    "out of bounds": (broken(lambda a: a["3"]["inputs"].update(steps=0)),
                      "node 3 (LiveCacheSampler): input 'steps' = 0 is below its minimum 1"),
    "bad combo": (broken(lambda a: a["3"]["inputs"].update(scheduler="warp")),
                  "node 3 (LiveCacheSampler): input 'scheduler' = 'warp' is not one of"),
    "cycle": (broken(lambda a: a["2"]["inputs"].update(model=["2", 0])), "part of a cycle"),
    "no output node": (broken(lambda a: a.pop("5")), "workflow has no output node"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_bad_workflows_fail_with_one_line_naming_the_problem(tmp_path, capsys, case):
    workflow, expected = CASES[case]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(workflow))
    with pytest.raises(WorkflowError, match=None) as err:
        validate(load_workflow(path, NODE_CLASS_MAPPINGS), NODE_CLASS_MAPPINGS)
    assert expected in str(err.value)
    assert cli_main(["run", str(path), "--output", str(tmp_path / "out")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0]
    assert not (tmp_path / "out").exists()  # nothing ran, nothing was written


def test_malformed_json_and_unknown_ui_node(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"1": {"class_type": ')
    assert cli_main(["run", str(bad)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    ui = json.loads((WORKFLOWS / "deepcache_default.json").read_text())
    ui["nodes"][2]["type"] = "NoSuchNode"
    bad.write_text(json.dumps(ui))
    assert cli_main(["run", str(bad)]) == 2
    assert "node 3 (NoSuchNode): unknown node type" in capsys.readouterr().err


def test_node_failure_exits_1_naming_the_node(tmp_path, capsys):
    path = tmp_path / "w.json"
    path.write_text(json.dumps(broken(lambda a: a["3"]["inputs"].update(prompt="a cat"))))
    assert cli_main(["run", str(path), "--output", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "node 3 (LiveCacheSampler) failed" in err and "'a cat'" in err


def test_console_script_help():
    result = subprocess.run([sys.executable, "-m", "livecache.cli", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0
    for command in ("run", "serve", "bench", "train", "info"):
        assert command in result.stdout


def test_bypassed_nodes_and_reroutes_pass_their_links_through():
    ui = json.loads((WORKFLOWS / "deepcache_default.json").read_text())
    ui["nodes"][1]["mode"] = 4  # bypass DeepCache: the sampler and decoder get the loader's model
    ui["nodes"].append({"id": 9, "type": "Reroute", "mode": 0, "inputs": [{"name": "", "type": "*", "link": 10}],
                        "outputs": [{"name": "", "type": "IMAGE", "links": [11]}]})
    ui["links"] = [link for link in ui["links"] if link[0] != 5]
    ui["links"] += [[10, 4, 0, 9, 0, "IMAGE"], [11, 9, 0, 5, 0, "IMAGE"]]
    ui["nodes"][4]["inputs"][0]["link"] = 11
    api = ui_to_api(ui, NODE_CLASS_MAPPINGS)
    assert "2" not in api and "9" not in api
    assert api["3"]["inputs"]["model"] == ["1", 0] and api["4"]["inputs"]["model"] == ["1", 0]
    assert api["5"]["inputs"]["images"] == ["4", 0]
    validate(api, NODE_CLASS_MAPPINGS)
