"""The embedded DiT: its calling convention, loader, resumable training and the DiT site it goes through."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from livecache.accel.block_cache import BlockCacheConfig
from livecache.accel.progress import Progress
from livecache.adapters.diffusers_dit import DiTSite
from livecache.adapters.diffusers_site import accelerated, model_site
from livecache.models.dit import DIT_CONFIG, DigitDiT, DitPromptEncoder, labels_of, load_dit
from livecache.models.embedded import SCHEDULER_CONFIG
from livecache.models.loading import WeightsError, save_component, save_json
from livecache.models.sampling import make_scheduler, sample
from livecache.nodes.dit_nodes import ApplyBlockCache
from livecache.train.dit import CHECKPOINT, train_dit

TINY = dict(DIT_CONFIG, num_layers=4, num_attention_heads=2, attention_head_dim=8)


@pytest.fixture
def tiny_folder(tmp_path):
    torch.manual_seed(0)
    model = DigitDiT(**TINY)
    save_component(model, tmp_path / "transformer", dict(TINY, _class_name="DiTTransformer2DModel"),
                   "diffusion_pytorch_model")
    save_json(tmp_path / "scheduler" / "scheduler_config.json", SCHEDULER_CONFIG)
    return tmp_path


def test_one_hot_states_draw_the_same_as_class_labels():
    torch.manual_seed(0)
    model = DigitDiT(**TINY).eval()
    x, labels = torch.randn(3, 1, 16, 16), torch.tensor([7, 0, 10])
    states = torch.cat([DitPromptEncoder().encode(p) for p in ("7", "zero", "")])
    with torch.no_grad():
        by_states = model(x, torch.tensor(500), encoder_hidden_states=states).sample
        by_labels = model(x, torch.full((3,), 500), class_labels=labels).sample
    assert torch.equal(by_states, by_labels)
    assert not torch.equal(by_states[0], by_states[1])  # the class changes the output


def test_bad_states_and_prompts_fail_naming_the_problem():
    with pytest.raises(ValueError, match=r"one-hot class states of shape \[B, 1, 11\], got \(2, 77, 768\)"):
        labels_of(torch.zeros(2, 77, 768))
    with pytest.raises(ValueError, match="names none"):
        DitPromptEncoder().encode("a cat")


def test_loader_and_the_dit_site_block_cache(tiny_folder):
    model = load_dit(tiny_folder)
    assert model.name == tiny_folder.name and model.sample_shape == (1, 16, 16)
    assert isinstance(model_site(model.unet), DiTSite)  # the samplers' `accelerated` addresses it as a DiT
    cond, uncond = model.encode_prompt("3").repeat(2, 1, 1), model.encode_prompt("").repeat(2, 1, 1)
    noise = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    calls = []
    for block in DiTSite(model.unet).blocks:
        block.attn1.to_q.register_forward_hook(lambda *_: calls.append(1))

    def run(configs):
        calls.clear()
        scheduler = make_scheduler("ddim", model.scheduler_config)
        with accelerated(model.unet, scheduler, configs):
            out = sample(model, scheduler, cond, uncond, noise, 6, 2.0, progress=False)
        return out, len(calls)

    plain, plain_calls = run([])
    every, _ = run([BlockCacheConfig(cache_interval=1)])
    cached, cached_calls = run([BlockCacheConfig(cache_interval=3)])
    again, _ = run([])
    assert torch.equal(every, plain) and torch.equal(again, plain)  # interval 1 and removal: bit-identical
    assert plain_calls == 6 * 4 and cached_calls == 2 * 4 + 4 * 2  # 2 full steps; blocks 1..2 skipped on 4
    assert not torch.equal(cached, plain)


def test_loader_refuses_a_folder_without_the_transformer(tmp_path):
    with pytest.raises(WeightsError, match="transformer: missing; run `livecache train dit`"):
        load_dit(tmp_path)


def test_block_cache_node_refuses_a_unet_and_a_bad_span(tiny_folder, tiny_unet):
    model = load_dit(tiny_folder)
    (applied,) = ApplyBlockCache().apply(model, 3, 0, 0, "forecast", 1)
    assert applied.accelerations[0].span == (1, 3) and model.accelerations == ()
    with pytest.raises(ValueError, match=r"span \(1, 4\) must lie inside blocks 1..2"):
        ApplyBlockCache().apply(model, 3, 1, 4, "reuse", 1)
    with pytest.raises(TypeError, match="UNet2DConditionModel is not a supported diffusers transformer"):
        ApplyBlockCache().apply(replace(model, unet=tiny_unet), 3, 0, 0, "reuse", 1)


class Interrupted(Exception):
    pass


def test_training_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path):
    whole = train_dit(tmp_path / "whole", steps=4, batch=4, checkpoint_every=2, progress=False)
    seen = []

    def stop_at_step_3():
        if len(seen) == 3:
            raise Interrupted
        seen.append(1)

    with pytest.raises(Interrupted):
        train_dit(tmp_path / "resumed", steps=4, batch=4, checkpoint_every=2, progress=Progress(check=stop_at_step_3))
    assert (tmp_path / "resumed" / CHECKPOINT).is_file() and not (tmp_path / "resumed" / "transformer").exists()
    with pytest.raises(WeightsError, match="a checkpoint of other settings"):
        train_dit(tmp_path / "resumed", steps=5, batch=4, checkpoint_every=2, progress=False)
    train_dit(tmp_path / "resumed", steps=4, batch=4, checkpoint_every=2, progress=False)
    assert not (tmp_path / "resumed" / CHECKPOINT).exists()
    a = load_file(str(whole / "transformer" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert load_dit(whole).unet.config.num_layers == DIT_CONFIG["num_layers"]


def test_shipped_dit_loads_by_name_and_its_workflow_runs(tmp_path, capsys):
    from livecache.cli import main as cli_main
    from livecache.nodes.diffusers_nodes import LoadDiffusersModel

    (model,) = LoadDiffusersModel().load("embedded:dit")
    assert model.name == "embedded:dit" and isinstance(model_site(model.unet), DiTSite)
    workflow = Path(__file__).resolve().parents[1] / "workflows" / "dit_block_cache_api.json"
    assert cli_main(["run", str(workflow), "--output", str(tmp_path)]) == 0
    assert len(sorted(tmp_path.glob("dit_block_cache_*.png"))) == 4
    assert "saved" in capsys.readouterr().out


def test_shipped_dit_draws_the_asked_digit():
    from livecache.models.embedded import FEATURES_FILE
    from livecache.models.features import DigitFeatures
    from livecache.models.loading import load_state_into

    model = load_dit()
    asked = torch.arange(30) % 10
    cond = torch.cat([model.encode_prompt(str(int(d))) for d in asked])
    noise = torch.randn(30, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    uncond = model.encode_prompt("").repeat(30, 1, 1)
    images = sample(model, make_scheduler("ddim", model.scheduler_config), cond, uncond, noise, 20,
                    model.default_guidance, progress=False)
    classifier = load_state_into(DigitFeatures(), FEATURES_FILE).eval()
    with torch.no_grad():
        share = float((classifier(images.clamp(-1, 1)).argmax(-1) == asked).float().mean())
    assert share >= 0.5  # chance is 0.1; see docs/models.md for the measured share
