"""Checkpoints are read with ``torch.load(weights_only=True)``: tensors and plain data only, so a
replaced file cannot run code when it is loaded."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from model.checkpoint import load_checkpoint


class RunsACommand:
    """What a malicious checkpoint would hold: unpickling it calls os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_holding_code_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "checkpoint.pt"
    torch.save({"name": "cold_warm_net", "payload": RunsACommand(marker)}, path)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(path)
    assert not marker.exists()
