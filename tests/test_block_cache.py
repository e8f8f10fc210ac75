"""The block cache core on a toy transformer whose blocks add to their input in place (as ComfyUI's Flux blocks do)."""

import torch
from torch import nn

from livecache.accel.block_cache import BlockCache, BlockCacheConfig
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
