"""Everything ``torch.distributed``: setup from the torchrun environment, rank queries, collectives.

Every helper is a no-op (or the identity) without a process group, so single-process code calls them freely.
Under ``torchrun`` (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT set): NCCL on CUDA, gloo on CPU,
one GPU per local rank. Only rank 0 writes files and prints.
"""

from __future__ import annotations

import datetime
import gc
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from gptlab.errors import GptlabError


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global rank, rank on its node, number of processes."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_info() -> DistInfo:
    """Rank info from torchrun's environment variables (single process when they are absent)."""
    try:
        return DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
                        int(os.environ.get("WORLD_SIZE", 1)))
    except ValueError as e:
        raise GptlabError(f"RANK / LOCAL_RANK / WORLD_SIZE must be integers (set by torchrun): {e}") from None


def init_distributed(device: str = "auto", timeout_minutes: float = 30.0) -> tuple[DistInfo, torch.device]:
    """Join the process group when launched by torchrun; pick this rank's device.

    ``device``: "auto", "cpu", "cuda", "cuda:N", "mps". Under torchrun with CUDA every rank takes
    ``cuda:LOCAL_RANK``. Returns (info, device). Calling it twice is harmless.
    """
    from gptlab.runtime import resolve_device

    info = env_info()
    dev = resolve_device(device)
    if dev.type == "cuda" and (info.distributed or dev.index is None):
        dev = torch.device("cuda", info.local_rank if info.distributed else (dev.index or 0))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if info.distributed and not dist.is_initialized():
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if var not in os.environ:
                raise GptlabError(f"WORLD_SIZE={info.world_size} but {var} is not set: launch with torchrun")
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = dict(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
        if backend == "nccl":
            kwargs["device_id"] = dev  # binds the communicator eagerly; avoids a guessed device
        dist.init_process_group(**kwargs)
    return info, dev


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def print0(*args: Any, file: Any = None, **kwargs: Any) -> None:
    """``print`` on rank 0 only, to stderr by default (stdout is kept for --json output)."""
    if is_main_process():
        print(*args, file=file or sys.stderr, flush=True, **kwargs)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (and return it)."""
    if is_initialized() and get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average ``tensor`` over ranks in place (and return it)."""
    if is_initialized() and get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(get_world_size())
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    if is_initialized() and get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (JSON-like: loader states, RNG states), in rank order."""
    if not (is_initialized() and get_world_size() > 1):
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not (is_initialized() and get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if is_initialized() and get_world_size() > 1:
        dist.barrier()


def destroy() -> None:
    """Leave the process group (safe to call when there is none)."""
    if is_initialized():
        # FSDP2 modules sit in reference cycles that may still hold gloo work objects; collect them while
        # the group and the interpreter are alive, or their destruction at interpreter exit can abort the
        # process ("terminate called without an active exception", seen once in CI on gloo).
        gc.collect()
        dist.destroy_process_group()
