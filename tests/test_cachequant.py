"""CacheQuant, the DP cache schedule, W8A8 and DGQ on a tiny SD-shaped U-Net built in code."""

import itertools
import json

import pytest
import torch

from livecache.accel.cache_schedule import (
    CalibratedSchedule,
    PairStats,
    calibrated_schedule,
    dp_schedule,
    dp_segments,
    max_segment,
    measure_segments,
    model_fingerprint,
    schedule_cost,
    segment_schedule,
    segments_cost,
    uniform_with,
)
from livecache.accel.cachequant import CacheQuantConfig, Calibration
from livecache.accel.deepcache import DeepCacheConfig
from livecache.accel.forecast_fit import fit_forecast
from livecache.accel.quant import QuantConfig, group_fake_quant, int8_available, log2_quantize, quantize_weight
from livecache.adapters.diffusers_quant import (
    calibrate_cachequant_unet,
    calibrate_quantization,
    calibrate_schedule,
)
from livecache.adapters.diffusers_site import accelerated
from livecache.adapters.diffusers_unet import cross_attentions
from livecache.bench.metrics import psnr
from livecache.bench.workloads import SD15_SCHEDULER
from livecache.models.calibration import calibration_runs
from livecache.models.pipeline import DiffusionModel
from livecache.models.sampling import initial_noise, make_scheduler, sample

STEPS = 8


def tiny_model(make_unet, seed=0):
    g = torch.Generator().manual_seed(7)
    prompts = {p: torch.randn(1, 3, 32, generator=g) for p in ("a", "b", "")}
    return DiffusionModel("tiny", make_unet(seed), dict(SD15_SCHEDULER), lambda p: prompts[p])


@pytest.fixture(scope="module")
def model(unet_factory):
    return tiny_model(unet_factory)


@pytest.fixture(scope="module")
def runs(model):
    return calibration_runs(model, ["a", "b"], [0], STEPS, "ddim", 5.0)


def generate(model, configs, steps=STEPS, seed=3):
    scheduler = make_scheduler("ddim", model.scheduler_config)
    with accelerated(model.unet, scheduler, configs) as handles:
        out = sample(model, scheduler, model.encode_prompt("a"), model.encode_prompt(""), initial_noise(model, 1, seed),
                     steps, 5.0, progress=False)
    return out, handles


def brute_force(errors, k):
    steps = errors.shape[0]
    best = float("inf")
    for rest in itertools.combinations(range(1, steps), k - 1):
        schedule = tuple(i == 0 or i in rest for i in range(steps))
        best = min(best, schedule_cost(errors, schedule))
    return best


@pytest.mark.parametrize("seed", range(4))
def test_dp_schedule_is_optimal_and_never_worse_than_uniform(seed):
    g = torch.Generator().manual_seed(seed)
    errors = torch.rand(9, 9, generator=g, dtype=torch.float64).triu(1).cumsum(1).triu(1)
    for k in (1, 3, 5, 9):
        chosen = dp_schedule(errors, k)
        assert sum(chosen) == k and chosen[0]
        assert schedule_cost(errors, chosen) == pytest.approx(brute_force(errors, k))
        assert schedule_cost(errors, chosen) <= schedule_cost(errors, uniform_with(9, k)) + 1e-12


@pytest.mark.parametrize("seed", range(3))
def test_dp_over_measured_segments_is_optimal_and_skips_unmeasured_ones(seed):
    g = torch.Generator().manual_seed(seed)
    segments = torch.rand(9, 9, generator=g, dtype=torch.float64).triu(1)
    segments[torch.ones(9, 9).triu(4).bool()] = float("inf")  # segments longer than 3 cached steps: not measured
    for k in (3, 5, 9):
        chosen = dp_segments(segments, k)
        best = min(segments_cost(segments, tuple(i == 0 or i in rest for i in range(9)))
                   for rest in itertools.combinations(range(1, 9), k - 1))
        assert sum(chosen) == k and best < float("inf")
        assert segments_cost(segments, chosen) == pytest.approx(best)
    with pytest.raises(ValueError, match="only measured segments"):
        dp_segments(segments, 2)  # 2 full steps cannot cover 9 steps with segments of at most 3 cached steps


def test_measure_segments_runs_each_segment_once_against_the_uncached_output():
    calls = []

    def generate(schedule):  # a fake sampler: each cached step adds its index to the output
        calls.append(schedule)
        return torch.tensor([10.0 + sum(k for k, full in enumerate(schedule or ()) if not full)])

    segments = measure_segments(generate, 5, 2)
    assert calls[0] is None and len(calls) == 1 + 4 + 3  # the reference, then every segment of 1 or 2 steps
    assert segments[1, 3] == pytest.approx((2 + 3) ** 2 / 100) and segment_schedule(5, 1, 3) in calls
    assert torch.isinf(segments[0, 3]) and max_segment(20, 7) == 6 and max_segment(4, 1) == 3


def test_output_objective_schedule_is_measured_end_to_end(model, runs):
    schedule = calibrate_schedule(model.unet, Calibration(runs, STEPS, model.name, "ddim"), 3, 0)
    assert schedule.objective == "output" and schedule.k == 3
    segments = torch.tensor(schedule.segments)
    assert schedule.cost == pytest.approx(segments_cost(segments, schedule.full_steps))
    assert schedule.cost <= schedule.uniform_cost
    longest = max_segment(STEPS, 3)
    measured = [(i, j) for i in range(STEPS) for j in range(i + 1, STEPS) if segments[i, j] < float("inf")]
    assert all(j - i <= longest for i, j in measured) and len(measured) == sum(
        min(longest, STEPS - 1 - i) for i in range(STEPS))
    assert all(segments[i, j] > 0 for i, j in measured)  # every cached segment changes the output


def test_calibrated_schedule_beats_uniform_on_calibration_data(model, runs):
    schedule = calibrate_schedule(model.unet, Calibration(runs, STEPS, model.name, "ddim"), 3, 0, objective="feature")
    assert schedule.objective == "feature" and schedule.segments is None
    errors = torch.tensor(schedule.errors)
    uniform = uniform_with(STEPS, 3)
    assert sum(uniform) == schedule.k == 3
    assert schedule.cost == pytest.approx(schedule_cost(errors, schedule.full_steps))
    assert schedule_cost(errors, schedule.full_steps) <= schedule_cost(errors, uniform)
    assert (errors.triu(1) > 0).sum() == STEPS * (STEPS - 1) // 2  # every reuse pair was measured
    _, handles = generate(model, [DeepCacheConfig(schedule="calibrated", full_steps_override=schedule.full_steps)])
    assert handles[0].stats.full_calls == 3 and handles[0].stats.cached_calls == STEPS - 3


def test_schedule_file_round_trip_and_clear_mismatch_errors(model, runs, tmp_path, unet_factory):
    calibration = Calibration(runs, STEPS, model.name, "ddim", {"prompts": ["a", "b"]})
    schedule = calibrate_schedule(model.unet, calibration, 3, 0)
    path = schedule.save(tmp_path / "s.json")
    data = json.loads(path.read_text())
    assert data["schedule"].count("F") == 3 and data["steps"] == STEPS and data["calibration"]["prompts"] == ["a", "b"]
    loaded = CalibratedSchedule.load(path)
    assert loaded == schedule
    loaded.check(model_fingerprint(model.unet), STEPS, "ddim")
    with pytest.raises(ValueError, match="calibrated for model tiny"):
        loaded.check(model_fingerprint(unet_factory(seed=1)))
    with pytest.raises(ValueError, match=f"is for {STEPS} steps, the sampler runs 12"):
        loaded.check(model_fingerprint(model.unet), 12)
    config = DeepCacheConfig(schedule="calibrated", full_steps_override=loaded.full_steps)
    with pytest.raises(ValueError, match=f"calibrated schedule is for {STEPS} steps, but the sampler runs 5"):
        generate(model, [config], steps=5)
    path.write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="not a cache schedule"):
        CalibratedSchedule.load(path)


def test_fingerprint_ignores_precision_but_not_weights(unet_factory):
    unet = unet_factory()
    assert model_fingerprint(unet) == model_fingerprint(unet_factory().to(torch.bfloat16))
    assert model_fingerprint(unet) != model_fingerprint(unet_factory(seed=1))


@pytest.mark.parametrize("kwargs, message", [
    ({"schedule": "calibrated"}, "needs full_steps_override"),
    ({"full_steps_override": (True, False)}, "needs schedule='calibrated'"),
    ({"schedule": "calibrated", "full_steps_override": (False, True)}, "step 0 must be a full step"),
])
def test_deepcache_calibrated_config_is_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DeepCacheConfig(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "dgq", "weight_bits": 5}, "weight_bits must be 8, 6 or 4, got 5"),
    ({"method": "dgq", "weight_bits": 16}, "weight_bits must be 8, 6 or 4"),
    ({"weight_bits": 4}, "W8A8 means 8-bit weights and activations"),
    ({"method": "dgq", "act_bits": 3}, r"act_bits must be an integer in \[4, 8\]"),
    ({"method": "dgq", "backend": "int8"}, "DGQ .* has no int8 kernel"),
    ({"method": "int2"}, "method must be 'w8a8' or 'dgq'"),
    ({"method": "dgq", "outlier_channels": 0.7}, r"outlier_channels must be a fraction in \[0, 0.5\)"),
    ({"method": "dgq", "attention_bits": 1}, "attention_bits must be 0"),
])
def test_quant_config_refuses_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantConfig(**kwargs)
    with pytest.raises(ValueError, match="W8A8"):
        CacheQuantConfig(quant=QuantConfig("dgq", 4))


def test_quantizers():
    probs = torch.softmax(torch.randn(4, 16) * 3, dim=-1)
    q = log2_quantize(probs, 6)
    nonzero = q[q > 0]
    assert torch.equal(torch.log2(nonzero), torch.round(torch.log2(nonzero)))  # powers of two only
    assert ((q - probs).abs() <= probs / 2 + 2.0**-63).all()  # within a factor sqrt(2) or flushed to 0
    x = torch.randn(64, 32)
    x[:, 5] *= 100  # a channel outlier
    keep = torch.zeros(64, 32, dtype=torch.bool)
    keep[:, 5] = True
    out = group_fake_quant(x, 4, 8, keep, 0.0)
    assert torch.equal(out[:, 5], x[:, 5])
    rel = ((out - x).norm() / x[:, torch.arange(32) != 5].norm()).item()
    assert rel < 0.15  # the outlier did not inflate its group's scale
    w = torch.randn(16, 128)
    for bits, bound in ((8, 0.01), (6, 0.04), (4, 0.2)):
        ints, scale = quantize_weight(w, bits, group=64)
        assert ints.abs().max() <= 2 ** (bits - 1) - 1
        assert ((ints * scale).reshape(w.shape) - w).norm() / w.norm() < bound


@pytest.fixture(scope="module")
def reference(model):
    return generate(model, [])[0]


def test_w8a8_is_close_to_float_and_removal_restores_the_model(model, runs, reference):
    plan = calibrate_quantization(model.unet, QuantConfig(), runs)
    out, handles = generate(model, [plan])
    assert psnr(out, reference) > 30
    assert plan.size_ratio > 3.4
    if int8_available():
        assert handles[0].stats.backend.startswith("int8")
    assert torch.equal(generate(model, [])[0], reference)  # removed: bit-identical
    simulated = calibrate_quantization(model.unet, QuantConfig(backend="simulated"), runs)
    out_sim, handles = generate(model, [simulated])
    assert handles[0].stats.backend.startswith("simulated") and psnr(out_sim, reference) > 30


def test_dgq_fidelity_follows_the_bits_and_attention_quantizer_is_restored(model, runs, reference):
    scores = {}
    for bits in (8, 4):
        plan = calibrate_quantization(model.unet, QuantConfig("dgq", bits, attention_bits=6 if bits == 4 else 0), runs)
        out, handles = generate(model, [plan])
        scores[bits] = psnr(out, reference)
        assert handles[0].stats.backend.startswith(f"simulated {bits}-bit")
    assert scores[8] > scores[4] > 20
    assert all(type(a.processor).__name__ != "AttnProcessor" for a in cross_attentions(model.unet))
    assert all("get_attention_scores" not in a.__dict__ for a in cross_attentions(model.unet))


def test_cachequant_corrections_reduce_the_errors_they_target(model, runs, reference, unet_factory):
    calibration = Calibration(runs, STEPS, model.name, "ddim")
    plan = calibrate_cachequant_unet(model.unet, CacheQuantConfig(full_steps=3), calibration)
    assert plan.schedule.objective == "output" and plan.schedule.cost <= plan.schedule.uniform_cost
    assert plan.cache_correction.error_after < plan.cache_correction.error_before
    before, after = plan.quant.correction_error
    assert after < before
    out, handles = generate(model, [plan])
    assert handles[0].stats.full_calls == 3 and handles[0].stats.schedule == "".join(
        "F" if f else "." for f in plan.schedule.full_steps)
    assert psnr(out, reference) > 25
    no_fix, _ = generate(model, [plan.variant(False, False)])
    assert not torch.equal(no_fix, out)  # the corrections change the result
    assert torch.equal(generate(model, [])[0], reference)
    with pytest.raises(ValueError, match="calibrated for model tiny"):
        generate(tiny_model(unet_factory, seed=1), [plan])


def valid_schedule_json() -> dict:
    schedule = CalibratedSchedule("f" * 16, "m", 4, "ddim", (True, False, True, False),
                                  tuple(tuple(0.0 if j <= i else 0.1 for j in range(4)) for i in range(4)), 0.3, 0.2)
    return json.loads(schedule.to_json())


@pytest.mark.parametrize("change, message", [
    ({"full_steps": [1, "yes", 1, 0]}, r"field 'full_steps'\[1\] must be true/false or 1/0, got 'yes'"),
    ({"full_steps": [1, 0.5, 1, 0]}, r"field 'full_steps'\[1\] must be true/false or 1/0, got 0.5"),
    ({"full_steps": [0, 1, 1, 0]}, r"field 'full_steps': step 0 must be a full step \(the first flag is false\)"),
    ({"full_steps": [1, 0]}, r"field 'full_steps' must be a list of 4 flags"),
    ({"errors": [[0.1]] * 4}, r"field 'errors' must be a 4×4 matrix \(one row per step\), got 4×1"),
    ({"errors": [[0, float("nan"), 0, 0]] * 4}, r"field 'errors'\[0\]\[1\] must be a finite number >= 0, got nan"),
    ({"errors": [[0, float("inf"), 0, 0]] * 4}, r"field 'errors'\[0\]\[1\] must be a finite number >= 0, got inf"),
    ({"segments": [[None, -1, 0, 0]] * 4}, r"field 'segments'\[0\]\[1\] must be a finite number >= 0 or null"),
    ({"steps": 4.5}, r"field 'steps' must be a whole number of steps in 1\.\.1000, got 4.5"),
    ({"steps": True}, r"field 'steps' must be a whole number"),
    ({"cost": float("nan")}, r"field 'cost' must be a number >= 0, got nan"),
    ({"model": "x" * 5000}, r"field 'model' must be a non-empty string of at most 1000 characters"),
    ({"calibration": []}, r"field 'calibration' must be an object"),
    ({"objective": "speed"}, r"field 'objective' must be 'feature' or 'output'"),
    ({"forecast": [[], [1], [], []]}, r"field 'forecast': weights\[3\]: a cached step after 2 full steps takes 1\.\.2"),
    ({"forecast": [[], ["x"], [], [1]]}, r"field 'forecast': weights\[1\] must be a tuple of finite floats"),
    ({"forecast": [[0.5], [1], [], [1]]}, r"field 'forecast': weights\[0\]: step 0 is a full step"),
    ({"forecast": {"a": 1}}, r"field 'forecast' must be a list of 4 lists"),
])
def test_hostile_schedule_files_are_refused_naming_the_field(tmp_path, change, message):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({**valid_schedule_json(), **change}))
    with pytest.raises(ValueError, match=rf"s\.json: {message}"):
        CalibratedSchedule.load(path)


def test_schedule_files_that_are_not_schedules_are_refused_without_tracebacks(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({**valid_schedule_json(), "calibration": {"notes": "x" * (50 << 20)}}))
    with pytest.raises(ValueError, match=r"s\.json: \d+ bytes is too large for a cache schedule"):
        CalibratedSchedule.load(path)
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="JSON nested too deeply"):
        CalibratedSchedule.load(path)
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match="not UTF-8 text"):
        CalibratedSchedule.load(path)
    path.write_text(json.dumps(valid_schedule_json()))
    assert CalibratedSchedule.load(path).full_steps == (True, False, True, False)


def test_a_calibrated_schedule_carries_the_fitted_forecast_for_its_full_steps(tmp_path):
    """PairStats' Gram matrix is the features' inner products; the schedule fits the block cache's weights
    on it for the full steps it chose, and they survive the file; a file without them loads as None."""
    g = torch.Generator().manual_seed(4)
    runs = [[torch.randn(2, 3, 5, generator=g) for _ in range(6)] for _ in range(2)]
    stats = PairStats(6)
    for run in runs:
        stats.add_run(run)
    flat = [torch.stack([f.double().flatten() for f in run]) for run in runs]
    assert torch.allclose(stats.gram, sum(f @ f.T for f in flat), rtol=1e-9, atol=0)
    schedule = calibrated_schedule(stats, 3, "f" * 16, "m", "ddim")
    assert schedule.forecast == fit_forecast(stats.gram, schedule.full_steps)
    assert [bool(w) for w in schedule.forecast] == [not full for full in schedule.full_steps]
    loaded = CalibratedSchedule.load(schedule.save(tmp_path / "s.json"))
    assert loaded.forecast == schedule.forecast
    old = {k: v for k, v in json.loads(schedule.to_json()).items() if k != "forecast"}
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert CalibratedSchedule.load(tmp_path / "old.json").forecast is None


def test_the_block_cache_nodes_take_the_fitted_weights_from_a_connected_schedule():
    from livecache.nodes.dit_nodes import block_cache_config

    schedule = CalibratedSchedule("f" * 16, "m", 4, "ddim", (True, False, True, False), ((0.0,) * 4,) * 4, 0.3, 0.2,
                                  forecast=((), (1.0,), (), (0.4, 0.6)))
    config = block_cache_config((1, 5), 3, 0, 0, "fitted", 1, schedule)
    assert (config.mode, config.weights, config.full_steps_override) == ("fitted", schedule.forecast,
                                                                         schedule.full_steps)
    assert block_cache_config((1, 5), 3, 0, 0, "reuse", 1, schedule).weights is None
    with pytest.raises(ValueError, match="mode 'fitted' needs a calibrated_schedule"):
        block_cache_config((1, 5), 3, 0, 0, "fitted", 1)
    with pytest.raises(ValueError, match="carries no fitted forecast"):
        block_cache_config((1, 5), 3, 0, 0, "fitted", 1, CalibratedSchedule(
            "f" * 16, "m", 4, "ddim", (True, False, True, False), ((0.0,) * 4,) * 4, 0.3, 0.2))
