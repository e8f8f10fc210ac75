"""The diffusion avatar engine: the shared avatar renderer (`pipelines/avatar.py`) as a live engine.

The renderer holds the model, the stages and every acceleration (reference cache, temporal DeepCache,
batching, the stage pipeline, W8A8, bf16); this module only joins it to the runtime's interface, so
`livecache serve --engine diffusion` streams exactly what the ComfyUI node and `livecache bench avatar`
render.
"""

from __future__ import annotations

from ...pipelines.avatar import AvatarRenderer, AvatarSession
from .base import EngineSession, PortraitEngine


class DiffusionSession(AvatarSession, EngineSession):
    """An avatar session the runtime can drive (mouth box, controls, close)."""


# default frame size by device: on a CPU, 512 px ran at 6-10 fps with hundreds of dropped frames on two busy cores,
# and 256 px renders many times faster (docs/benchmarks.md, "Live sessions"). An accelerator holds 512 px.
DEFAULT_SIZE = {"cpu": 256}


class DiffusionEngine(AvatarRenderer, PortraitEngine):
    name = "diffusion"
    workers = 1  # one U-Net; concurrency comes from batching and the stage pipeline
    session_class = DiffusionSession

    @property
    def default_size(self) -> int:  # type: ignore[override] - depends on the device the model runs on
        return DEFAULT_SIZE.get(self.model.device.type, 512)
