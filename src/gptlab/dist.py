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


# --------------------------------------------------------------------------- how the model is spread


class Parallel:
    """How a training model is spread over the ranks: ``single`` (one process), ``ddp`` (a full replica
    per rank, gradients all-reduced) or ``fsdp`` (FSDP2: every block sharded over the ranks).

    The one place that knows the difference: wrapping, skipping the gradient sync on all but the last
    micro-step, the gradient norm, and full (unsharded) state dicts for checkpoints.
    """

    def __init__(self, info: DistInfo, fsdp: bool = False) -> None:
        self.info = info
        self.kind = "single" if not info.distributed else "fsdp" if fsdp else "ddp"

    @property
    def sharded(self) -> bool:
        """Every rank holds a part of the weights: a forward pass needs all ranks."""
        return self.kind == "fsdp"

    def describe(self) -> str:
        return {"single": "", "ddp": " (DDP)", "fsdp": " (FSDP2)"}[self.kind]

    def wrap(self, raw: torch.nn.Module, device: torch.device, compile: bool = False) -> torch.nn.Module:
        """Shard (FSDP2) ``raw`` in place, compile, replicate (DDP); returns the module the loop calls.
        ``raw`` keeps its parameters (sharded under FSDP2): evaluation and checkpoints use it."""
        if self.kind == "fsdp":
            try:
                from torch.distributed.fsdp import fully_shard
            except ImportError:  # pragma: no cover - torch < 2.6
                from torch.distributed._composable.fsdp import fully_shard
            # Shard every block, then the root (embeddings, final norm, tied head); FSDP2 all-gathers a
            # block's parameters just before its forward and frees them after.
            for block in raw.transformer.h:
                fully_shard(block)
            fully_shard(raw)
        from gptlab.runtime import compile_for_training

        model = compile_for_training(raw, device) if compile else raw
        if self.kind == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        return model

    def sync_gradients(self, model: torch.nn.Module, raw: torch.nn.Module, last: bool) -> Any:
        """Context for one micro-step's backward: gradients are reduced over ranks only when ``last``
        (DDP ``no_sync`` / FSDP2 ``set_requires_gradient_sync``); accumulation stays local before."""
        import contextlib

        if self.kind == "fsdp":
            raw.set_requires_gradient_sync(last)
        if self.kind == "ddp" and not last:
            return model.no_sync()
        return contextlib.nullcontext()

    def clip_grad_norm(self, model: torch.nn.Module, max_norm: float) -> float:
        """Clip the global gradient norm to ``max_norm`` (``inf``: measure only); returns the norm."""
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
            norm = norm.full_tensor()
        return float(norm.item())

    def model_state_dict(self, raw: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The full weights (gathered from every rank under FSDP2: a collective, call on all ranks)."""
        if self.kind != "fsdp":
            return raw.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(raw, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def optimizer_state_dict(self, raw: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer state in its unsharded form (a collective under FSDP2)."""
        if self.kind != "fsdp":
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(raw, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_optimizer_state_dict(self, raw: torch.nn.Module, optimizer: torch.optim.Optimizer,
                                  state: dict[str, Any]) -> None:
        """Undo :meth:`optimizer_state_dict`, each rank keeping its own shard under FSDP2."""
        if self.kind != "fsdp":
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(raw, optimizer, optim_state_dict=state,
                                 options=StateDictOptions(full_state_dict=True))
