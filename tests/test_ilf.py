"""Inner Loop Feedback: the core (scale 0 changes nothing), training without data, loading tied to the backbone."""

import pickle
from pathlib import Path

import diffusers as D
import pytest
import torch
from torch import nn

from livecache.accel.block_cache import BlockCacheConfig
from livecache.accel.deepcache import DeepCacheConfig
from livecache.accel.ilf import FeedbackModule, FeedbackWeights, ILFConfig
from livecache.accel.progress import Progress
from livecache.accel.quant import QuantConfig, QuantPlan
from livecache.accel.techniques import REGISTRY
from livecache.adapters.diffusers_dit import DiTSite
from livecache.adapters.diffusers_site import UNetSite
from livecache.models.dit import DIT_CONFIG, DigitDiT, DitPromptEncoder
from livecache.models.embedded import SCHEDULER_CONFIG
from livecache.models.pipeline import DiffusionModel
from livecache.train.ilf import ILFTraining, Teacher, model_teacher, pair_loss, record, train_ilf

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"


def tiny_dit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return D.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                   num_layers=4, norm_num_groups=4, sample_size=8, patch_size=2).eval()


def tiny_unet() -> nn.Module:
    torch.manual_seed(0)
    return D.UNet2DConditionModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                                  layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=8,
                                  attention_head_dim=4, norm_num_groups=8).eval()


def dit_calls(model: nn.Module) -> list[torch.Tensor]:
    config = model.config
    x = torch.randn(2, config.in_channels, config.sample_size, config.sample_size,
                    generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([1, 2])
    with torch.no_grad():
        return [model(x * t / 1000, timestep=torch.full((2,), t), class_labels=labels, return_dict=False)[0]
                for t in (900.0, 800.0, 700.0, 600.0, 500.0)]


def unet_calls(model: nn.Module) -> list[torch.Tensor]:
    states = torch.randn(2, 1, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return [model(torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(t)), t,
                      encoder_hidden_states=states).sample for t in (900, 800, 700, 600, 500)]


FAMILIES = {"dit": (tiny_dit, DiTSite, dit_calls, BlockCacheConfig),
            "unet": (tiny_unet, UNetSite, unet_calls, DeepCacheConfig)}


def test_a_module_at_scale_zero_is_the_identity_bit_for_bit():
    block = nn.Linear(8, 8)
    module = FeedbackModule(block)
    feature = torch.randn(3, 8)
    assert torch.equal(module(feature, lambda b, f, a, k: b(f), (), {}), feature)
    module.scale.data.fill_(0.5)
    assert not torch.equal(module(feature, lambda b, f, a, k: b(f), (), {}), feature)
    assert module.block is not block and torch.equal(module.block.weight, block.weight)


@pytest.mark.parametrize("family", FAMILIES)
def test_an_untrained_module_changes_nothing(family):
    build, site_type, calls, plain = FAMILIES[family]
    model = build()
    backbone = calls(model)
    # every step full: bit-identical to the backbone alone, and the module never runs
    handle = REGISTRY.apply(site_type(model), [ILFConfig(cache_interval=1)])[0]
    assert all(torch.equal(a, b) for a, b in zip(calls(model), backbone, strict=True))
    assert handle.stats.feedback_calls == 0
    handle.remove()
    # cached steps: scale 0 gives exactly the plain reuse it rides on; full steps stay the backbone's
    reuse_handle = REGISTRY.apply(site_type(model), [plain(cache_interval=2)])[0]
    reuse = calls(model)
    reuse_handle.remove()
    handle = REGISTRY.apply(site_type(model), [ILFConfig(cache_interval=2)])[0]
    with_ilf = calls(model)
    assert handle.stats.feedback_calls == 2 and handle.stats.full_calls == 3
    assert all(torch.equal(a, b) for a, b in zip(with_ilf, reuse, strict=True))
    assert all(torch.equal(with_ilf[k], backbone[k]) for k in (0, 2, 4))
    assert not torch.equal(with_ilf[1], backbone[1])  # the steps between really are cached
    handle.core.module.scale.data.fill_(0.3)  # a non-zero scale does act on the cached steps
    acted = calls(model)
    assert not torch.equal(acted[1], reuse[1]) and torch.equal(acted[0], reuse[0])
    handle.remove()
    assert all(torch.equal(a, b) for a, b in zip(calls(model), backbone, strict=True))


def twin_calls(family: str, model: nn.Module) -> None:
    """Two calls on the same inputs a hair of noise level apart: the second a cached step that reuses all but
    exactly what the first computed."""
    torch.manual_seed(3)
    with torch.no_grad():
        for t in (900.0, 900.0 - 1e-4):
            if family == "dit":
                model(torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)),
                      timestep=torch.full((2,), t), class_labels=torch.tensor([1, 2]))
            else:
                model(torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor(t),
                      encoder_hidden_states=torch.randn(2, 1, 8, generator=torch.Generator().manual_seed(2)))


@pytest.mark.parametrize("family", FAMILIES)
def test_the_teacher_feature_is_the_one_a_cached_step_stands_for(family):
    """The trainer's feature target is what the corrected feature stands for (a DiT span's output, not its first
    block's): a cached step right after a full one on the same inputs reuses the right feature, so with the
    module at scale 0 the feature loss against the teacher's record is ~0 (the output loss too)."""
    build, site_type, _, _ = FAMILIES[family]
    model = build()
    site = site_type(model)
    runs = record(Teacher(site, family, lambda _seed: twin_calls(family, model)), [0], None)
    handle = REGISTRY.apply(site, [ILFTraining().cache_config()])[0]
    try:
        first, later = runs[0]
        assert float(pair_loss(handle.core, model, [first], later, ILFTraining(output_weight=0))) < 1e-6
        assert float(pair_loss(handle.core, model, [first], later, ILFTraining(feature_weight=0))) < 1e-6
    finally:
        handle.remove()


SETTINGS = ILFTraining(steps=40, interval=2, generations=2, held_out=1, lr=3e-3, checkpoint_every=5)


def tiny_digit_dit(seed: int = 0) -> DigitDiT:
    """The embedded DiT's layout (one-hot class states, the digits scheduler), 4 blocks of width 32."""
    torch.manual_seed(seed)
    return DigitDiT(**dict(DIT_CONFIG, num_layers=4, num_attention_heads=2, attention_head_dim=16)).eval()


def teacher(model: DigitDiT):
    """The teacher the CLI uses for embedded:dit, on a tiny model: DDIM with CFG 3 from digit prompts."""
    encode = DitPromptEncoder().encode
    return model_teacher(DiffusionModel("tiny-dit", model, SCHEDULER_CONFIG, encode, default_guidance=3.0),
                         steps=6, batch=2)


def test_training_beats_plain_reuse_on_held_out_seeds_and_ships_as_safetensors(tmp_path):
    model = tiny_digit_dit()
    out = tmp_path / "ilf.safetensors"
    weights = train_ilf(teacher(model), out, SETTINGS, progress=False)
    losses = weights.training["held_out_loss"]
    assert losses["ilf"] < losses["reuse"]
    assert float(weights.state["scale"]) != 0.0
    loaded = FeedbackWeights.load(out)
    assert loaded.where == weights.where and loaded.fingerprint == weights.fingerprint
    assert all(torch.equal(loaded.state[k], weights.state[k]) for k in weights.state)
    with pytest.raises(FileExistsError):
        train_ilf(teacher(model), out, SETTINGS, progress=False)  # never written over
    # applied from the file: the cached steps differ from plain reuse, the full steps do not
    handle = REGISTRY.apply(DiTSite(model), [ILFConfig(cache_interval=2, module=loaded)])[0]
    trained = dit_calls(model)
    handle.remove()
    handle = REGISTRY.apply(DiTSite(model), [ILFConfig(cache_interval=2)])[0]
    untrained = dit_calls(model)
    handle.remove()
    assert torch.equal(trained[0], untrained[0]) and not torch.equal(trained[1], untrained[1])


def test_rollout_training_beats_plain_reuse_on_held_out_generations():
    """Trained on whole generations at the inference schedule, the module lowers the rollout loss (final sample,
    every call, every corrected feature against the teacher's) on seeds it never saw; the pair loss is recorded
    beside it."""
    settings = ILFTraining(steps=15, interval=3, generations=2, held_out=1, lr=3e-3, checkpoint_every=5,
                           objective="rollout")
    weights = train_ilf(teacher(tiny_digit_dit()), None, settings, progress=False)
    rollout, pairs = weights.training["held_out_rollout_loss"], weights.training["held_out_loss"]
    assert rollout["ilf"] < rollout["reuse"]
    assert set(pairs) == {"ilf", "reuse"}
    assert weights.training["objective"] == "rollout"


class Stop(Exception):
    pass


def test_an_interrupted_run_resumes_from_its_checkpoint_to_the_same_module(tmp_path):
    settings = ILFTraining(steps=10, interval=2, generations=1, held_out=1, checkpoint_every=5)
    straight = train_ilf(teacher(tiny_digit_dit()), None, settings, progress=False)
    checkpoint = tmp_path / "run.safetensors"
    done = []

    def stop_after_seven_steps() -> None:  # 3 checks while the teacher records 2 generations, then one a step
        if len(done) == 10:
            raise Stop
        done.append(1)

    with pytest.raises(Stop):
        train_ilf(teacher(tiny_digit_dit()), None, settings, checkpoint=checkpoint,
                  progress=Progress(check=stop_after_seven_steps, bar=False))
    assert checkpoint.is_file()
    steps_run = []
    resumed = train_ilf(teacher(tiny_digit_dit()), None, settings, checkpoint=checkpoint,
                        progress=Progress(update=lambda done_, total: steps_run.append(done_), bar=False))
    assert max(steps_run) - min(steps_run) == 5  # steps 5..9 only: the first five came from the checkpoint
    for key, value in straight.state.items():
        assert torch.allclose(resumed.state[key], value, rtol=0, atol=1e-5 * (1 + float(value.abs().max())))
    other = ILFTraining(steps=12, interval=2, generations=1, held_out=1, checkpoint_every=5)
    with pytest.raises(ValueError, match="another run"):
        train_ilf(teacher(tiny_digit_dit()), None, other, checkpoint=checkpoint, progress=False)


def test_a_module_loads_only_for_its_backbone_and_only_from_safetensors(tmp_path):
    model, other = tiny_dit(0), tiny_dit(1)
    handle = REGISTRY.apply(DiTSite(model), [ILFConfig(cache_interval=2)])[0]
    from livecache.accel.cache_schedule import model_fingerprint

    mine, theirs = model_fingerprint(model), model_fingerprint(other)
    weights = FeedbackWeights.of(handle.core.module, mine, "tiny-dit", handle.core.point.where)
    handle.remove()
    path = weights.save(tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match=f"#{mine}.*#{theirs}"):
        REGISTRY.apply(DiTSite(other), [ILFConfig(module=FeedbackWeights.load(path))])
    pt = tmp_path / "m.pt"
    torch.save(weights.state, pt)
    with pytest.raises(ValueError, match="safetensors"):
        FeedbackWeights.load(pt)
    disguised = tmp_path / "pickled.safetensors"
    disguised.write_bytes(pickle.dumps(weights.state))
    with pytest.raises(ValueError, match="not a safetensors file"):
        FeedbackWeights.load(disguised)


def test_a_fingerprint_does_not_depend_on_the_thread_count():
    """Modules are trained single-threaded and applied under any thread count: the digits U-Net's float sums
    differed between 1 and 2 threads, which refused the shipped module."""
    from livecache.accel.cache_schedule import model_fingerprint
    from livecache.models.pipeline import load_model

    unet = load_model().unet
    threads = torch.get_num_threads()
    try:
        prints = set()
        for count in (1, 2):
            torch.set_num_threads(count)
            prints.add(model_fingerprint(unet))
    finally:
        torch.set_num_threads(threads)
    assert len(prints) == 1


def test_ilf_is_a_feature_cache_and_refuses_quantization():
    with pytest.raises(ValueError, match="feature caches"):
        REGISTRY.check_stack([ILFConfig(), DeepCacheConfig()])
    with pytest.raises(ValueError, match="quantization"):
        REGISTRY.check_stack([ILFConfig(), QuantPlan(QuantConfig(), "", {}, 0)])


def test_apply_ilf_refuses_a_module_of_another_model():
    from livecache.models.pipeline import load_model
    from livecache.nodes.ilf_nodes import ApplyILF

    model = load_model()
    stranger = tiny_unet()
    handle = REGISTRY.apply(UNetSite(stranger), [ILFConfig()])[0]
    from livecache.accel.cache_schedule import model_fingerprint

    weights = FeedbackWeights.of(handle.core.module, model_fingerprint(stranger), "tiny", handle.core.point.where)
    handle.remove()
    with pytest.raises(ValueError, match=f"#{weights.fingerprint}.*#{model_fingerprint(model.unet)}"):
        ApplyILF().apply(model, weights, 2)


def test_an_untrained_module_on_the_forecast_is_the_forecast_and_a_unet_has_none():
    """ILF riding on the DiT block cache's forecast: at scale 0 exactly the forecast (which differs from reuse
    after two full steps); a U-Net refuses the forecast mode by name."""
    model = tiny_dit()
    plain = REGISTRY.apply(DiTSite(model), [BlockCacheConfig(cache_interval=2, mode="forecast")])[0]
    forecast = dit_calls(model)
    plain.remove()
    handle = REGISTRY.apply(DiTSite(model), [ILFConfig(cache_interval=2, mode="forecast")])[0]
    with_ilf = dit_calls(model)
    handle.remove()
    assert all(torch.equal(a, b) for a, b in zip(with_ilf, forecast, strict=True))
    reuse = REGISTRY.apply(DiTSite(model), [BlockCacheConfig(cache_interval=2)])[0]
    reused = dit_calls(model)
    reuse.remove()
    assert torch.equal(reused[1], forecast[1]) and not torch.equal(reused[3], forecast[3])
    with pytest.raises(ValueError, match="no forecast mode"):
        REGISTRY.apply(UNetSite(tiny_unet()), [ILFConfig(cache_interval=2, mode="forecast")])
