"""Weights load from local folders with safetensors only, and every failure names the file."""

import json
import re
import shutil

import pytest
import torch

from livecache.models.embedded import DIGITS_DIR
from livecache.models.loading import WeightsError, resolve_inside
from livecache.models.pipeline import load_model


@pytest.fixture
def model_copy(tmp_path):
    folder = tmp_path / "models" / "mydigits"
    shutil.copytree(DIGITS_DIR, folder)
    return folder


def test_local_folder_loads_like_the_embedded_model(model_copy):
    embedded, local = load_model(None), load_model(model_copy)
    assert local.name == "mydigits"
    x = torch.randn(2, *embedded.sample_shape)
    states = embedded.encode_prompt("3").repeat(2, 1, 1)
    with torch.no_grad():
        assert torch.equal(embedded.unet(x, 10, states).sample, local.unet(x, 10, states).sample)


def test_missing_weight_file_is_named(model_copy):
    (model_copy / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(WeightsError, match=r"unet: no \.safetensors weight file"):
        load_model(model_copy)


def test_pickle_weights_are_refused_not_loaded(model_copy):
    weights = model_copy / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(WeightsError, match="pickle files are never loaded"):
        load_model(model_copy)


def test_mismatched_config_names_the_file_and_tensor(model_copy):
    config_file = model_copy / "unet" / "config.json"
    config = json.loads(config_file.read_text())
    config["block_out_channels"] = [32, 64, 96]
    config_file.write_text(json.dumps(config))
    with pytest.raises(WeightsError, match=r"diffusion_pytorch_model\.safetensors: does not match the model config"):
        load_model(model_copy)


def test_corrupt_weights_and_config_are_named(model_copy):
    weights = model_copy / "unet" / "diffusion_pytorch_model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(b"not a tensor file")
    with pytest.raises(WeightsError, match="cannot read safetensors"):
        load_model(model_copy)
    weights.write_bytes(good)
    (model_copy / "scheduler" / "scheduler_config.json").write_text("{")
    with pytest.raises(WeightsError, match="scheduler_config.json: not valid JSON"):
        load_model(model_copy)


def test_paths_cannot_escape_the_model_folders(model_copy, tmp_path):
    roots = [model_copy.parent]
    assert resolve_inside("mydigits", roots) == model_copy.resolve()
    (tmp_path / "secret").mkdir()
    for escape in ("../secret", str(tmp_path / "secret"), "mydigits/../../secret"):
        with pytest.raises(WeightsError, match="not found inside the model folders"):
            resolve_inside(escape, roots)


def test_folder_with_clip_text_encoder_and_vae_loads_and_samples(model_copy):
    """The Stable Diffusion layout: text_encoder/ + tokenizer/ instead of our prompt encoder, and a vae/."""
    import string

    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    from livecache.models.loading import save_component
    from livecache.models.sampling import decode, make_scheduler, sample

    shutil.rmtree(model_copy / "prompt_encoder")
    torch.manual_seed(0)
    text_config = CLIPTextConfig(vocab_size=60, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=16)
    save_component(CLIPTextModel(text_config), model_copy / "text_encoder", text_config.to_dict(), "model")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for letter in string.ascii_lowercase:
        vocab[letter] = len(vocab)
        vocab[letter + "</w>"] = len(vocab)
    tokenizer = model_copy / "tokenizer"
    tokenizer.mkdir()
    (tokenizer / "vocab.json").write_text(json.dumps(vocab))
    (tokenizer / "merges.txt").write_text("#version: 0.2\n")
    (tokenizer / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 16}))
    vae_config = {"in_channels": 1, "out_channels": 1, "latent_channels": 1, "block_out_channels": [8],
                  "down_block_types": ["DownEncoderBlock2D"], "up_block_types": ["UpDecoderBlock2D"],
                  "norm_num_groups": 4, "sample_size": 16, "scaling_factor": 0.5}
    save_component(AutoencoderKL(**vae_config), model_copy / "vae", vae_config, "diffusion_pytorch_model")

    model = load_model(model_copy)
    cond = model.encode_prompt("a cat")
    assert cond.shape == (1, 16, 64)
    assert not torch.equal(cond, model.encode_prompt("a dog"))
    noise = torch.randn(1, *model.sample_shape, generator=torch.Generator().manual_seed(0))
    latents = sample(model, make_scheduler("ddim", model.scheduler_config), cond, model.encode_prompt(""), noise,
                     2, model.default_guidance, progress=False)
    images = decode(model, latents)
    assert images.shape == (1, 16, 16, 3) and 0 <= float(images.min()) <= float(images.max()) <= 1


def test_config_sizes_are_checked_on_load_naming_the_file(model_copy, tmp_path):
    from livecache.models.avatar import AVATAR_DIR
    from livecache.models.avatar import load_model as load_avatar
    from livecache.models.video import VIDEO_DIR, load_video_model

    config_file = model_copy / "unet" / "config.json"
    config = json.loads(config_file.read_text())
    for bad, shown in ((100_000, "100000"), (True, "True"), (-16, "-16"), (16.5, "16.5")):
        config_file.write_text(json.dumps({**config, "sample_size": bad}))
        with pytest.raises(WeightsError, match=rf"unet/config\.json: sample_size = {shown} must be a positive integer"):
            load_model(model_copy)
    config_file.write_text(json.dumps([config]))
    with pytest.raises(WeightsError, match=r"unet/config\.json: must hold a JSON object .* not a list"):
        load_model(model_copy)

    avatar = tmp_path / "avatar"
    shutil.copytree(AVATAR_DIR, avatar)
    index = json.loads((avatar / "model_index.json").read_text())
    (avatar / "model_index.json").write_text(json.dumps({**index, "resolution": 65536}))
    with pytest.raises(WeightsError, match=r"model_index\.json: resolution = 65536 must be a positive integer of "
                                           r"at most 4096"):
        load_avatar(avatar)
    (avatar / "model_index.json").write_text(json.dumps({**index, "audio_context_s": float("nan")}))
    with pytest.raises(WeightsError, match=r"model_index\.json: audio_context_s must be a finite number"):
        load_avatar(avatar)

    video = tmp_path / "video"
    shutil.copytree(VIDEO_DIR, video)
    video_config = json.loads((video / "config.json").read_text())
    (video / "config.json").write_text(json.dumps({**video_config, "dim": 10**9}))
    with pytest.raises(WeightsError, match=r"video/config\.json: dim = 1000000000 must be a positive integer"):
        load_video_model(video)


def test_nan_and_integer_weights_are_refused(model_copy):
    from safetensors.torch import load_file, save_file

    weights = model_copy / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    name = sorted(k for k, v in state.items() if v.is_floating_point())[0]
    save_file({**state, name: torch.full_like(state[name], float("nan"))}, str(weights))
    with pytest.raises(WeightsError, match=rf"tensor {re.escape(name)} holds NaN or infinite values"):
        load_model(model_copy)
    save_file({**state, name: state[name].to(torch.int8)}, str(weights))
    with pytest.raises(WeightsError, match=rf"tensor {re.escape(name)} is int8, the model needs floating point"):
        load_model(model_copy)


def test_a_missing_audio_file_names_the_input_folders(tmp_path, monkeypatch):
    from livecache.nodes.avatar_nodes import LoadAudioFile

    monkeypatch.setenv("LIVECACHE_INPUT", str(tmp_path))
    with pytest.raises(WeightsError, match="nowhere.wav: not found inside the input folders or the pack's example"):
        LoadAudioFile().load("nowhere.wav")
    assert "not found inside the input folders" in LoadAudioFile.VALIDATE_INPUTS(file="nowhere.wav")


def test_loading_and_casting_models_prints_no_spurious_diffusers_warning():
    """Old behaviour: every dtype cast through diffusers' `ModelMixin.to` logged "There are modules in ... that
    should be kept in float32: []" (an empty list), in the main workflow job and every bench."""
    import logging

    import torch

    from livecache.bench.workloads import embedded_workload, sd15_workload

    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler = Keep(logging.WARNING)
    logging.getLogger("diffusers").addHandler(handler)
    try:
        sd15_workload(tiny=True, dtype=torch.bfloat16)
        embedded_workload()
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    assert not [m for m in seen if "kept in float32" in m], seen
