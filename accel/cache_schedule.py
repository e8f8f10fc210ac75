"""Calibrated cache schedules (CacheQuant, part a) and the per-channel cache-error correction (part c).

Why calibrate: uniform or front-loaded schedules are priors; how much reusing step i's deep
features at step j costs depends on the model and sampler. Calibration measures it:

1. `FeatureRecorder` records, during a few *uncached* calibration generations (prompts/seeds), the
   output of the module whose cached value the shallow branch consumes (the adapter names it; for
   a diffusers U-Net at branch 0 it is the last deep up-layer). One tensor per step.
2. `PairStats` turns each run into sums for every pair of steps i < j: the relative squared error
   of using F_i in place of F_j (`errors[i, j]`), and per-channel least-squares sums (Σx, Σy, Σxx,
   Σxy, Σyy with x = F_i, y = F_j). Only sums are kept, so memory does not grow with the run count.
3. The DP picks the K full steps (step 0 always full) that minimise a sum of *segment* costs, a
   segment being a full step at i followed by cached steps i+1..j (`dp_segments`). Two objectives
   give the segment costs:
   - `"feature"` (one uncached pass): Σ_{k=i+1..j} errors[i, k], the relative feature reuse error
     (`reuse_segments`). Cheap, but a proxy: on the trained digits model it favours full steps at
     the end, where features change fastest in relative terms, while an error there barely reaches
     the image; errors at high noise change the content (a reused early step costs far more output
     error than a late one).
   - `"output"` (the default of the adapters): `measure_segments` runs a calibration generation once
     per segment, with exactly that segment cached, and takes the relative squared difference of its
     output from the uncached output: the end-to-end cost of the segment, whatever the sampler, the
     step or the shallow branch does with the stale feature. Segments are capped at
     `2·ceil(T/K)` steps (longer ones never pay off with K full steps), so it costs about
     2·T²/K cached generations, once per model, step count and K.
   The DP is exact for its objective, hence never worse than the uniform schedule with the same K
   on the calibration data (the objective assumes segments add up, which is what the benchmark then
   checks end to end).
4. `CalibratedSchedule` is the artefact: steps, scheduler, K, the full steps, the objective, the
   feature reuse matrix (and the measured segment costs) and the model fingerprint, saved as a
   small JSON file a user can read; loading it for another model or step count fails with a
   message naming the mismatch.
5. `CacheCorrection` solves, for every cached step j of the chosen schedule (source step i), the
   per-channel affine map y ≈ a·x + b from the same sums: the *cache* half of CacheQuant's
   decoupled error correction, applied step by step on the reused features.
"""

from __future__ import annotations

import hashlib
import json
import math
import weakref
from collections.abc import Callable, Hashable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..files import text_writer, write_new, write_numbered
from .forecast_fit import check_weights, fit_forecast
from .progress import Progress
from .schedules import Schedule, count_full, format_schedule, uniform_schedule
from .step_clock import StepClock

SCHEDULE_FORMAT = "livecache.cache_schedule/1"
LevelReader = Callable[[tuple[Any, ...], dict[str, Any]], float]


_REMEMBERED: weakref.WeakKeyDictionary[nn.Module, tuple[Hashable, str]] = weakref.WeakKeyDictionary()


def model_fingerprint(module: nn.Module, weights_version: Hashable | None = None) -> str:
    """A short hash of parameter names, shapes and magnitudes: tells checkpoints apart, not fp32 from bf16.

    Why magnitudes of the bf16-rounded weights: the same checkpoint in fp32 and bf16 must match (a
    schedule calibrated in one precision serves the other), and rounding to bf16 first makes both
    hold exactly the same numbers; two different checkpoints do not. They are summed as integers
    (the bf16 bit patterns without the sign): a float sum depends on how many threads reduce it, and
    a fingerprint must not change with `torch.set_num_threads`.

    Hashing reads every weight (seconds for an SD1.5 U-Net), so a host that can say when its
    weights change passes `weights_version` (ComfyUI: which weight patches are merged into them,
    `comfy_layers.weights_version`): the fingerprint is then remembered per module and recomputed
    only when that version or the parameter objects change. Without one it is always recomputed, as a
    bare module's weights may have been edited in place.
    """
    if weights_version is None:
        return _hash_parameters(module)
    key = (weights_version, tuple(id(p) for p in module.parameters()))
    remembered = _REMEMBERED.get(module)
    if remembered is not None and remembered[0] == key:
        return remembered[1]
    fingerprint = _hash_parameters(module)
    _REMEMBERED[module] = (key, fingerprint)
    return fingerprint


def _hash_parameters(module: nn.Module) -> str:
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, param in module.named_parameters():
            bits = param.detach().to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0x7FFF
            digest.update(f"{name}:{tuple(param.shape)}:{int(bits.sum(dtype=torch.int64))};".encode())
    return digest.hexdigest()[:16]


class FeatureRecorder:
    """Records one module's output per denoising step while calibration generations run.

    Calls inside one step (CFG halves run separately, several batches) are concatenated along the
    batch axis, so a step's tensor covers everything the sampler evaluated at that noise level.
    """

    def __init__(self, root: nn.Module, feature_module: nn.Module, read_level: LevelReader) -> None:
        self._clock = StepClock()
        self._steps: list[list[torch.Tensor]] = []
        self._handles = [
            root.register_forward_pre_hook(lambda _m, a, k: self._tick(read_level(a, k)), with_kwargs=True),
            feature_module.register_forward_hook(lambda _m, _a, out: self._record(out)),
        ]
        self._step = -1

    def _tick(self, level: float) -> None:
        self._step = self._clock.tick(level).step

    def _record(self, out: Any) -> None:
        tensor = out[0] if isinstance(out, tuple) else out
        while len(self._steps) <= self._step:
            self._steps.append([])
        self._steps[self._step].append(tensor.detach().float().clone())

    def take_run(self) -> list[torch.Tensor]:
        """The finished generation's features, one [N, C, ...] tensor per step; the recorder restarts."""
        run = [torch.cat(chunks) for chunks in self._steps]
        self._steps = []
        self._clock.begin(None)
        self._step = -1
        return run

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


@dataclass
class PairStats:
    """Sums over calibration runs for every step pair i < j (x = features of step i, y = of step j)."""

    steps: int
    sq_err: torch.Tensor = field(init=False)  # [T, T] Σ (y - x)^2
    sq_ref: torch.Tensor = field(init=False)  # [T, T] Σ y^2
    channel: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)  # (i, j) -> [6, C] sums
    gram: torch.Tensor = field(init=False)  # [T, T] Σ ⟨x_i, x_j⟩ for every pair, the diagonal included
    runs: int = 0

    def __post_init__(self) -> None:
        self.sq_err = torch.zeros(self.steps, self.steps, dtype=torch.float64)
        self.sq_ref = torch.zeros(self.steps, self.steps, dtype=torch.float64)
        self.gram = torch.zeros(self.steps, self.steps, dtype=torch.float64)

    def add_run(self, features: Sequence[torch.Tensor]) -> None:
        if len(features) != self.steps:
            raise ValueError(f"calibration run has {len(features)} steps, expected {self.steps} "
                             "(every calibration run must use the same number of steps)")
        flat = [_channels_first_flat(f) for f in features]  # [C, N] per step
        for i in range(self.steps):
            x = flat[i]
            self.gram[i, i] += float((x * x).sum())
            for j in range(i + 1, self.steps):
                y = flat[j]
                if y.shape != x.shape:
                    raise ValueError(f"features of steps {i} and {j} differ in shape: "
                                     f"{tuple(x.shape)} vs {tuple(y.shape)}")
                self.sq_err[i, j] += float(((y - x) ** 2).sum())
                dot = float((x * y).sum())
                self.gram[i, j] += dot
                self.gram[j, i] += dot
                self.sq_ref[i, j] += float((y**2).sum())
                sums = torch.stack([torch.full((x.shape[0],), float(x.shape[1]), dtype=torch.float64), x.sum(1),
                                    y.sum(1), (x * x).sum(1), (x * y).sum(1), (y * y).sum(1)])
                self.channel[(i, j)] = self.channel.get((i, j), 0) + sums
        self.runs += 1

    def errors(self) -> torch.Tensor:
        """errors[i, j]: relative squared error of reusing step i's features at step j (0 on/below the diagonal)."""
        if not self.runs:
            raise ValueError("no calibration runs recorded")
        return torch.where(self.sq_ref > 0, self.sq_err / self.sq_ref.clamp_min(1e-30), torch.zeros(()))


def _channels_first_flat(feature: torch.Tensor) -> torch.Tensor:
    """[N, C, ...] -> [C, N·rest] in float64: channel statistics are sums over batch and space."""
    if feature.ndim < 2:
        raise ValueError(f"features must be at least [N, C], got shape {tuple(feature.shape)}")
    return feature.double().transpose(0, 1).reshape(feature.shape[1], -1)


def reuse_segments(errors: torch.Tensor) -> torch.Tensor:
    """Segment costs of the feature objective: seg[i, j] = Σ_{k=i+1..j} errors[i, k] (0 on/below the diagonal)."""
    cumulative = torch.cumsum(errors.double().triu(1), dim=1)
    return (cumulative - torch.diagonal(cumulative).unsqueeze(1)).triu(1)


def segments_cost(segments: torch.Tensor, schedule: Schedule) -> float:
    """Total cost of `schedule`: each full step pays for the cached steps that follow it."""
    steps = segments.shape[0]
    if len(schedule) != steps or not schedule[0]:
        raise ValueError(f"schedule must have {steps} steps and start with a full step")
    starts = [k for k, full in enumerate(schedule) if full] + [steps]
    return sum(float(segments[i, nxt - 1]) for i, nxt in zip(starts, starts[1:], strict=False) if nxt - 1 > i)


def schedule_cost(errors: torch.Tensor, schedule: Schedule) -> float:
    """Total feature reuse error of `schedule`: each cached step pays errors[last full step, this step]."""
    return segments_cost(reuse_segments(errors), schedule)


def dp_segments(segments: torch.Tensor, full_steps: int) -> Schedule:
    """The `full_steps` full steps (step 0 included) that minimise `segments_cost` — O(K·T²).

    Unmeasured segments are `inf` (never chosen while a finite schedule exists).
    """
    steps = segments.shape[0]
    if not 1 <= full_steps <= steps:
        raise ValueError(f"full_steps must be in [1, {steps}], got {full_steps}")
    seg = segments.double()
    inf = math.inf
    # best[k][j]: min cost covering steps 0..j with k full steps, the last segment ending at j
    best = [[inf] * steps for _ in range(full_steps + 1)]
    choice = [[-1] * steps for _ in range(full_steps + 1)]
    for j in range(steps):
        best[1][j] = float(seg[0, j]) if j else 0.0
    for k in range(2, full_steps + 1):
        for j in range(k - 1, steps):
            for i in range(k - 1, j + 1):  # the k-th full step sits at i, serving i..j
                cost = best[k - 1][i - 1] + (float(seg[i, j]) if j > i else 0.0)
                if cost < best[k][j]:
                    best[k][j], choice[k][j] = cost, i
    if math.isinf(best[full_steps][steps - 1]):
        raise ValueError(f"no schedule with {full_steps} full steps uses only measured segments: "
                         "calibrate with longer segments or more full steps")
    full = [False] * steps
    j, k = steps - 1, full_steps
    while k > 1:
        i = choice[k][j]
        full[i] = True
        j, k = i - 1, k - 1
    full[0] = True
    return tuple(full)


def dp_schedule(errors: torch.Tensor, full_steps: int) -> Schedule:
    """The DP schedule for the feature objective (`errors[i, j]`: reusing step i's features at step j)."""
    return dp_segments(reuse_segments(errors), full_steps)


def max_segment(steps: int, full_steps: int) -> int:
    """The longest segment the output objective measures: 2·ceil(T/K) cached steps (at most T − 1)."""
    return min(steps - 1, 2 * math.ceil(steps / full_steps))


def segment_schedule(steps: int, start: int, end: int) -> Schedule:
    """Every step full except start+1..end, which reuse step `start`'s features."""
    return tuple(not start < k <= end for k in range(steps))


def measure_segments(generate: Callable[[Schedule | None], torch.Tensor], steps: int, longest: int,
                     desc: str = "measuring cache segments", progress: Progress | None = None) -> torch.Tensor:
    """The output objective: seg[i, j] = ‖out(segment i..j cached) − out(uncached)‖² / ‖out(uncached)‖².

    `generate(schedule)` runs one calibration generation with that schedule (None: uncached) and
    returns its output; segments longer than `longest` cached steps stay `inf` (not measured).
    `progress` (default: a console bar) counts the generations and may stop the measurement
    between any two of them; a stop raises, so no partly measured matrix is ever returned.
    """
    if steps < 2 or longest < 1:
        raise ValueError(f"segments need at least 2 steps and a length >= 1, got {steps} steps, {longest}")
    reference = generate(None).double()
    power = float((reference**2).sum()) or 1.0
    segments = torch.full((steps, steps), math.inf, dtype=torch.float64).triu(1)
    pairs = [(i, j) for i in range(steps - 1) for j in range(i + 1, min(steps, i + longest + 1))]
    for i, j in (progress or Progress()).loop(pairs, desc, "gen"):
        out = generate(segment_schedule(steps, i, j)).double()
        segments[i, j] = float(((out - reference) ** 2).sum()) / power
    return segments


def uniform_with(steps: int, full_steps: int) -> Schedule:
    """The uniform schedule with exactly `full_steps` full steps (the baseline a DP schedule must beat)."""
    for interval in range(1, steps + 1):
        schedule = uniform_schedule(steps, interval)
        if count_full(schedule) == full_steps:
            return schedule
    # no interval gives that count exactly: spread the full steps evenly
    picks = {round(i * steps / full_steps) for i in range(full_steps)}
    return tuple(k in picks for k in range(steps))


@dataclass(frozen=True)
class CalibratedSchedule:
    """The saved artefact: which steps run the whole network, for which model, steps and sampler."""

    fingerprint: str
    model: str
    steps: int
    scheduler: str
    full_steps: Schedule
    errors: tuple[tuple[float, ...], ...]  # the feature reuse error matrix (row i: reusing step i at step j)
    uniform_cost: float  # the objective's cost of the uniform schedule with the same K
    cost: float  # and of this schedule
    calibration: dict[str, Any] = field(default_factory=dict)  # prompts, seeds, guidance: how it was measured
    objective: str = "feature"  # what the DP minimised: "feature" reuse error or measured "output" error
    segments: tuple[tuple[float, ...], ...] | None = None  # "output": measured segment costs (inf: not measured)
    # the block cache's fitted forecast for these full steps (`block_cache.fit_forecast` on the calibration's
    # Gram matrix): per step, the weights of the last full steps' features; None in files written before it
    forecast: tuple[tuple[float, ...], ...] | None = None

    @property
    def k(self) -> int:
        return count_full(self.full_steps)

    def describe(self) -> str:
        gain = "" if self.uniform_cost == 0 else f", {self.cost / self.uniform_cost:.0%} of uniform's"
        return (f"{format_schedule(self.full_steps)} ({self.k}/{self.steps} full steps, {self.scheduler}, "
                f"model {self.model} #{self.fingerprint}; calibrated {self.objective} error {self.cost:.4g}{gain})")

    def check(self, fingerprint: str, steps: int | None = None, scheduler: str | None = None) -> None:
        """Refuse to serve a model, step count or scheduler this schedule was not calibrated for."""
        if fingerprint != self.fingerprint:
            raise ValueError(f"this cache schedule was calibrated for model {self.model} (#{self.fingerprint}), "
                             f"not this model (#{fingerprint}): calibrate it for this model")
        if steps is not None and steps != self.steps:
            raise ValueError(f"this cache schedule is for {self.steps} steps, the sampler runs {steps}: "
                             f"calibrate again for {steps} steps")
        if scheduler is not None and scheduler != self.scheduler:
            raise ValueError(f"this cache schedule was calibrated with the {self.scheduler} scheduler, "
                             f"the sampler uses {scheduler}")

    def to_json(self) -> str:
        data = {"format": SCHEDULE_FORMAT, **asdict(self), "schedule": format_schedule(self.full_steps)}
        data["full_steps"] = [int(x) for x in self.full_steps]
        if self.segments is not None:  # JSON has no infinity: unmeasured segments are null
            data["segments"] = [[None if math.isinf(v) else v for v in row] for row in self.segments]
        return json.dumps(data, indent=1) + "\n"

    def save(self, path: str | Path) -> Path:
        """Write the schedule whole as a new file and return where it went; nothing is ever overwritten.

        The same schedule already at `path` (a re-run of the same calibration) is kept as it is; any
        other file there keeps its content, and this schedule goes beside it as `<stem>_NNNNN.json`.
        """
        path = Path(path)
        text = self.to_json()
        try:
            return write_new(path, text_writer(text))
        except FileExistsError:
            if path.is_file() and path.read_bytes() == text.encode("utf-8"):
                return path
            return write_numbered(path.parent, path.stem, path.suffix, text_writer(text))

    @classmethod
    def load(cls, path: str | Path) -> CalibratedSchedule:
        """Read and validate a schedule file; anything off raises a ValueError naming the file and field."""
        path = Path(path)
        try:
            size = path.stat().st_size
            if size > MAX_SCHEDULE_BYTES:
                raise ValueError(f"{path}: {size} bytes is too large for a cache schedule "
                                 f"(at most {MAX_SCHEDULE_BYTES})")
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as err:
            raise ValueError(f"{path}: no such cache schedule file") from err
        except RecursionError:
            raise ValueError(f"{path}: not a cache schedule (JSON nested too deeply)") from None
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not a cache schedule (not UTF-8 text: {err})") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not a cache schedule (invalid JSON: {err})") from err
        except OSError as err:
            raise ValueError(f"{path}: cannot read the cache schedule ({err.strerror or err})") from None
        if not isinstance(data, dict) or data.get("format") != SCHEDULE_FORMAT:
            raise ValueError(f"{path}: not a cache schedule (expected format {SCHEDULE_FORMAT!r})")
        try:
            return _schedule_from(data)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None


MAX_SCHEDULE_BYTES = 8 << 20  # a 200-step schedule with both matrices is under 2 MB
MAX_STEPS = 1000
MAX_TEXT = 1000  # fingerprint, model, scheduler: short names


def _schedule_from(data: dict[str, Any]) -> CalibratedSchedule:
    """The schedule a parsed file describes, every field checked against what `to_json` writes."""
    for name in ("fingerprint", "model", "steps", "scheduler", "full_steps", "errors", "uniform_cost", "cost"):
        if name not in data:
            raise ValueError(f"cache schedule has no '{name}' field")
    steps = data["steps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"field 'steps' must be a whole number of steps in 1..{MAX_STEPS}, got {_short(steps)}")
    text = {name: _text(data, name) for name in ("fingerprint", "model", "scheduler")}
    flags = data["full_steps"]
    if not isinstance(flags, list) or len(flags) != steps:
        raise ValueError(f"field 'full_steps' must be a list of {steps} flags (one per step), got {_short(flags)}")
    for k, flag in enumerate(flags):
        if flag not in (0, 1) or isinstance(flag, float):  # true/false or 0/1 (what to_json writes)
            raise ValueError(f"field 'full_steps'[{k}] must be true/false or 1/0, got {_short(flag)}")
    if not flags[0]:
        raise ValueError("field 'full_steps': step 0 must be a full step (the first flag is false)")
    errors = _matrix(data["errors"], "errors", steps, allow_null=False)
    segments = data.get("segments")
    if segments is not None:
        segments = _matrix(segments, "segments", steps, allow_null=True)  # null: a segment not measured
    objective = data.get("objective", "feature")
    if objective not in ("feature", "output"):
        raise ValueError(f"field 'objective' must be 'feature' or 'output', got {_short(objective)}")
    calibration = data.get("calibration", {})
    if not isinstance(calibration, dict):
        raise ValueError(f"field 'calibration' must be an object, got {_short(calibration)}")
    full = tuple(bool(f) for f in flags)
    forecast = data.get("forecast")
    if forecast is not None:
        if not isinstance(forecast, list) or not all(isinstance(row, list) for row in forecast):
            raise ValueError(f"field 'forecast' must be a list of {steps} lists of weights, got {_short(forecast)}")
        forecast = tuple(tuple(float(v) if isinstance(v, int | float) and not isinstance(v, bool) else v for v in row)
                         for row in forecast)
        try:
            check_weights(forecast, full)
        except ValueError as err:
            raise ValueError(f"field 'forecast': {err}") from None
    return CalibratedSchedule(text["fingerprint"], text["model"], steps, text["scheduler"], full, errors,
                              _cost(data, "uniform_cost"), _cost(data, "cost"), dict(calibration), objective,
                              segments, forecast)


def _short(value: Any) -> str:
    if isinstance(value, (list, dict)):
        return f"{'a list' if isinstance(value, list) else 'an object'} of {len(value)} item(s)"
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:60]}… ({len(text)} characters)"


def _text(data: dict[str, Any], name: str) -> str:
    value = data[name]
    if not isinstance(value, str) or not 0 < len(value) <= MAX_TEXT:
        raise ValueError(f"field '{name}' must be a non-empty string of at most {MAX_TEXT} characters, "
                         f"got {_short(value)}")
    return value


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def _cost(data: dict[str, Any], name: str) -> float:
    """A schedule's cost: a number >= 0, infinite only when it uses an unmeasured segment (never NaN)."""
    value = data[name]
    if not (_number(value) or value == math.inf):
        raise ValueError(f"field '{name}' must be a number >= 0, got {_short(value)}")
    return float(value)


def _matrix(value: Any, name: str, steps: int, allow_null: bool) -> tuple[tuple[float, ...], ...]:
    """A steps × steps matrix of finite numbers >= 0 (null -> inf where `allow_null`)."""
    if not isinstance(value, list) or len(value) != steps or not all(
            isinstance(row, list) and len(row) == steps for row in value):
        rows = len(value) if isinstance(value, list) else None
        cols = len(value[0]) if rows and isinstance(value[0], list) else None
        got = f"{rows}×{cols}" if rows and cols is not None else _short(value)
        raise ValueError(f"field '{name}' must be a {steps}×{steps} matrix (one row per step), got {got}")
    out = []
    for i, row in enumerate(value):
        for j, v in enumerate(row):
            if not (_number(v) or allow_null and v is None):
                raise ValueError(f"field '{name}'[{i}][{j}] must be a finite number >= 0"
                                 f"{' or null' if allow_null else ''}, got {_short(v)}")
        out.append(tuple(math.inf if v is None else float(v) for v in row))
    return tuple(out)


def calibrated_schedule(stats: PairStats, full_steps: int, fingerprint: str, model: str, scheduler: str,
                        calibration: dict[str, Any] | None = None,
                        segments: torch.Tensor | None = None) -> CalibratedSchedule:
    """Choose the DP schedule and wrap it as the saved artefact.

    With measured `segments` (`measure_segments`) the DP minimises the output objective; otherwise
    the feature reuse error from `stats`.
    """
    errors = torch.round(stats.errors() * 1e6) / 1e6  # 6 decimals: a small, readable file that reloads exactly
    uniform = uniform_with(stats.steps, full_steps)
    objective, kept = "feature", None
    if segments is None:
        segments = reuse_segments(errors)
    else:
        if segments.shape != (stats.steps, stats.steps):
            raise ValueError(f"segment costs are {tuple(segments.shape)}, expected {stats.steps}×{stats.steps}")
        objective, kept = "output", tuple(tuple(float(v) for v in row) for row in segments)
    chosen = dp_segments(segments, full_steps)
    return CalibratedSchedule(fingerprint, model, stats.steps, scheduler, chosen,
                              tuple(tuple(float(v) for v in row) for row in errors),
                              segments_cost(segments, uniform), segments_cost(segments, chosen),
                              dict(calibration or {}), objective, kept, fit_forecast(stats.gram, chosen))


@dataclass(frozen=True)
class CacheCorrection:
    """Per-channel affine corrections of reused features, one per cached step: fresh ≈ scale·cached + shift."""

    scale: dict[int, torch.Tensor]  # step -> [C]
    shift: dict[int, torch.Tensor]
    error_before: float  # relative squared error on the calibration data, summed over cached steps
    error_after: float

    def apply(self, step: int, cached: Any) -> Any:
        """The corrected feature for `step` (unchanged where no correction was calibrated).

        Blocks return a tensor or a tuple whose first item is the features (diffusers' transformer
        blocks with `return_dict=False`); the tuple's other items pass through.
        """
        if step not in self.scale:
            return cached
        if isinstance(cached, tuple):
            return (self.apply(step, cached[0]), *cached[1:])
        view = (1, -1) + (1,) * (cached.ndim - 2)
        scale = self.scale[step].to(cached.dtype).view(view)
        return cached * scale + self.shift[step].to(cached.dtype).view(view)


def cache_correction(stats: PairStats, schedule: Schedule) -> CacheCorrection:
    """Least-squares per-channel scale and shift for every cached step of `schedule`."""
    if len(schedule) != stats.steps:
        raise ValueError(f"schedule has {len(schedule)} steps, calibration {stats.steps}")
    scale: dict[int, torch.Tensor] = {}
    shift: dict[int, torch.Tensor] = {}
    before = after = 0.0
    source = 0
    for j, full in enumerate(schedule):
        if full:
            source = j
            continue
        n, sx, sy, sxx, sxy, syy = stats.channel[(source, j)]
        a, b = fit_affine(n, sx, sy, sxx, sxy)
        ref = float(syy.sum())
        before += float((syy - 2 * sxy + sxx).sum()) / max(ref, 1e-30)
        after += float(affine_residual(n, sx, sy, sxx, sxy, syy, a, b).sum()) / max(ref, 1e-30)
        scale[j], shift[j] = a.float(), b.float()
    return CacheCorrection(scale, shift, before, after)


def fit_affine(n: torch.Tensor, sx: torch.Tensor, sy: torch.Tensor, sxx: torch.Tensor,
               sxy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel least squares y ≈ a·x + b from sums; a channel with (near) constant x keeps a = 1."""
    var = n * sxx - sx * sx
    cov = n * sxy - sx * sy
    degenerate = var <= 1e-12 * (n * sxx).clamp_min(1e-30)
    a = torch.where(degenerate, torch.ones_like(var), cov / torch.where(degenerate, torch.ones_like(var), var))
    b = (sy - a * sx) / n
    return a, b


def affine_residual(n, sx, sy, sxx, sxy, syy, a, b) -> torch.Tensor:
    """Σ (y − a·x − b)² per channel, from the same sums (no data kept)."""
    return (syy + a * a * sxx + n * b * b - 2 * a * sxy - 2 * b * sy + 2 * a * b * sx).clamp_min(0)
