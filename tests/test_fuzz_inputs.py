"""Property tests: whatever a workflow, weights file, config or schedule file holds, the answer is a
clear error of the documented type (or success), never a traceback; `livecache run` exits 2 with one line.

Bounded: a fixed number of examples each, no example database written, a few seconds per test.
"""

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from livecache import NODE_CLASS_MAPPINGS
from livecache.accel.cache_schedule import CalibratedSchedule
from livecache.cli import main as cli_main
from livecache.graph.errors import WorkflowError
from livecache.graph.runner import load_workflow, validate
from livecache.models.loading import WeightsError, load_state_into, read_config

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"
FUZZ = settings(max_examples=120, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

scalars = st.none() | st.booleans() | st.integers(-3, 2**70) | st.floats() | st.text(max_size=12)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.text(max_size=8), inner, max_size=4), max_leaves=16)


def paths(document, prefix=()):
    """Every place in a JSON document (as key paths), to mutate one of them."""
    yield prefix
    items = document.items() if isinstance(document, dict) else enumerate(document) \
        if isinstance(document, list) else ()
    for key, value in items:
        yield from paths(value, (*prefix, key))


def mutated(document, data):
    """`document` with one place replaced by a random JSON value, or deleted."""
    document = json.loads(json.dumps(document))
    where = data.draw(st.sampled_from(list(paths(document))[1:]))
    parent = document
    for key in where[:-1]:
        parent = parent[key]
    if data.draw(st.booleans()) and isinstance(parent, dict):
        del parent[where[-1]]
    else:
        parent[where[-1]] = data.draw(json_values)
    return document


def refuses_cleanly(tmp_path: Path, document) -> None:
    """Either valid, or a WorkflowError — and the CLI says so in exactly one line with exit code 2."""
    path = tmp_path / "w.json"
    path.write_text(json.dumps(document))
    try:
        api = load_workflow(path, NODE_CLASS_MAPPINGS)
        validate(api, NODE_CLASS_MAPPINGS)
        valid = True
    except WorkflowError:
        valid = False
    if valid:  # what passes is really runnable: no NaN or infinite number slipped through a bound
        assert all(not isinstance(v, float) or math.isfinite(v) for node in api.values()
                   for v in node.get("inputs", {}).values())
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        code = cli_main(["run", str(path), "--check"])
    assert code == (0 if valid else 2)
    if not valid:
        assert len(stderr.getvalue().strip().splitlines()) == 1, stderr.getvalue()


@pytest.mark.parametrize("name", ["deepcache_default.json", "cachequant_api.json", "stacked.json"])
@FUZZ
@given(data=st.data())
def test_mutated_workflows_fail_cleanly(tmp_path, name, data):
    refuses_cleanly(tmp_path, mutated(json.loads((WORKFLOWS / name).read_text()), data))


NODE_IDS = st.sampled_from(["1", "2", "3", "4"])
CLASS_TYPES = st.sampled_from([*NODE_CLASS_MAPPINGS, "NoSuchNode", "Reroute"])
INPUT_NAMES = st.sampled_from(sorted({name for cls in NODE_CLASS_MAPPINGS.values() for section in ("required",
                              "optional") for name in cls.INPUT_TYPES().get(section, {})}))
links = st.lists(st.one_of(NODE_IDS, st.integers(0, 5)), min_size=2, max_size=2).map(
    lambda pair: [str(pair[0]), pair[1] if isinstance(pair[1], int) else 0])


@FUZZ
@given(graph=st.dictionaries(NODE_IDS, st.fixed_dictionaries({
    "class_type": CLASS_TYPES | json_values, "inputs": st.dictionaries(INPUT_NAMES, links | json_values, max_size=5)}),
    min_size=1, max_size=4))
def test_random_api_graphs_fail_cleanly(tmp_path, graph):
    """Random graphs: unknown types, wrong inputs, links anywhere (cycles included)."""
    refuses_cleanly(tmp_path, graph)


@FUZZ
@given(document=json_values, depth=st.integers(0, 3000))
def test_arbitrary_json_and_deep_nesting_fail_cleanly(tmp_path, document, depth):
    refuses_cleanly(tmp_path, {"nodes": [{"id": 1, "type": "Reroute", "inputs": [[document] * 2]}]}
                    if depth % 2 else document)
    path = tmp_path / "deep.json"
    path.write_text('{"1": {"class_type": "LiveCacheLoadDiffusers", "inputs": {"source": ' + "[" * depth
                    + "]" * depth + "}}}")
    with pytest.raises(WorkflowError):
        validate(load_workflow(path, NODE_CLASS_MAPPINGS), NODE_CLASS_MAPPINGS)


def small_module() -> torch.nn.Module:
    module = torch.nn.Linear(4, 3)
    module.register_buffer("count", torch.zeros(2, dtype=torch.int64))
    return module


DTYPES = st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.int64,
                          torch.bool])
SHAPES = st.sampled_from([(3, 4), (3,), (2,), (4, 3), (), (0,)])
FILLS = st.sampled_from([0.5, -2.0, math.nan, math.inf, 0.0])


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(["weight", "bias", "count", "other"]),
                               st.none() | st.tuples(DTYPES, SHAPES, FILLS), max_size=2))
def test_weight_files_with_wrong_keys_dtypes_shapes_or_values_fail_cleanly(tmp_path, changes):
    """A valid file with up to two tensors removed (None) or replaced by another dtype, shape or value."""
    file = tmp_path / "w.safetensors"
    state = small_module().state_dict()
    for name, change in changes.items():
        if change is None:
            state.pop(name, None)
        else:
            dtype, shape, fill = change
            state[name] = torch.full(shape, fill).to(dtype) if dtype.is_floating_point else torch.zeros(
                shape, dtype=dtype)
    save_file(state, str(file))
    try:
        module = load_state_into(small_module(), file)
    except WeightsError as err:
        assert str(file) in str(err)
        return
    assert all(bool(torch.isfinite(p).all()) for p in module.parameters())  # loaded only when valid


@FUZZ
@given(cut=st.integers(0, 400), noise=st.binary(max_size=64))
def test_truncated_or_corrupt_safetensors_fail_cleanly(tmp_path, cut, noise):
    file = tmp_path / "w.safetensors"
    save_file(small_module().state_dict(), str(file))
    data = file.read_bytes()
    file.write_bytes(data[:cut] + noise if cut < len(data) else noise + data[len(noise):])
    try:
        load_state_into(small_module(), file)
    except WeightsError as err:
        assert str(file) in str(err)


@FUZZ
@given(config=json_values | st.dictionaries(st.sampled_from(["sample_size", "resolution", "block_out_channels",
                                                              "dim", "_class_name"]), json_values, max_size=4))
def test_any_config_json_fails_cleanly(tmp_path, config):
    (tmp_path / "config.json").write_text(json.dumps(config))
    try:
        read_config(tmp_path)
    except WeightsError as err:
        assert "config.json" in str(err)


SCHEDULE = json.loads(CalibratedSchedule("f" * 16, "m", 3, "ddim", (True, False, True),
                                         ((0.0, 0.1, 0.2), (0.0, 0.0, 0.1), (0.0, 0.0, 0.0)), 0.2, 0.1).to_json())


@FUZZ
@given(data=st.data())
def test_mutated_schedule_files_fail_cleanly(tmp_path, data):
    path = tmp_path / "s.json"
    path.write_text(json.dumps(mutated(SCHEDULE, data)))
    try:
        schedule = CalibratedSchedule.load(path)
    except ValueError as err:
        assert type(err) is ValueError and str(path) in str(err)
        return
    assert len(schedule.full_steps) == schedule.steps and schedule.full_steps[0]
    assert all(math.isfinite(v) and v >= 0 for row in schedule.errors for v in row)
    assert all(isinstance(flag, bool) for flag in schedule.full_steps) and isinstance(schedule.steps, int)
