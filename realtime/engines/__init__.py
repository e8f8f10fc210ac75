"""Engine registry: names map to lazily imported factories so heavy engines cost nothing until chosen.

Later engines (``diffusion``) register with one line here; the server only ever sees
`Engine`.
"""

from __future__ import annotations

import importlib

from .base import Engine

# name -> (module relative to this package, factory attribute)
ENGINES: dict[str, tuple[str, str]] = {
    "embedded": (".embedded", "EmbeddedEngine"),
    "video": (".video", "VideoEngine"),
    "diffusion": (".diffusion", "DiffusionEngine"),
    "musetalk": (".musetalk", "MuseTalkEngine"),
}


def available_engines() -> list[str]:
    return sorted(ENGINES)


def create_engine(name: str, **options: object) -> Engine:
    """Instantiate engine `name`; unknown names list the known ones so CLI errors are actionable."""
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}; available: {', '.join(available_engines())}")
    module, attr = ENGINES[name]
    factory = getattr(importlib.import_module(module, __name__), attr)
    return factory(**options)
