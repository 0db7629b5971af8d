"""Helpers shared by the model tests (training-heavy fixtures)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Trains the tests' tiny models on one intra-op thread, restoring the setting afterwards.

    The models are too small to gain from two threads, and on a shared 2-core machine two spinning
    OpenMP threads slow training down many times over whenever another process takes a core.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
