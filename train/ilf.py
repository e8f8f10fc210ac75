"""Training an ILF feedback module without a data set: distillation from the frozen backbone's own trajectories.

The teacher is the backbone itself, sampling uncached from seeds and class labels (or prompts) only.
Every model call of those generations is recorded — its inputs, its output, and the feature the
module's corrected one stands for (`FeedbackPoint.teacher_feature`: a U-Net's last deep module's
output, a DiT span's last block's output). A training example is a pair of calls of
one generation, `gap` steps apart (1 ≤ gap < the cache interval the module is trained for): the
model with ILF applied runs the earlier call fully, then the later one as a cached step, where the
module corrects the reused feature. Trained for the block cache's forecast mode (DiTs), the earlier
full calls are as many as the forecast needs, one cache interval apart (as a sampler with that
interval runs them), and the module corrects the forecast feature. Two losses, each relative to the teacher's magnitude:
- feature: the corrected feature against the teacher's feature at the later step;
- output: the model's output at the later step against the teacher's output there.

That is the "pairs" objective: every cached step starts from the teacher's exact inputs. At inference
it does not — after a few cached steps the sample has drifted from the teacher's, and the full steps
the module rides on were computed on that drifted sample. The "rollout" objective trains on what
inference does: a training example is a whole generation of one seed sampled with ILF at the inference
schedule (every `interval`-th step full), gradients through every step, so the module learns from the
inputs its own corrections produce; the losses compare the final sample, every call's output and every
corrected feature with the teacher's generation of the same seed (each relative to the teacher's magnitude).
Only the module's parameters get gradients; the backbone is frozen.

Seeded and reproducible (the teacher's seeds, the pairs' order and the initial module come from
`seed`); a checkpoint (module, optimizer, generator state, as safetensors) is written atomically
every `checkpoint_every` steps and resumed from when it matches the run's settings and backbone.
Held-out generations (seeds the module never saw) measure the distillation loss of the trained
module against the plain reuse it corrects (the same loss with the module's scale at 0): the pair loss
whatever the objective, and for rollouts also the rollout loss.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save
from torch import nn

from ..accel.cache_schedule import model_fingerprint
from ..accel.ilf import ILF, FeedbackWeights, ILFConfig, read_tensors
from ..accel.progress import Progress, as_progress
from ..accel.site import Site
from ..accel.techniques import REGISTRY
from ..files import write_replacing
from .threads import torch_threads

CHECKPOINT_FORMAT = "livecache.ilf_checkpoint/1"


@dataclass(frozen=True)
class ILFTraining:
    """How a module is trained; every field is saved with it (and a checkpoint resumes only the same run)."""

    steps: int = 300  # optimizer steps
    interval: int = 2  # the cache interval it is trained for: gaps 1 .. interval-1
    generations: int = 6  # teacher generations (one batch each) to train on
    held_out: int = 2  # further generations, other seeds, to measure it on
    lr: float = 2e-3
    feature_weight: float = 1.0
    output_weight: float = 1.0
    seed: int = 0
    checkpoint_every: int = 50
    mode: str = "reuse"  # what the module corrects: plain reuse, or (DiT span) the block cache's forecast
    order: int = 1  # the forecast's order
    # "pairs": one cached step after exact full ones (the teacher's own inputs); "rollout": whole generations
    # sampled with ILF at the inference schedule (every `interval`-th step full), the module's own errors
    # feeding its later inputs, the losses against the teacher's generation of the same seed
    objective: str = "pairs"
    sample_weight: float = 1.0  # rollout: the final sample against the teacher's

    def __post_init__(self) -> None:
        for name in ("steps", "interval", "generations", "held_out", "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.interval < 2:
            raise ValueError("interval must be >= 2: with every step full the module never runs")
        if not self.lr > 0 or min(self.feature_weight, self.output_weight, self.sample_weight) < 0:
            raise ValueError("lr must be > 0 and the loss weights >= 0")
        if self.objective not in ("pairs", "rollout"):
            raise ValueError(f"objective must be 'pairs' or 'rollout', got {self.objective!r}")
        self.cache_config()  # the mode's and order's checks

    def cache_config(self) -> ILFConfig:
        """The ILF the trainer applies: for pairs the first `history` calls after a reset full, the next one
        cached; for rollouts the schedule a sampler with this interval runs."""
        if self.objective == "rollout":
            return ILFConfig(self.interval, mode=self.mode, order=self.order)  # type: ignore[arg-type]
        full = (True,) * self.history + (False,)
        return ILFConfig(schedule="calibrated", full_steps_override=full, mode=self.mode,  # type: ignore[arg-type]
                         order=self.order)

    @property
    def history(self) -> int:
        """Full calls before a cached one: 1 for reuse, the forecast's order + 1."""
        return 1 if self.mode == "reuse" else self.order + 1


@dataclass(frozen=True)
class Teacher:
    """The frozen backbone as the trainer sees it: its site, its name, and one generation per seed
    (`generate(seed)` samples a batch whose noise and labels come from `seed` alone and returns the final
    sample; with ILF applied it is the accelerated generation a rollout trains on)."""

    site: Site
    model: str
    generate: Callable[[int], Any]
    # the backbone's blocks add to their inputs in place (ComfyUI's Flux: `x += ...`), so a tensor autograd saved
    # for the backward pass changes under it: the trainer then has autograd save copies
    in_place: bool = False
    # the site the module is trained on, made once the generations are recorded (None: `site`): the same weights
    # in tensors autograd may use, for a host whose weights were made under inference mode (ComfyUI's executor)
    student: Callable[[], Site] | None = None


@dataclass
class Call:
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: torch.Tensor
    feature: torch.Tensor


def output_tensor(out: Any) -> torch.Tensor:
    """The tensor a diffusers model call returns (`.sample`, or the first entry of its tuple)."""
    return out if isinstance(out, torch.Tensor) else out[0]


def _detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, tuple | list):
        return type(value)(_detached(v) for v in value)
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value


def record(teacher: Teacher, seeds: list[int], where: dict[str, Any] | None,
           progress: Progress | bool = False) -> list[list[Call]]:
    """The teacher's model calls for each seed's generation (uncached), with the feature ILF corrects."""
    point = teacher.site.feedback_point(where)
    target, target_stream = point.teacher_feature()
    runs: list[list[Call]] = []
    pending: list[tuple[Any, Any]] = []
    features: list[torch.Tensor] = []
    hooks = [teacher.site.root.register_forward_pre_hook(
                 lambda _m, a, k: pending.append((_detached(a), _detached(k))), with_kwargs=True),
             teacher.site.root.register_forward_hook(
                 lambda _m, _a, out: runs[-1].append(Call(*pending.pop(), output_tensor(out).detach().clone(),
                                                          features.pop()))),
             target.register_forward_hook(lambda _m, _a, out: features.append(target_stream(out).detach()))]
    try:
        for seed in as_progress(progress).loop(seeds, "teacher generations", "generation"):
            runs.append([])
            with torch.no_grad():
                teacher.generate(seed)
    finally:
        for hook in hooks:
            hook.remove()
    return runs


def _relative(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.float() - b.float()).pow(2).mean() / b.float().pow(2).mean().clamp_min(1e-12)


def pair_loss(core: ILF, root: nn.Module, firsts: list[Call], later: Call, settings: ILFTraining) -> torch.Tensor:
    """Run `firsts` fully, `later` as a cached step corrected by the module: the weighted distillation loss."""
    core.reset()
    with torch.no_grad():
        for first in firsts:
            root(*first.args, **first.kwargs)
    out = output_tensor(root(*later.args, **later.kwargs))
    if core.prediction is None:
        raise RuntimeError("the later call was not a cached step: the feedback module never ran")
    return (settings.output_weight * _relative(out, later.output)
            + settings.feature_weight * _relative(core.prediction, later.feature))


def rollout_loss(core: ILF, teacher: Teacher, seed: int, run: list[Call], sample: torch.Tensor,
                 settings: ILFTraining) -> torch.Tensor:
    """Sample `seed`'s generation with ILF at the inference schedule: the weighted distillation loss of its final
    sample, of every call's output and of every corrected feature against the teacher's generation `run`."""
    outputs: list[torch.Tensor] = []
    predictions: list[tuple[int, torch.Tensor]] = []
    before = [0]

    def count(*_: Any) -> None:
        before[0] = core.feedback_calls

    def keep(_m: nn.Module, _a: Any, out: Any) -> None:
        if core.feedback_calls > before[0] and core.prediction is not None:
            predictions.append((len(outputs), core.prediction))
        outputs.append(output_tensor(out))

    root = teacher.site.root
    hooks = [root.register_forward_pre_hook(count), root.register_forward_hook(keep)]
    core.reset()
    try:
        final = teacher.generate(seed)
    finally:
        for hook in hooks:
            hook.remove()
    if len(outputs) != len(run) or not predictions:
        raise RuntimeError(f"the rollout made {len(outputs)} model calls ({len(predictions)} corrected) where the "
                           f"teacher made {len(run)}: the feedback module never ran or the sampler differs")
    value = settings.sample_weight * _relative(final, sample)
    calls = sum(_relative(o, c.output) for o, c in zip(outputs, run, strict=True)) / len(run)
    features = sum(_relative(p, run[i].feature) for i, p in predictions) / len(predictions)
    return value + settings.output_weight * calls + settings.feature_weight * features


def pairs_of(runs: list[list[Call]], settings: ILFTraining) -> list[tuple[int, int, int]]:
    """Every (generation, last full call, later call) at a gap 1 .. interval-1, with the `history - 1` full
    calls before the last one interval apart inside the generation."""
    first = settings.interval * (settings.history - 1)
    return [(g, i, i + gap) for g, run in enumerate(runs) for gap in range(1, settings.interval)
            for i in range(first, len(run) - gap)]


def fulls(run: list[Call], last: int, settings: ILFTraining) -> list[Call]:
    """The full calls a cached call after `last` rides on, oldest first."""
    return [run[last - k * settings.interval] for k in range(settings.history - 1, -1, -1)]


@torch.no_grad()
def held_out_losses(core: ILF, root: nn.Module, runs: list[list[Call]], settings: ILFTraining) -> dict[str, float]:
    """The mean distillation loss over every held-out pair: with the module, and without it (scale 0: the plain
    reuse or forecast it corrects, at the same step gaps)."""
    pairs = pairs_of(runs, settings)
    trained = sum(float(pair_loss(core, root, fulls(runs[g], i, settings), runs[g][j], settings))
                  for g, i, j in pairs)
    scale = core.module.scale.detach().clone()
    core.module.scale.zero_()
    try:
        reuse = sum(float(pair_loss(core, root, fulls(runs[g], i, settings), runs[g][j], settings))
                    for g, i, j in pairs)
    finally:
        core.module.scale.copy_(scale)
    return {"ilf": trained / len(pairs), "reuse": reuse / len(pairs)}


@torch.no_grad()
def held_out_rollouts(core: ILF, teacher: Teacher, seeds: list[int], runs: list[list[Call]],
                      samples: list[torch.Tensor], settings: ILFTraining) -> dict[str, float]:
    """The mean rollout loss over the held-out generations: with the module, and without it (scale 0)."""
    def mean() -> float:
        return sum(float(rollout_loss(core, teacher, s, r, x, settings))
                   for s, r, x in zip(seeds, runs, samples, strict=True)) / len(seeds)

    trained = mean()
    scale = core.module.scale.detach().clone()
    core.module.scale.zero_()
    try:
        plain = mean()
    finally:
        core.module.scale.copy_(scale)
    return {"ilf": trained, "reuse": plain}


def train_ilf(teacher: Teacher, out: Path | None, settings: ILFTraining = ILFTraining(),
              where: dict[str, Any] | None = None, checkpoint: Path | None = None,
              progress: Progress | bool = True, replace: bool = False) -> FeedbackWeights:
    """Train a module for `teacher`'s backbone; write it to `out` (safetensors) when given and return it.

    `checkpoint`: where to keep (and resume) the run's state; `replace`: overwrite `out` (the shipped files),
    otherwise an existing `out` is refused before any work.
    """
    if out is not None and out.exists() and not replace:
        raise FileExistsError(f"{out} exists; choose another --out (a trained module is never written over)")
    with torch_threads(1):  # the teacher's sampling and the module's steps are small ops: ~10× faster here
        result = _train(teacher, settings, where, checkpoint, progress)
    if out is not None:
        result.save(out, replace=replace)
    return result


def _train(teacher: Teacher, settings: ILFTraining, where: dict[str, Any] | None, checkpoint: Path | None,
           progress: Progress | bool) -> FeedbackWeights:
    start = time.perf_counter()
    torch.manual_seed(settings.seed)
    train_seeds = [settings.seed * 1000 + k for k in range(settings.generations)]
    test_seeds = [settings.seed * 1000 + settings.generations + k for k in range(settings.held_out)]
    runs = record(teacher, train_seeds + test_seeds, where, progress)
    samples = teacher_samples(teacher, train_seeds + test_seeds) if settings.objective == "rollout" else []
    runs, held = runs[:settings.generations], runs[settings.generations:]
    site = teacher.site if teacher.student is None else teacher.student()
    root = site.root
    fingerprint = model_fingerprint(root)
    frozen = [p for p in root.parameters() if p.requires_grad]  # only these change (and change back)
    handle = REGISTRY.apply(site, [replace(settings.cache_config(), where=where)])[0]
    try:
        for p in frozen:
            _set_requires_grad(p, False)
        core: ILF = handle.core
        if settings.objective == "rollout":
            choices = [(train_seeds[g], runs[g], samples[g]) for g in range(settings.generations)]
            last = _fit(core, len(choices), lambda k: rollout_loss(core, teacher, *choices[k], settings),
                        settings, fingerprint, checkpoint, progress, teacher.in_place)
            rollouts = held_out_rollouts(core, teacher, test_seeds, held, samples[settings.generations:], settings)
        else:
            pairs = pairs_of(runs, settings)
            if not pairs:
                raise ValueError(f"the teacher's generations are too short for interval {settings.interval} with "
                                 f"{settings.history} full calls before a cached one")
            last = _fit(core, len(pairs), lambda k: pair_loss(core, root, fulls(runs[pairs[k][0]], pairs[k][1],
                                                                                settings),
                                                              runs[pairs[k][0]][pairs[k][2]], settings),
                        settings, fingerprint, checkpoint, progress, teacher.in_place)
        result = FeedbackWeights.of(core.module, fingerprint, teacher.model, core.point.where)
    finally:
        handle.remove()
    # the pair loss on held-out seeds (one cached step after exact full ones), whatever the module was trained on
    pairs_settings = replace(settings, objective="pairs")
    handle = REGISTRY.apply(site, [replace(pairs_settings.cache_config(), module=result)])[0]
    try:
        losses = held_out_losses(handle.core, root, held, pairs_settings)
    finally:
        handle.remove()
        for p in frozen:
            _set_requires_grad(p, True)
    training = {**asdict(settings), "seconds": round(time.perf_counter() - start, 1), "held_out_loss": losses,
                "train_seeds": train_seeds, "held_out_seeds": test_seeds, "last_loss": last}
    if settings.objective == "rollout":
        training["held_out_rollout_loss"] = rollouts
    return FeedbackWeights.of(handle.core.module, fingerprint, teacher.model, result.where, training)


@torch.no_grad()
def teacher_samples(teacher: Teacher, seeds: list[int]) -> list[torch.Tensor]:
    """The teacher's final sample of each seed's generation (uncached): what a rollout's sample is held to."""
    return [teacher.generate(seed).detach().clone() for seed in seeds]


def _set_requires_grad(param: nn.Parameter, flag: bool) -> None:
    """Set a backbone parameter's flag; one made under inference mode (a host that loads models in it, as ComfyUI's
    executor does) only takes the change inside it."""
    with torch.inference_mode(param.is_inference()):
        param.requires_grad_(flag)


def _fit(core: ILF, choices: int, loss_of: Callable[[int], torch.Tensor], settings: ILFTraining,
         fingerprint: str, checkpoint: Path | None, progress: Progress | bool, in_place: bool = False) -> float:
    """The optimisation loop over `choices` training examples (`loss_of(k)`: the k-th one's loss, drawn by the
    run's generator), resuming from `checkpoint` when it holds this run; returns the last loss.
    `in_place`: autograd keeps copies of what it saves (`Teacher.in_place`)."""
    module = core.module.requires_grad_(True)
    optimizer = torch.optim.Adam(module.parameters(), lr=settings.lr)
    generator = torch.Generator().manual_seed(settings.seed)
    tag = json.dumps({**asdict(settings), "fingerprint": fingerprint, "where": core.point.where}, sort_keys=True)
    done = _resume(checkpoint, tag, module, optimizer, generator)
    loss = float("nan")
    for step in as_progress(progress).loop(range(done, settings.steps), "train ILF module", "step"):
        k = int(torch.randint(choices, (1,), generator=generator))
        saving = torch.autograd.graph.saved_tensors_hooks(torch.clone, _unpacked) if in_place else nullcontext()
        with torch.enable_grad(), saving:
            value = loss_of(k)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
        optimizer.step()
        loss = value.item()
        if checkpoint is not None and ((step + 1) % settings.checkpoint_every == 0 or step + 1 == settings.steps):
            _save_checkpoint(checkpoint, tag, step + 1, module, optimizer, generator)
    return loss


def _unpacked(saved: torch.Tensor) -> torch.Tensor:
    return saved


def _save_checkpoint(path: Path, tag: str, step: int, module: nn.Module, optimizer: torch.optim.Optimizer,
                     generator: torch.Generator) -> None:
    tensors = {f"module.{k}": v.detach().contiguous().clone() for k, v in module.state_dict().items()}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value).contiguous().clone()
    tensors["rng"] = generator.get_state()
    data = save(tensors, metadata={"format": CHECKPOINT_FORMAT, "run": tag, "step": str(step)})
    write_replacing(path, lambda stream: stream.write(data))


def _resume(path: Path | None, tag: str, module: nn.Module, optimizer: torch.optim.Optimizer,
            generator: torch.Generator) -> int:
    """Load the checkpoint at `path` when it is this run's; the number of steps it had done (0: start over)."""
    if path is None or not path.is_file():
        return 0
    meta, tensors = read_tensors(path, "; delete it or choose another --checkpoint")
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not an ILF checkpoint; delete it or choose another --checkpoint")
    if meta.get("run") != tag:
        raise ValueError(f"{path}: a checkpoint of another run (other settings or another model); delete it to "
                         "start this one")
    module.load_state_dict({k.removeprefix("module."): v for k, v in tensors.items() if k.startswith("module.")})
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    generator.set_state(tensors["rng"])
    return int(meta["step"])


def model_teacher(model: Any, steps: int = 20, batch: int = 8) -> Teacher:
    """A `DiffusionModel` of ours (the embedded digits U-Net or DiT, or a folder model with digit prompts)
    sampling with DDIM and its own CFG, as the nodes and benches sample it: seed `s` draws `batch` noises
    and digit labels from `s` alone. Both CFG halves go through one batched call, so each model call
    records `2 × batch` samples. The site is the denoiser's family's (U-Net or DiT)."""
    from ..adapters.diffusers_site import model_site
    from ..models.sampling import denoise, initial_noise, make_scheduler

    def generate(seed: int) -> torch.Tensor:
        labels = torch.randint(10, (batch,), generator=torch.Generator().manual_seed(seed)).tolist()
        cond = torch.cat([model.encode_prompt(str(label)) for label in labels])
        uncond = model.encode_prompt("").expand_as(cond)
        return denoise(model, make_scheduler("ddim", model.scheduler_config), cond, uncond,
                       initial_noise(model, batch, seed), steps, model.default_guidance, seed, progress=False)

    return Teacher(model_site(model.unet), model.name, generate)


def comfy_teacher(model: Any, run: Any) -> Teacher:
    """A ComfyUI MODEL (a `ModelPatcher`) sampling as its KSampler node would with `run` (an
    `adapters.comfy_cachequant.SamplerRun`: conditioning, latent, steps, CFG, sampler, scheduler), seed `s`
    drawing the noise; the LiveCache techniques on the MODEL are left out (the teacher is the plain backbone).
    The module is trained on, and tied to, the diffusion model as ComfyUI loaded it (its LoRAs merged). The
    name is ComfyUI's model class (SD15, Flux, ...). ComfyUI's blocks may update activations in place
    (`Teacher.in_place`), and its executor loads weights under inference mode (`Teacher.student`). Run it
    outside inference mode (`torch.inference_mode(False)`), as ComfyUI's own training node does."""
    from ..adapters.comfy_cachequant import generate, model_name
    from ..adapters.comfy_ilf import student_of, training_site
    from ..adapters.comfy_unet import without_techniques

    bare = without_techniques(model)
    site = training_site(bare)
    return Teacher(site, model_name(bare), lambda seed: generate(bare, run, seed), in_place=True,
                   student=student_of(site))
