"""The process layout of training: one process, or one of the N processes that torchrun starts.

torchrun (``python -m torch.distributed.run``) gives each process RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT. ``ProcessLayout.from_env`` reads them; ``process_group`` joins the
processes (gloo on the CPU, NCCL on CUDA) for the length of a ``with`` block. Training asks
``current()`` where it stands: without a process group, that is one process of world size 1, and
nothing here communicates (every helper hands its argument back), so a plain ``coldwarm train``
runs exactly as it always has, torchrun's variables or not.

Only the layout and the collectives live here; what is sharded, synced and decided by rank 0 is
model/train.py's business.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
from torch import distributed as dist

T = TypeVar("T")
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class LayoutError(ValueError):
    """torchrun's environment variables are missing or contradict each other."""


@dataclass(frozen=True)
class ProcessLayout:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """The process that validates, decides early stopping and writes (transformers' should_save)."""
        return self.rank == 0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ProcessLayout:
        """The layout torchrun describes; one process when WORLD_SIZE is not set (or is 1)."""
        env = os.environ if environ is None else environ
        if "WORLD_SIZE" not in env:
            return cls()
        try:
            world_size = int(env["WORLD_SIZE"])
            rank = int(env.get("RANK", "0"))
            local_rank = int(env.get("LOCAL_RANK", str(rank)))
        except ValueError as error:
            raise LayoutError(f"torchrun's RANK/WORLD_SIZE/LOCAL_RANK must be integers: {error}") from error
        if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
            raise LayoutError(f"RANK={rank}, LOCAL_RANK={local_rank} do not fit WORLD_SIZE={world_size}")
        if world_size > 1:
            missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not env.get(name)]
            if missing:
                raise LayoutError(
                    f"WORLD_SIZE={world_size} without {', '.join(missing)}: launch with torchrun "
                    "(python -m torch.distributed.run) or coldwarm train --nproc N"
                )
        return cls(rank, world_size, local_rank)


def launched_by_torchrun(environ: Mapping[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return "WORLD_SIZE" in env


def backend_for(device: torch.device) -> str:
    """NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if device.type == "cuda" else "gloo"


def current() -> ProcessLayout:
    """Where this process stands: from the process group once joined, else one process alone."""
    if not (dist.is_available() and dist.is_initialized()):
        return ProcessLayout()
    return ProcessLayout(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


@contextmanager
def process_group(
    layout: ProcessLayout, device: torch.device, timeout_s: float = 1800.0
) -> Iterator[ProcessLayout]:
    """Joins the other processes of ``layout`` (from MASTER_ADDR:MASTER_PORT) for the block, and leaves.

    One process (world size 1) joins nothing. On CUDA each process takes the GPU of its LOCAL_RANK.
    ``timeout_s`` bounds every wait on another rank: the other ranks wait while rank 0 validates.
    """
    if not layout.distributed:
        yield layout
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend_for(device),
        init_method="env://",
        rank=layout.rank,
        world_size=layout.world_size,
        timeout=timedelta(seconds=timeout_s),
        device_id=device if device.type == "cuda" else None,
    )
    try:
        yield layout
    finally:
        dist.destroy_process_group()


def _wire_device() -> torch.device:
    """Where tensors must be to travel: NCCL moves CUDA tensors only."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_tensor(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank ``src``'s values in ``tensor`` (same shape and dtype on every rank), on its own device."""
    if not current().distributed:
        return tensor
    wire = tensor.detach().to(_wire_device()).contiguous()
    dist.broadcast(wire, src)
    return wire.to(tensor.device)


def broadcast_object(value: T | None, src: int = 0) -> T:
    """Rank ``src``'s picklable ``value``; the other ranks may pass None."""
    if not current().distributed:
        return value  # type: ignore[return-value]
    box: list[Any] = [value]
    dist.broadcast_object_list(box, src, device=_wire_device())
    return box[0]


@torch.no_grad()
def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Overwrites every parameter and buffer of ``module`` with rank ``src``'s, in place."""
    if not current().distributed:
        return
    for tensor in module.state_dict().values():
        tensor.copy_(broadcast_tensor(tensor, src))


def mean_over_ranks(values: list[float]) -> list[float]:
    """The mean of each value over all ranks (every rank gets the same list)."""
    layout = current()
    if not layout.distributed:
        return values
    wire = torch.tensor(values, dtype=torch.float64, device=_wire_device())
    dist.all_reduce(wire)
    return (wire / layout.world_size).tolist()


def barrier() -> None:
    if current().distributed:
        dist.barrier()
