"""The state a checkpoint holds, composed of parts that each give ``state_dict()`` / ``load_state_dict()``.

:class:`CheckpointState` maps a name to a part; one loop saves every part, one loop restores every part.
Where each name lands in a checkpoint dir (``gptlab.checkpoint`` owns the files):

- ``model`` -> ``model.safetensors``; ``optimizer`` -> ``optimizer.pt``; ``rng`` -> ``rng.pt``
- ``progress`` and ``run`` -> top-level keys of ``meta.json`` (the layout every gptlab checkpoint has)
- any other name (``loaders``, ``scaler``) -> ``meta.json[name]``

A part with ``per_rank = True`` has one state per rank: the list of every rank's is saved, and each
rank restores its own entry. Every rank calls :meth:`CheckpointState.save` (gathering is collective;
under FSDP2 so is reading the weights); rank 0 writes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import torch

from gptlab import dist as gdist
from gptlab.checkpoint import (
    CheckpointError, capture_rng_state, load_model_state, load_training_state, restore_rng_state, save_checkpoint,
)
from gptlab.config import TrainConfig
from gptlab.optim import lr_factor

FILES = ("model", "optimizer", "rng")
FLAT = ("progress", "run")


class Part(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...  # not needed by a part the load always skips


class ModelPart:
    """The weights, whole (gathered from the shards under FSDP2). Restoring them is building the model:
    ``gptlab.loading.materialize`` creates it holding the checkpoint's weights (no random init first), so
    a resume passes ``skip=("model",)`` to :meth:`CheckpointState.load`."""

    def __init__(self, raw: torch.nn.Module, parallel: gdist.Parallel) -> None:
        self.raw, self.parallel = raw, parallel

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.parallel.model_state_dict(self.raw)


class OptimizerPart:
    """The optimizer's moments and step counts; this run's hyperparameters (e.g. a new lr) win on load."""

    def __init__(self, raw: torch.nn.Module, optimizer: torch.optim.Optimizer, parallel: gdist.Parallel) -> None:
        self.raw, self.optimizer, self.parallel = raw, optimizer, parallel

    def state_dict(self) -> dict[str, Any]:
        return self.parallel.optimizer_state_dict(self.raw, self.optimizer)

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state is None:
            raise CheckpointError("the checkpoint has no optimizer.pt: it holds weights only and cannot be "
                                  "resumed; start a new run with --init from it")
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        self.parallel.load_optimizer_state_dict(self.raw, self.optimizer, state)
        for g, h in zip(self.optimizer.param_groups, hyper):
            g.update(h)


class RNGPart:
    """This process's torch (CPU and CUDA), numpy and python generators."""

    per_rank = True

    def state_dict(self) -> dict[str, Any]:
        return capture_rng_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        restore_rng_state(state)


class ScalerPart:
    """fp16's GradScaler (None when it is off)."""

    def __init__(self, scaler: Any) -> None:
        self.scaler = scaler

    def state_dict(self) -> dict[str, Any] | None:
        return self.scaler.state_dict() if self.scaler.is_enabled() else None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state and self.scaler.is_enabled():
            self.scaler.load_state_dict(state)


class Prefetcher:
    """The training loader, able to fetch the next batch (and start its host-to-device copy) while the
    current one computes. Its state is the loader's *before* that fetch, so a checkpoint resumes at the
    first batch not yet trained on."""

    per_rank = True

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self._next: tuple[torch.Tensor, torch.Tensor] | None = None
        self._state_before_next: dict[str, Any] | None = None

    def prefetch(self) -> None:
        if self._next is None:
            self._state_before_next = json.loads(json.dumps(self.loader.state_dict()))
            self._next = self.loader.next_batch()

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.prefetch()
        batch, self._next = self._next, None
        assert batch is not None
        return batch

    def state_dict(self) -> dict[str, Any]:
        if self._next is not None:
            assert self._state_before_next is not None
            return self._state_before_next
        return json.loads(json.dumps(self.loader.state_dict()))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)
        self._next = self._state_before_next = None


class Progress:
    """The trainer's counters: optimizer steps done, the latest and best validation loss, the last
    checkpoint. Saved as meta.json's ``step``, ``tokens_seen``, ``val_loss``, ``best_val_loss``, ..."""

    def __init__(self, cfg: TrainConfig, world_size: int) -> None:
        self.cfg, self.world_size = cfg, world_size
        self.step = 0
        self.best_val: float | None = None
        self.last_val: float | None = None
        self.last_val_step = -1
        self.last_ckpt_step = -1

    def observe_val(self, step: int, loss: float) -> None:
        self.last_val, self.last_val_step = loss, step
        self.best_val = loss if self.best_val is None else min(self.best_val, loss)

    def state_dict(self) -> dict[str, Any]:
        cfg = self.cfg
        return {"step": self.step, "tokens_seen": self.step * cfg.batch.batch_tokens, "world_size": self.world_size,
                "lr_factor_next": lr_factor(self.step, cfg.optim, cfg.schedule.max_steps),
                "val_loss": self.last_val if self.last_val_step == self.step else None,
                "best_val_loss": self.best_val}

    def load_state_dict(self, meta: dict[str, Any]) -> None:
        self.step = self.last_ckpt_step = int(meta["step"])
        self.best_val = meta.get("best_val_loss")


class RunInfo:
    """What the run is (config, model config, tokenizer, versions): written for readers of the checkpoint
    (``gptlab sample``, ``export``, the resume rules), which are checked before the model exists."""

    def __init__(self, info: dict[str, Any]) -> None:
        self.info = info

    def state_dict(self) -> dict[str, Any]:
        return self.info

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class CheckpointState:
    """Named parts saved and restored together (see the module docstring for where each one lands)."""

    def __init__(self, parts: dict[str, Part], tied: bool) -> None:
        missing = [n for n in FILES if n not in parts]
        if missing:
            raise ValueError(f"CheckpointState needs the parts {missing}")
        self.parts, self.tied = parts, tied

    def save(self, run_dir: Path, step: int) -> Path | None:
        """Write ``checkpoints/step_NNNNNNNN`` (all ranks call this); rank 0 returns its path."""
        states = {}
        for name, part in self.parts.items():
            state = part.state_dict()
            states[name] = gdist.all_gather_object(state) if getattr(part, "per_rank", False) else state
        if not gdist.is_main_process():
            return None
        meta: dict[str, Any] = {}
        for name, state in states.items():
            if name in FLAT:
                meta.update(state)
            elif name not in FILES:
                meta[name] = state
        return save_checkpoint(run_dir, step, model_state=states["model"], tied=self.tied,
                               optimizer_state=states["optimizer"], rng_states=states["rng"], meta=meta)

    def load(self, ckpt: Path, rank: int, skip: tuple[str, ...] = ()) -> None:
        """Restore every part but ``skip`` from ``ckpt`` (this rank's entry of the per-rank ones)."""
        saved = load_training_state(ckpt)
        meta = saved["meta"]
        files = {"model": None if "model" in skip else load_model_state(ckpt), "optimizer": saved["optimizer"],
                 "rng": saved["rng"]}
        for name, part in self.parts.items():
            if name in skip:
                continue
            state = files[name] if name in FILES else meta if name in FLAT else meta.get(name)
            if getattr(part, "per_rank", False):
                if not isinstance(state, list) or len(state) <= rank:
                    raise CheckpointError(f"{ckpt}: no {name} state for rank {rank}; resume with the world size "
                                          f"it was saved with")
                state = state[rank]
            part.load_state_dict(state)
