"""Inner Loop Feedback on ComfyUI's own MODEL (Apply ILF for MODEL): a U-Net and single-stream DiT spans.

Real ComfyUI 0.3.75; each model is a tiny random instance of ComfyUI's own class (the SD1.5-class U-Net of
`comfy_workloads.sd15_model`; Flux and Lumina 2 from `tiny_dits`), sampled by ComfyUI's KSampler path. The
trained modules are trained here, a few steps, with the trainer users run (`train.ilf.train_ilf` on
`comfy_teacher`), on the MODEL itself.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from livecache.accel.ilf import FeedbackModule, FeedbackWeights, ILFConfig
from livecache.adapters.comfy_cachequant import SamplerRun, fingerprint_of
from livecache.adapters.comfy_ilf import apply_ilf
from livecache.adapters.comfy_unet import ComfyRunSite, without_techniques
from livecache.bench.comfy_workloads import DeepBlockCalls, conditioning, sd15_model
from livecache.nodes.comfy_dit_nodes import BlockCacheModel, TokenSlicingModel
from livecache.nodes.comfy_model_nodes import QuantizeModel
from livecache.nodes.comfy_nodes import DeepCacheModel, StepRehashModel
from livecache.nodes.ilf_nodes import ApplyILFModel, LoadILFModule
from livecache.train.ilf import ILFTraining, comfy_teacher, train_ilf

sys.path.insert(0, str(Path(__file__).parent))  # the tests run in importlib mode: the helpers sit beside them
from loras import with_lora  # noqa: E402
from test_comfy_dit import BlockCalls  # noqa: E402
from tiny_dits import conditioning as dit_conditioning  # noqa: E402
from tiny_dits import latent as dit_latent  # noqa: E402
from tiny_dits import tiny_dit  # noqa: E402

STEPS = 8
SD15 = {"model_channels": 32, "context_dim": 64, "num_heads": 2}
TRAINING = ILFTraining(steps=12, interval=2, generations=2, held_out=1, checkpoint_every=1000)


@dataclass(frozen=True)
class Target:
    """One tiny MODEL and how the tests sample it (KSampler's inputs) and count the block calls it skips."""

    name: str
    model: Any
    run: SamplerRun

    @property
    def dit(self) -> bool:
        return self.name != "sd15"

    def sample(self, model: Any, sampler: str = "euler") -> tuple[torch.Tensor, list[int]]:
        """One generation; the latent and the block calls: a DiT's per block, a U-Net's [deep passes, calls]."""
        import comfy.sample

        counter = BlockCalls(model) if self.dit else DeepBlockCalls(model)
        try:
            with torch.inference_mode():  # as ComfyUI's executor runs every prompt
                empty = self.run.latent["samples"]
                noise = comfy.sample.prepare_noise(empty, 3)
                out = comfy.sample.sample(model, noise, STEPS, self.run.cfg, sampler, self.run.scheduler,
                                          self.run.positive, self.run.negative, empty, seed=3, disable_pbar=True)
        finally:
            counter.close()
        return out, (counter.counts if self.dit else [counter.count, counter.calls])

    def plain_cache(self, model: Any, interval: int) -> Any:
        """The reuse cache an ILF module rides on, at the same points: DeepCache at branch 0, the block cache."""
        if self.dit:
            return BlockCacheModel().apply(model, interval, 0, 0, "reuse", 1)[0]
        return DeepCacheModel().apply(model, interval, 0, "uniform", 0.0, 1.0)[0]


def build(name: str, seed: int = 0) -> Target:
    if name == "sd15":
        latent = torch.zeros(1, 4, 16, 16)
        conds = conditioning(1, 8, SD15["context_dim"], 1), conditioning(1, 8, SD15["context_dim"], 2)
        return Target(name, sd15_model(seed=seed, **SD15),
                      SamplerRun(*conds, {"samples": latent}, (0,), STEPS, 5.0, "euler", "normal"))
    conds = dit_conditioning(name, 1), dit_conditioning(name, 2)
    return Target(name, tiny_dit(name, seed),
                  SamplerRun(*conds, {"samples": dit_latent(name)}, (0,), STEPS, 2.0, "euler", "simple"))


def untrained(target: Target) -> FeedbackWeights:
    """A module at scale 0 for `target`'s MODEL (where training starts), tied to its fingerprint."""
    point = ComfyRunSite(target.model.get_model_object("diffusion_model"), 1).feedback_point(None)
    return FeedbackWeights.of(FeedbackModule(point.block), fingerprint_of(target.model), target.name, point.where)


def untouched(model: Any) -> bool:
    return all("forward" not in m.__dict__ for m in model.get_model_object("diffusion_model").modules())


@pytest.fixture(scope="module", params=["sd15", "flux", "lumina2"])
def target(request) -> Target:
    return build(request.param)


@pytest.fixture(scope="module")
def uncached(target):
    out, counts = target.sample(target.model)
    assert torch.isfinite(out).all()
    return out, counts


@pytest.fixture(scope="module")
def trained(target):
    return train_ilf(comfy_teacher(target.model, target.run), None, TRAINING, progress=False)


def test_an_untrained_module_is_exactly_the_cache_it_rides_on(target, uncached):
    module = untrained(target)
    out, counts = target.sample(ApplyILFModel().apply(target.model, module, 2)[0])
    plain, plain_counts = target.sample(target.plain_cache(target.model, 2))
    assert torch.equal(out, plain) and counts == plain_counts
    assert not torch.equal(out, uncached[0])  # the cached steps did skip work
    every, every_counts = target.sample(ApplyILFModel().apply(target.model, module, 1)[0])
    assert torch.equal(every, uncached[0]) and every_counts == uncached[1]  # interval 1: every step full
    again, again_counts = target.sample(target.model)  # the input MODEL never changed
    assert torch.equal(again, uncached[0]) and again_counts == uncached[1] and untouched(target.model)


def test_a_trained_module_corrects_the_cached_steps_and_skips_the_blocks(target, uncached, trained):
    assert float(trained.state["scale"].abs()) > 0 and trained.model == type(target.model.model.model_config).__name__
    losses = trained.training["held_out_loss"]
    assert losses["ilf"] < losses["reuse"], losses  # on held-out seeds, below the plain reuse it corrects
    sessions = []
    patched = apply_ilf(target.model, ILFConfig(2, module=trained), lambda session: sessions.append(session))
    out, counts = target.sample(patched)
    plain, plain_counts = target.sample(target.plain_cache(target.model, 2))
    base, base_counts = uncached
    assert counts == plain_counts and counts != base_counts  # the skipped blocks did not run
    if target.dit:
        first, stop = trained.where["span"]
        assert counts == [STEPS // 2 if first <= i < stop else STEPS for i in range(len(counts))], counts
    else:
        assert counts == [STEPS // 2, STEPS], counts  # half the calls ran the deep layers
    stats = sessions[0].stats
    assert stats.full_calls == stats.cached_calls == stats.feedback_calls == STEPS // 2, stats
    assert torch.isfinite(out).all() and not torch.equal(out, plain) and not torch.equal(out, base)
    # removing the technique (the clone without it) samples exactly as before
    bare, bare_counts = target.sample(without_techniques(patched))
    assert torch.equal(bare, base) and bare_counts == base_counts and untouched(target.model)


def test_a_module_for_another_model_is_refused_naming_both_fingerprints(target, trained):
    other = build(target.name, seed=1).model
    with pytest.raises(ValueError, match=rf"trained for model .*#{trained.fingerprint}.*#{fingerprint_of(other)}"):
        ApplyILFModel().apply(other, trained, 2)


def test_a_lora_makes_another_model():
    """The fingerprint is of the weights ComfyUI computes with: a LoRA patched onto the MODEL (before the node,
    or after it) makes it another model, refused naming both; a module trained on the LoRA'd MODEL fits it."""
    target = build("sd15", seed=2)
    base = untrained(target)
    lora = with_lora(target.model)
    assert fingerprint_of(lora) != base.fingerprint
    with pytest.raises(ValueError, match=rf"#{base.fingerprint}.*#{fingerprint_of(lora)}"):
        ApplyILFModel().apply(lora, base, 2)
    after = with_lora(ApplyILFModel().apply(target.model, base, 2)[0])  # the node passed; the run refuses
    with pytest.raises(ValueError, match=rf"#{base.fingerprint}.*#{fingerprint_of(lora)}"):
        target.sample(after)
    own = train_ilf(comfy_teacher(lora, target.run), None, ILFTraining(steps=1, generations=1, held_out=1),
                    progress=False)
    assert own.fingerprint == fingerprint_of(lora)
    out, counts = target.sample(ApplyILFModel().apply(lora, own, 2)[0])
    assert torch.isfinite(out).all() and counts == [STEPS // 2, STEPS]
    assert untouched(target.model)


def test_a_module_file_loads_through_the_loader_node(target, trained, tmp_path, monkeypatch):
    monkeypatch.setenv("LIVECACHE_MODELS", str(tmp_path))
    trained.save(tmp_path / "mine.safetensors")
    (loaded,) = LoadILFModule().load("mine.safetensors")
    assert loaded.fingerprint == trained.fingerprint and loaded.where == trained.where
    ours, _ = target.sample(ApplyILFModel().apply(target.model, loaded, 2)[0])
    direct, _ = target.sample(ApplyILFModel().apply(target.model, trained, 2)[0])
    assert torch.equal(ours, direct)


def test_stacking_follows_the_registry(target, uncached, trained):
    ilf = ApplyILFModel().apply(target.model, trained, 2)[0]
    with pytest.raises(ValueError, match="both cache"):  # one feature cache per model
        target.plain_cache(ilf, 2)
    with pytest.raises(ValueError, match="ILF cannot stack with quantization"):
        QuantizeModel().apply(ilf, "w8a8", 8, 8)
    with pytest.raises(ValueError, match="'extrapolate' cannot stack with ILF"):
        StepRehashModel().apply(ilf, 0.5, 1, "extrapolate")
    alone, alone_counts = target.sample(ilf)
    rehashed, counts = target.sample(StepRehashModel().apply(ilf, 0.0, 1, "reuse")[0])  # threshold 0: every step
    assert torch.equal(rehashed, alone) and counts == alone_counts
    if target.dit:  # token slicing is exact: the same output, whatever sits around it
        sliced, sliced_counts = target.sample(TokenSlicingModel().apply(ilf, 2)[0])
        scale = float(alone.abs().max())
        assert torch.allclose(sliced, alone, atol=1e-5 * scale, rtol=0) and sliced_counts == alone_counts


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "lcm"])
def test_comfyuis_ksampler_node_runs_it(target, trained, sampler):
    """ComfyUI's own KSampler node on the ILF MODEL, with other samplers than the tests' Euler."""
    import nodes

    patched = ApplyILFModel().apply(target.model, trained, 2, unique_id="7")[0]
    (latent,) = nodes.KSampler().sample(patched, 3, STEPS, target.run.cfg, sampler, target.run.scheduler,
                                        target.run.positive, target.run.negative, target.run.latent)
    assert torch.isfinite(latent["samples"]).all() and untouched(target.model)


def test_a_span_of_two_stream_blocks_is_refused():
    qwen = tiny_dit("qwen_image")
    module = FeedbackWeights.of(FeedbackModule(torch.nn.Linear(2, 2)), fingerprint_of(qwen), "x", {})
    with pytest.raises(TypeError, match="ILF needs a span of single-stream blocks; Qwen-Image's blocks"):
        ApplyILFModel().apply(qwen, module, 2)


def test_the_training_node_trains_inside_comfyuis_inference_mode(tmp_path, monkeypatch):
    """ComfyUI's executor runs every node, the checkpoint loader included, under `torch.inference_mode()`: the
    Train ILF Module node trains there on the very weights the loader made, saves the module where Load ILF
    Module finds it (never over a file), and the module fits that MODEL."""
    from livecache.nodes.ilf_nodes import TrainILFModel

    monkeypatch.setenv("LIVECACHE_MODELS", str(tmp_path))

    with torch.inference_mode():
        target = build("sd15", seed=3)
        run = target.run
        assert all(p.is_inference() for p in target.model.get_model_object("diffusion_model").parameters())
        (module,) = TrainILFModel().train(target.model, run.positive, run.negative, run.latent, 0, 1, STEPS, run.cfg,
                                          run.sampler_name, run.scheduler, 1.0, 2, 2, "ilf/tiny")
        assert module.fingerprint == fingerprint_of(target.model) and float(module.state["scale"].abs()) > 0
        with pytest.raises(FileExistsError, match="never written over"):
            TrainILFModel().train(target.model, run.positive, run.negative, run.latent, 0, 1, STEPS, run.cfg,
                                  run.sampler_name, run.scheduler, 1.0, 2, 2, "ilf/tiny")
    (loaded,) = LoadILFModule().load("ilf/tiny.safetensors")
    assert loaded.fingerprint == module.fingerprint
    out, counts = target.sample(ApplyILFModel().apply(target.model, loaded, 2)[0])
    assert torch.isfinite(out).all() and counts == [STEPS // 2, STEPS] and untouched(target.model)
