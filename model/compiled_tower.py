"""The user tower compiled ahead of time: a ``torch.export`` program built into an AOTInductor package.

TorchScript stays the artifacts' reference format (the card's, and readable by any torch); the package
sits beside it as an optimisation. Measured (bench/export_format.py, MovieLens artifacts, one thread):
the package computes the same embeddings, biases and gates (max difference 1.2e-7) in 0.39× the
TorchScript time at batch 1 and 0.66× at batch 64. A package is machine code for one device type and
one torch version, so the manifest records both and a server that differs falls back to TorchScript.

Compiling needs a C++ compiler (Inductor's ``cpp.cxx``) and takes tens of seconds; a host without one
exports TorchScript only.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

# The batch dimension of the program is dynamic up to this many users per call.
MAX_BATCH = 4096
# The batch the program is traced with (any size within the dynamic range would do).
EXAMPLE_BATCH = 8

Tower = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def compiled_tower_file(device: str) -> str:
    return f"user_tower.{device}.pt2"


def compiler_available() -> bool:
    from torch._inductor import config

    compiler = config.cpp.cxx[0] if isinstance(config.cpp.cxx, tuple) else config.cpp.cxx
    return any(shutil.which(name) for name in (compiler, "g++", "c++", "clang++") if name)


def example_inputs(
    profile_columns: int, state_columns: int, max_history: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs of the tower's shapes: known codes (0 is a valid index of every table) and a history of
    item 1 (a real catalog item) with padding, so that every branch of the tower is traced."""
    history = torch.zeros((EXAMPLE_BATCH, max_history), dtype=torch.int64)
    history[:, : max_history // 2] = 1
    history[0] = 0  # one user without history
    return (
        torch.zeros((EXAMPLE_BATCH, profile_columns), dtype=torch.int64, device=device),
        history.to(device),
        torch.zeros((EXAMPLE_BATCH, state_columns), dtype=torch.int64, device=device),
    )


def export_program(tower: torch.nn.Module, example: tuple[torch.Tensor, ...]) -> torch.export.ExportedProgram:
    """The ``torch.export`` program of the eval-mode ``tower``, its batch dimension dynamic."""
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    with torch.no_grad():
        return torch.export.export(
            tower.eval(), tuple(example), dynamic_shapes=tuple({0: batch} for _ in example), strict=False
        )


def compile_user_tower(
    tower: torch.nn.Module, example: tuple[torch.Tensor, ...], path: Path
) -> dict[str, Any]:
    """Exports ``tower`` (on the device of ``example``) with a dynamic batch and compiles it into the
    package at ``path``; returns what the manifest records of it."""
    from torch._inductor import aoti_compile_and_package

    started = time.perf_counter()
    program = export_program(tower, example)
    with torch.no_grad():
        aoti_compile_and_package(program, package_path=str(path))
    seconds = time.perf_counter() - started
    log.info("compiled the user tower for %s in %.1fs (%s)", example[0].device.type, seconds, path.name)
    return {"file": path.name, "torch": torch.__version__, "compile_seconds": round(seconds, 1)}


def load_compiled_tower(path: Path) -> Tower:
    from torch._inductor import aoti_load_package

    return aoti_load_package(str(path))


def compatible(record: dict[str, Any], device: torch.device) -> str | None:
    """Why a compiled package cannot serve here, or None when it can."""
    if record.get("torch") != torch.__version__:
        return f"compiled with torch {record.get('torch')}, this is {torch.__version__}"
    if device.type == "cuda" and not torch.cuda.is_available():
        return "compiled for CUDA, which this host lacks"
    return None


def max_difference(first: tuple[torch.Tensor, ...], second: tuple[torch.Tensor, ...]) -> float:
    return max(float((a.float() - b.float()).abs().max()) for a, b in zip(first, second, strict=True))
