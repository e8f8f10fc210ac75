"""Weights load from local folders with safetensors only, and every failure names the file."""

import json
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
    (model_copy / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(WeightsError, match="cannot read safetensors"):
        load_model(model_copy)
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
