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


@pytest.mark.parametrize("name", ["ilf_dit_api.json", "ilf_digits_api.json"])
def test_ilf_workflows_run_headless_with_the_shipped_modules(tmp_path, capsys, name):
    assert cli_main(["run", str(WORKFLOWS / name), "--output", str(tmp_path)]) == 0
    assert len(sorted(tmp_path.glob(f"{Path(name).stem.removesuffix('_api')}_*.png"))) == 4
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
    "class_type a list": (broken(lambda a: a["3"].update(class_type=["LiveCacheSampler"])),
                          "node 3: class_type must be a string, got a list of 1 item(s)"),
    "class_type an object": (broken(lambda a: a["3"].update(class_type={})), "node 3: class_type must be a string"),
    "inputs a list": (broken(lambda a: a["3"].update(inputs=[])),
                      "node 3 (LiveCacheSampler): inputs must be an object, got a list"),
    "link with a string slot": (broken(lambda a: a["4"]["inputs"].update(samples=["3", "0"])),
                                "node 4 (LiveCacheDecode): input 'samples' is a list but not a link"),
    "NaN guidance": (broken(lambda a: a["3"]["inputs"].update(guidance=float("nan"))),
                     "node 3 (LiveCacheSampler): input 'guidance' = nan is not a finite number"),
    "prompt the model cannot read": (broken(lambda a: a["3"]["inputs"].update(prompt="../../etc/passwd")),
                                     "node 3 (LiveCacheSampler): the embedded digits model draws one digit"),
    "prefix outside the output folder": (broken(lambda a: a["5"]["inputs"].update(filename_prefix="../x")),
                                         "node 5 (LiveCacheSaveImages): filename_prefix '../x' must stay inside"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_bad_workflows_fail_with_one_line_naming_the_problem(tmp_path, capsys, case):
    workflow, expected = CASES[case]
    path = run_refuses(tmp_path, capsys, workflow, expected)
    with pytest.raises(WorkflowError, match=None) as err:
        validate(load_workflow(path, NODE_CLASS_MAPPINGS), NODE_CLASS_MAPPINGS)
    assert expected in str(err.value)


def run_refuses(tmp_path, capsys, workflow, expected):
    """`livecache run` of `workflow` (saved to a file, whose path is returned) exits 2 with one line on stderr
    holding `expected`, and nothing ran or was written."""
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(workflow))
    assert cli_main(["run", str(path), "--output", str(tmp_path / "out")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], lines
    assert not (tmp_path / "out").exists()
    return path


UI = json.loads((WORKFLOWS / "deepcache_default.json").read_text())


def ui_broken(mutate):
    ui = json.loads(json.dumps(UI))
    mutate(ui)
    return ui


def set_in(ui, *path_and_value):
    *path, last, value = path_and_value
    target = ui
    for key in path:
        target = target[key]
    target[last] = value


UI_CASES = {
    "inputs not a list of objects": (ui_broken(lambda u: set_in(u, "nodes", 2, "inputs", ["model"])),
                                     "node 3 (LiveCacheSampler): inputs[0] must be an object, got 'model'"),
    "inputs an object": (ui_broken(lambda u: set_in(u, "nodes", 2, "inputs", {"model": 2})),
                         "node 3 (LiveCacheSampler): inputs must be a list or null, got an object"),
    "link id a list": (ui_broken(lambda u: set_in(u, "nodes", 2, "inputs", 0, "link", [2])),
                       "node 3 (LiveCacheSampler): inputs[0].link must be an integer or null, got a list"),
    "link slot a string": (ui_broken(lambda u: set_in(u, "links", 0, 2, "0")),
                           "UI workflow: links[0][2] must be a non-negative integer, got '0'"),
    "node type a list": (ui_broken(lambda u: set_in(u, "nodes", 2, "type", ["LiveCacheSampler"])),
                         "node 3 (?): type must be a string, got a list of 1 item(s)"),
    "node type an object": (ui_broken(lambda u: set_in(u, "nodes", 2, "type", {"x": 1})),
                            "node 3 (?): type must be a string, got an object"),
    "duplicate node id": (ui_broken(lambda u: set_in(u, "nodes", 2, "id", 2)),
                          "UI workflow: nodes: two items share the node id '2'"),
    "links not a list": (ui_broken(lambda u: set_in(u, "links", {"1": [1, 1, 0, 2, 0]})),
                         "UI workflow: links must be a list or null"),
}


@pytest.mark.parametrize("case", UI_CASES, ids=list(UI_CASES))
def test_malformed_ui_workflows_fail_with_one_line_naming_the_node(tmp_path, capsys, case):
    run_refuses(tmp_path, capsys, *UI_CASES[case])


def test_deep_json_and_long_chains_are_no_recursion_errors(tmp_path, capsys):
    deep = tmp_path / "deep.json"
    deep.write_text('{"1": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert cli_main(["run", str(deep), "--check"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "JSON nested too deeply" in lines[0]

    ui = json.loads(json.dumps(UI))  # 5,000 reroutes between the decoder and the save node
    ui["links"] = [link for link in ui["links"] if link[0] != 5]
    first = 1000
    for k in range(5000):
        link_in = 5 if k == 0 else first + k - 1
        ui["nodes"].append({"id": first + k, "type": "Reroute", "inputs": [{"name": "", "type": "*", "link": link_in}],
                            "outputs": [{"name": "", "type": "IMAGE", "links": [first + k]}]})
        ui["links"].append([link_in, 4 if k == 0 else first + k - 1, 0, first + k, 0, "IMAGE"])
    ui["nodes"][4]["inputs"][0]["link"] = first + 4999
    ui["links"].append([first + 4999, first + 4999, 0, 5, 0, "IMAGE"])
    api = ui_to_api(ui, NODE_CLASS_MAPPINGS)
    assert api["5"]["inputs"]["images"] == ["4", 0]

    chain = broken(lambda a: None)  # 5,000 DeepCache nodes in a row (API format): ordering is a loop too
    for k in range(5000):
        chain[str(100 + k)] = {"class_type": "LiveCacheDeepCache",
                               "inputs": {**API["2"]["inputs"], "model": ["1" if k == 0 else str(99 + k), 0]}}
    chain["3"]["inputs"]["model"] = [str(5099), 0]
    assert len(validate(chain, NODE_CLASS_MAPPINGS)) == 5000 + 5  # the chain and the five original nodes


def test_a_prompt_the_sampler_refuses_fails_before_a_calibration_runs(tmp_path, capsys, monkeypatch):
    from livecache.nodes.cachequant_nodes import CalibrateSchedule

    def never(*args, **kwargs):
        raise AssertionError("calibration ran before the workflow was validated")

    monkeypatch.setattr(CalibrateSchedule, "calibrate", never)
    workflow = json.loads((WORKFLOWS / "cachequant_api.json").read_text())
    sampler = next(k for k, n in workflow.items() if n["class_type"] == "LiveCacheSampler")
    workflow[sampler]["inputs"]["prompt"] = "/home/user/picture.png"
    path = tmp_path / "w.json"
    path.write_text(json.dumps(workflow))
    for extra in (["--check"], ["--output", str(tmp_path / "out")]):
        assert cli_main(["run", str(path), *extra]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and f"node {sampler} (LiveCacheSampler): the embedded digits model" in lines[0]
    assert not (tmp_path / "out").exists()


def test_validate_inputs_follows_comfyuis_convention():
    """ComfyUI calls the hook with the literal inputs it names (linked ones as None) and wants True or text."""
    from livecache.nodes.diffusers_nodes import DiffusersSampler, LoadDiffusersModel

    assert DiffusersSampler.VALIDATE_INPUTS(prompt="a cat", negative_prompt="", model=None) is True  # model unknown
    model = LoadDiffusersModel().load("embedded:digits")[0]
    assert "names none" in DiffusersSampler.VALIDATE_INPUTS(prompt="a cat", model=model)
    assert "is not a STRING" in DiffusersSampler.VALIDATE_INPUTS(prompt=7)
    for cls in NODE_CLASS_MAPPINGS.values():
        hook = getattr(cls, "VALIDATE_INPUTS", None)
        if hook is not None:
            assert hook() is True  # every parameter optional: ComfyUI passes only what is literal


def test_broken_schedule_file_fails_at_validation(tmp_path, capsys):
    workflow = json.loads((WORKFLOWS / "cachequant_api.json").read_text())
    workflow["2"] = {"class_type": "LiveCacheLoadSchedule", "inputs": {"model": ["1", 0], "path": "s.json"}}
    (tmp_path / "s.json").write_text('{"format": "livecache.cache_schedule/1", "steps": 4.5}')
    path = tmp_path / "w.json"
    path.write_text(json.dumps(workflow))
    assert cli_main(["run", str(path), "--output", str(tmp_path)]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "node 2 (LiveCacheLoadSchedule)" in line and "s.json: cache schedule has no 'fingerprint' field" in line


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
    path.write_text(json.dumps(broken(lambda a: a["2"]["inputs"].update(cache_branch_id=15))))
    assert cli_main(["run", str(path), "--output", str(tmp_path)]) == 1  # the U-Net's depth is known only once run
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "node 2 (LiveCacheDeepCache) failed" in err and "15" in err


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


def test_comfyui_nodes_without_comfy_root_fail_in_one_line_naming_them(capsys):
    """A workflow of ComfyUI's own nodes names them all, and the flag that runs them, in one line."""
    workflow = WORKFLOWS / "comfyui" / "deepcache_checkpoint_api.json"
    assert cli_main(["run", str(workflow)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: node 1 (CheckpointLoaderSimple), node 3 (CLIPTextEncode), "
                             "node 4 (CLIPTextEncode), node 5 (EmptyLatentImage), node 6 (KSampler), "
                             "node 7 (VAEDecode), node 8 (SaveImage): "
                             "unknown node types;"), err
    assert "--comfy-root DIR" in err[0] and "LiveCacheDeepCacheModel" not in err[0]
    assert cli_main(["run", str(workflow), "--comfy-base", "."]) == 2
    assert "--comfy-base needs --comfy-root" in capsys.readouterr().err


def test_check_names_every_invalid_widget_not_only_the_first(tmp_path, capsys):
    """Old behaviour: `run --check` stopped at the first bad widget, so fixing a workflow took one run per widget."""
    api = json.loads((WORKFLOWS / "deepcache_default_api.json").read_text())
    api["2"]["inputs"]["cache_interval"] = -3
    api["3"]["inputs"]["steps"] = "twenty"
    api["3"]["inputs"]["scheduler"] = "no-such-scheduler"
    del api["5"]["inputs"]["filename_prefix"]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(api))
    assert cli_main(["run", str(path), "--check"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: 4 problems: "), lines
    for named in ("node 2 (LiveCacheDeepCache): ", "'cache_interval'", "'steps'", "'scheduler'",
                  "node 5 (LiveCacheSaveImages): missing required input 'filename_prefix'"):
        assert named in lines[0], (named, lines[0])
