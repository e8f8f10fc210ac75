"""Torch's intra-op thread count for the duration of a training run."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def torch_threads(count: int = 1) -> Iterator[None]:
    """Run the block with `count` torch threads, restoring the previous count after.

    The embedded models are small: every op is tiny, and on this project's shared 2-core machine a
    second thread mostly waits on the first whenever another process holds a core (the DiT trainer
    ran ~5× faster single-threaded, the ILF trainer ~10×).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
