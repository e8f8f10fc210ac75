"""The header every node class carries, declared in its class line, and the node kinds several classes are.

ComfyUI reads `CATEGORY`, `RETURN_TYPES`, `RETURN_NAMES` and `FUNCTION` as class attributes (inherited
ones serve as well as declared ones). `Node` sets them from the class line, so a node class reads as
what it is, then its description, inputs and call:

    class LoadVideoModel(Node, category="video", returns={"video_model": "LC_VIDEO_MODEL"}, function="load"):

sets `CATEGORY = "LiveCache/video"`, `RETURN_TYPES = ("LC_VIDEO_MODEL",)`, `RETURN_NAMES = ("video_model",)`
and `FUNCTION = "load"`; `returns` as a tuple of types declares no output names (ComfyUI then names each
output after its type).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..accel.techniques import check_stack
from ..models.pipeline import DiffusionModel

ROOT = "LiveCache"


class Node:
    """Base of the node classes: `category`, `returns` and `function` in the class line become ComfyUI's header
    attributes; a subclass without them keeps its parent's."""

    def __init_subclass__(cls, *, category: str | None = None,
                          returns: Mapping[str, str] | tuple[str, ...] | None = None, function: str | None = None,
                          **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if category is not None:
            cls.CATEGORY = f"{ROOT}/{category}"
        if isinstance(returns, Mapping):
            cls.RETURN_TYPES, cls.RETURN_NAMES = tuple(returns.values()), tuple(returns)
        elif returns is not None:
            cls.RETURN_TYPES = tuple(returns)
        if function is not None:
            cls.FUNCTION = function


class PipeTechnique(Node, category="accelerate", returns={"model": "LC_PIPE"}, function="apply"):
    """A technique node on our own pipeline: returns a copy of the `LC_PIPE` carrying one more config, which the
    sampler (and, for some, the decoder) applies."""

    @staticmethod
    def stacked(model: DiffusionModel, config: Any, unique_id: str | None) -> tuple[DiffusionModel]:
        """`model` with `config` added, after the registry's stacking rules (a combination that cannot work fails
        here, naming it, instead of in the sampler)."""
        check_stack(model.accelerations + (config,))
        return (model.with_acceleration(config, unique_id),)


class ModelTechnique(Node, category="accelerate", returns={"model": "MODEL"}, function="apply"):
    """A technique node on ComfyUI's own `MODEL`: returns a patched clone, the technique runs in any sampler."""
