"""The block cache core on a toy transformer whose blocks add to their input in place (as ComfyUI's Flux blocks do)."""

import pytest
import torch
from torch import nn

from livecache.accel.block_cache import BlockCache, BlockCacheConfig, fit_forecast, weighted
from livecache.accel.site import BlockIO, BlockSpan


class InPlaceBlock(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x += self.lin(x)  # in place, as `img += ...` in comfy.ldm.flux.layers.DoubleStreamBlock
        return x


def test_the_kept_residual_is_what_the_span_added_even_when_blocks_add_in_place():
    blocks = [InPlaceBlock(seed) for seed in range(4)]

    def model(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        for block in blocks:
            x = block(x)
        return x

    core = BlockCache(BlockCacheConfig(cache_interval=2))
    span = blocks[1:3]
    core.attach_span(BlockSpan(tuple(span), tuple(BlockIO.of(b, ("x",), None) for b in span)))
    core.reset(2)
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(0))
    outputs = []
    with torch.no_grad():
        for level in (1.0, 0.9):  # a full step, then a cached step on the same input
            core.begin_call(level, (x,), {})
            outputs.append(model(x))
            core.end_call()
    core.remove()
    assert (core.stats.full_calls, core.stats.cached_calls) == (1, 1)
    assert torch.allclose(outputs[1], outputs[0], atol=1e-6 * float(outputs[0].abs().max()), rtol=0)


def gram_of(residuals: list[torch.Tensor]) -> torch.Tensor:
    flat = torch.stack([r.double().flatten() for r in residuals])
    return flat @ flat.T


SCHEDULE = (True, False, False, True, False, False, True, False, False)  # F..F..F..


def fitted_error(residuals: list[torch.Tensor], weights: tuple[tuple[float, ...], ...]) -> float:
    """Σ over cached steps of ‖prediction − r_j‖² / ‖r_j‖², replaying the fitted mode's history."""
    kept, total = [], 0.0
    for j, full in enumerate(SCHEDULE):
        if full:
            kept.append((float(j), (residuals[j],)))
            continue
        prediction = weighted(kept, weights[j])[0]
        total += float((prediction - residuals[j]).pow(2).sum() / residuals[j].pow(2).sum())
    return total


def test_the_fit_is_reuse_when_the_residuals_do_not_change():
    constant = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    weights = fit_forecast(gram_of([constant] * len(SCHEDULE)), SCHEDULE)
    for j, full in enumerate(SCHEDULE):
        if full:
            assert weights[j] == ()
            continue
        assert len(weights[j]) == (1 if j < 3 else 2)
        assert abs(weights[j][-1] - 1.0) < 1e-9 and all(abs(w) < 1e-9 for w in weights[j][:-1]), weights[j]


def test_the_fit_extrapolates_a_linear_trajectory_exactly():
    g = torch.Generator().manual_seed(1)
    start, slope = torch.randn(32, generator=g), torch.randn(32, generator=g)
    residuals = [start + 0.3 * k * slope for k in range(len(SCHEDULE))]
    weights = fit_forecast(gram_of(residuals), SCHEDULE)
    assert weights[4] == pytest.approx((-1 / 3, 4 / 3), abs=1e-6)  # first order from steps 0 and 3 to step 4
    kept = [(float(j), (residuals[j],)) for j in (0, 3)]
    assert torch.allclose(weighted(kept, weights[5])[0], residuals[5], atol=1e-4 * float(residuals[5].abs().max()))


def test_on_a_fluctuating_trajectory_the_calibrated_fit_beats_reuse_and_extrapolation_on_other_noise():
    """A slowly drifting mean plus a step-to-step fluctuation that is independent between steps (what the
    residual of a random-weight Flux looks like): the fit is calibrated on one draw and scored on another."""

    def trajectory(seed: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        mean, drift = torch.randn(256, generator=g), 0.05 * torch.randn(256, generator=g)
        return [mean + k * drift + 0.3 * torch.randn(256, generator=g) for k in range(len(SCHEDULE))]

    weights = fit_forecast(gram_of(trajectory(2)), SCHEDULE)
    measured = trajectory(3)
    reuse = tuple(() if full else (1.0,) for full in SCHEDULE)
    first_order = tuple(() if full else ((1.0,) if j < 3 else (-(j % 3) / 3, 1 + (j % 3) / 3))
                        for j, full in enumerate(SCHEDULE))
    assert fitted_error(measured, weights) < 0.9 * fitted_error(measured, reuse)
    assert fitted_error(measured, reuse) < fitted_error(measured, first_order)


def test_the_fitted_mode_skips_the_span_and_adds_the_weighted_residuals():
    blocks = [InPlaceBlock(seed) for seed in range(4)]
    calls = {"span": 0}
    for block in blocks[1:3]:
        block.lin.register_forward_hook(lambda *_: calls.update(span=calls["span"] + 1))

    def model(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        for block in blocks:
            x = block(x)
        return x

    schedule = (True, True, False)
    config = BlockCacheConfig(schedule="calibrated", full_steps_override=schedule, mode="fitted",
                              weights=((), (), (0.25, 0.5)))
    core = BlockCache(config)
    span = blocks[1:3]
    core.attach_span(BlockSpan(tuple(span), tuple(BlockIO.of(b, ("x",), None) for b in span)))
    core.reset(3)
    xs = [torch.randn(2, 8, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    residuals, outputs = [], []
    with torch.no_grad():
        for level, x in zip((1.0, 0.9, 0.8), xs, strict=True):
            before = calls["span"]
            core.begin_call(level, (x,), {})
            outputs.append(model(x))
            core.end_call()
            residuals.append(calls["span"] - before)
    core.remove()
    with torch.no_grad():
        kept = 0.25 * core_free_span(blocks, xs[0]) + 0.5 * core_free_span(blocks, xs[1])
        expected = blocks[3](blocks[0](xs[2].clone()) + kept)
    assert residuals == [2, 2, 0]  # the span's two blocks run on full steps only
    assert (core.stats.full_calls, core.stats.cached_calls, core.stats.forecast_calls) == (2, 1, 1)
    assert torch.allclose(outputs[2], expected, atol=1e-5 * float(expected.abs().max()), rtol=0)


def core_free_span(blocks: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """What the span (blocks 1 and 2) adds on the uncached model for input x."""
    entry = blocks[0](x.clone())
    return blocks[2](blocks[1](entry.clone())) - entry


def test_fitted_weights_are_validated_against_their_schedule():
    schedule = (True, False, True, False)
    good = ((), (1.0,), (), (0.5, 0.5))
    fitted = BlockCacheConfig(schedule="calibrated", full_steps_override=schedule, mode="fitted", weights=good)
    assert fitted.history == 2
    for weights, message in ((None, "needs weights"), (good[:3], "one per step"), (((1.0,), *good[1:]), "full step"),
                             (((), (0.5, 0.5), (), (0.5, 0.5)), "after 1 full steps"),
                             (((), (float("nan"),), (), (1.0,)), "finite")):
        with pytest.raises(ValueError, match=message):
            BlockCacheConfig(schedule="calibrated", full_steps_override=schedule, mode="fitted", weights=weights)
    with pytest.raises(ValueError, match="needs schedule='calibrated'"):
        BlockCacheConfig(mode="fitted", weights=good)
    with pytest.raises(ValueError, match="need mode='fitted'"):
        BlockCacheConfig(schedule="calibrated", full_steps_override=schedule, weights=good)
    with pytest.raises(ValueError, match="gram is"):
        fit_forecast(torch.eye(3), schedule)
