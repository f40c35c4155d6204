"""torch.distributed helpers for ``torchrun --nproc-per-node N madseg score ...``.

``init_distributed(device)`` reads the torchrun environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``) and joins the process
group — gloo on CPU, NCCL when the device is CUDA. Without that environment it returns a
single-process context and every helper is a no-op, so the same code runs both ways.

``MADSEG_DIST_TIMEOUT_S`` (default 86400) bounds how long a rank waits at a barrier for the
others (scoring phases can be long).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch

from ml_backend.errors import MadsegError


@dataclass
class DistContext:
    """Where this process sits: ``rank`` of ``world``, ``local_rank`` on its machine."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    backend: str | None = None
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def single_host(self) -> bool:
        """All ranks run on this machine (then SQLite WAL is safe on the store)."""
        return self.local_world == self.world

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        raise MadsegError(f"environment variable {name}={os.environ[name]!r} is not an integer") from None


def init_distributed(device: str | None = None) -> DistContext:
    """Join the torchrun process group if this process was started by torchrun."""
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistContext()
    import torch.distributed as dist

    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    wants_cuda = device is None or str(device).startswith("cuda") or device == "auto"
    wants_cuda = wants_cuda and torch.cuda.is_available()
    backend = "nccl" if wants_cuda else "gloo"
    owns = False
    if not dist.is_initialized():
        if wants_cuda:
            torch.cuda.set_device(local_rank)
        timeout = datetime.timedelta(seconds=_env_int("MADSEG_DIST_TIMEOUT_S", 86400))
        dist.init_process_group(backend=backend, timeout=timeout)
        owns = True
    return DistContext(rank, world, local_rank, local_world, backend, owns)


def rank_device(ctx: DistContext, device: str | None) -> str | None:
    """The device this rank should use: ``cuda:<local_rank>`` when CUDA is used, else ``device``."""
    if ctx.backend == "nccl" and (device is None or device in ("auto", "cuda")):
        return f"cuda:{ctx.local_rank}"
    return device


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        import torch.distributed as dist

        if ctx.backend == "nccl":
            dist.barrier(device_ids=[ctx.local_rank])
        else:
            dist.barrier()


def broadcast_object(ctx: DistContext, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not ctx.enabled:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(ctx: DistContext, obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (on every rank)."""
    if not ctx.enabled:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * ctx.world
    dist.all_gather_object(out, obj)
    return out


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and ctx.owns_group:
        import torch.distributed as dist

        dist.destroy_process_group()
