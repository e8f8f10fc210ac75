"""Feature slicing: exact results per slice on U-Nets, the VAE decoder and video models, with less peak memory."""

import pytest
import torch

from livecache.accel.deepcache import DeepCacheConfig
from livecache.accel.forward_override import ForwardOverrides
from livecache.accel.slicing import FeatureSlicer, OperatorGroup, SlicingConfig, slice_tree
from livecache.adapters.diffusers_site import accelerated
from livecache.adapters.diffusers_slicing import sliced_decoder, unet_groups
from livecache.bench.slicing_bench import _motion_unet, _vae, peak_memory


class Calls:
    """Counts forward calls of one module (a sliced group runs it once per slice)."""

    def __init__(self, module):
        self.count = 0
        self.handle = module.register_forward_pre_hook(lambda *_: setattr(self, "count", self.count + 1))


def unet_inputs(rows, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 4, 16, 16, generator=g), torch.randn(rows, 3, 32, generator=g)


@pytest.mark.parametrize("configs, inner_calls", [
    ([SlicingConfig("batch", 4, vae=False)], 4),                          # the whole U-Net per sample
    ([SlicingConfig("batch", 2, vae=False), DeepCacheConfig(1)], 2),      # layer groups under a cache
    ([SlicingConfig("spatial", 4, vae=False)], 1),                       # tokens: resnets run whole
])
def test_unet_slices_equal_unsliced(tiny_unet, configs, inner_calls, close_reassociated):
    x, states = unet_inputs(4)
    with torch.no_grad():
        reference = tiny_unet(x, 500, states).sample
        with accelerated(tiny_unet, None, configs) as handles:
            resnet = Calls(tiny_unet.down_blocks[0].resnets[0].norm1)
            out = tiny_unet(x, 500, states).sample
            resnet.handle.remove()
    close_reassociated(out, reference)
    assert resnet.count == inner_calls
    assert handles[0].stats.slice_calls > 0
    assert all("forward" not in m.__dict__ for m in tiny_unet.modules())


def test_spatial_slicing_runs_attention_and_feed_forward_per_token_slice(tiny_unet):
    x, states = unet_inputs(2)
    block = tiny_unet.down_blocks[0].attentions[0].transformer_blocks[0]
    with torch.no_grad(), accelerated(tiny_unet, None, [SlicingConfig("spatial", 4, vae=False)]):
        ff, q = Calls(block.ff.net[0]), Calls(block.attn1.to_q)
        k = Calls(block.attn1.to_k)
        tiny_unet(x, 500, states)
    assert ff.count == q.count == k.count == 4  # 256 tokens in 4 slices; every slice reads all keys
    assert len(unet_groups(tiny_unet, "spatial")) == 3 * sum(1 for _ in tiny_unet.modules() if hasattr(_, "attn1"))


def test_vae_decoder_slices_per_sample(close_reassociated):
    vae = _vae(tiny=True)
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = vae.decode(latents).sample
        with sliced_decoder(vae, [SlicingConfig(slices=8)]) as handle:
            calls = Calls(vae.decoder.conv_in)
            out = vae.decode(latents).sample
    close_reassociated(out, reference)
    assert calls.count == 3 == handle.stats.slice_calls  # at most one row per slice
    assert "forward" not in vae.decoder.__dict__


def test_video_model_slices_frames_but_keeps_temporal_layers_whole(close_reassociated):
    motion = _motion_unet(tiny=True)
    g = torch.Generator().manual_seed(0)
    x, states = torch.randn(1, 4, 8, 16, 16, generator=g), torch.randn(8, 77, 64, generator=g)
    with torch.no_grad():
        reference = motion(x, 500, encoder_hidden_states=states).sample
        with accelerated(motion, None, [SlicingConfig("batch", 8, vae=False)]):
            spatial_resnet = Calls(motion.down_blocks[0].resnets[0].norm1)
            temporal = motion.down_blocks[0].motion_modules[0]
            temporal_norm, temporal_block = Calls(temporal.norm), Calls(temporal.transformer_blocks[0].ff)
            out = motion(x, 500, encoder_hidden_states=states).sample
    close_reassociated(out, reference)
    assert spatial_resnet.count == 8  # one frame per slice
    assert temporal_norm.count == 1  # normalises over all frames and pixels: runs whole
    assert temporal_block.count == 8  # per-pixel frame sequences: sliced along pixels


def test_sixteen_frames_use_three_times_less_peak_memory(tiny_unet, close_reassociated):
    x, states = unet_inputs(16)
    with torch.no_grad():
        reference, full = peak_memory(lambda: tiny_unet(x, 500, states).sample)
        with accelerated(tiny_unet, None, [SlicingConfig("batch", 16, vae=False)]):
            out, sliced = peak_memory(lambda: tiny_unet(x, 500, states).sample)
    close_reassociated(out, reference)
    assert full >= 3 * sliced, (full, sliced)


def test_peak_memory_counts_live_tensors():
    def work():
        a = torch.ones(1_000_000)  # 4 MB
        b = a * 2  # 8 MB alive
        del a
        return b + 1  # 8 MB alive again
    _, peak = peak_memory(work)
    assert 8_000_000 <= peak < 8_100_000


def test_generic_groups_slice_tensors_of_the_sliced_length_only():
    args = (torch.zeros(6, 2), torch.zeros(1, 2), [torch.zeros(6)], {"k": torch.zeros(6, 1)}, 3)
    part = slice_tree(args, 0, 6, 2, 4)
    assert part[0].shape == (2, 2) and part[1].shape == (1, 2) and part[2][0].shape == (2,)
    assert part[3]["k"].shape == (2, 1) and part[4] == 3


def test_slicing_refuses_modules_a_cache_wraps_and_outputs_that_are_not_per_slice():
    linear = torch.nn.Linear(2, 2)
    cache = ForwardOverrides()
    cache.install(linear, lambda original: original)  # an approximate override, as DeepCache's
    with pytest.raises(ValueError, match="apply slicing before caches"):
        FeatureSlicer(SlicingConfig(vae=False)).apply([OperatorGroup(linear, 0)])
    cache.restore()

    class Pool(torch.nn.Module):
        def forward(self, x):
            return x.sum(0, keepdim=True)

    slicer = FeatureSlicer(SlicingConfig(slices=2, vae=False)).apply([OperatorGroup(pool := Pool(), 0)])
    with pytest.raises(ValueError, match="not per-slice"):
        pool(torch.ones(4, 2))
    slicer.remove()


@pytest.mark.parametrize("bad, message", [
    ({"axis": "time"}, "axis must be 'batch' or 'spatial'"), ({"slices": 0}, "slices must be an integer"),
    ({"axis": "spatial"}, "VAE decoder can only be sliced along the batch axis"),
])
def test_bad_configs_name_the_problem(bad, message):
    with pytest.raises(ValueError, match=message):
        SlicingConfig(**bad)
