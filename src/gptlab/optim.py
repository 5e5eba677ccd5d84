"""Parameter groups, the optimizer (AdamW, fused on CUDA and CPU; or Muon) and the learning-rate schedule.

The schedule is a pure function of the step, so a resumed run needs nothing but the step number.
**Step convention** (as build-nanogpt): ``step`` counts optimizer steps from 0, i.e. the first update uses
``lr_at(0)``; the metrics log numbers that same update step 1. Warmup is linear from ``lr / warmup_steps``
at step 0 to ``lr`` at step ``warmup_steps - 1``; the decay reaches its floor at ``decay_steps`` and stays there.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
import torch.nn as nn

from gptlab.config import ConfigError, OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: tensors with ``dim >= 2`` (matmul weights, embeddings) decay; biases and norm
    gains do not (build-nanogpt / GPT-3 practice). Tied weights appear once."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():  # named_parameters() de-duplicates tied tensors
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def describe_groups(groups: list[dict[str, Any]]) -> str:
    """One line per group: name, tensor count, parameter count, weight decay."""
    lines = []
    for i, g in enumerate(groups):
        n = sum(p.numel() for p in g["params"])
        lines.append(f"param group {g.get('name', i)}: {len(g['params'])} tensors, {n:,} params, "
                     f"weight_decay {g.get('weight_decay', 0.0)}")
    return "\n".join(lines)


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device | str = "cpu"
                    ) -> tuple[torch.optim.Optimizer, str]:
    """The optimizer for ``cfg.optimizer`` and a human summary of its parameter groups.

    Every group gets a ``base_lr`` (its peak learning rate); :func:`set_lr` scales it by the schedule.
    """
    device = torch.device(device)
    if cfg.optimizer == "muon":
        try:
            from gptlab.muon import build_muon_optimizer
        except ImportError as e:
            raise ConfigError(f"optim.optimizer='muon' needs gptlab.muon, which failed to import: {e}") from None
        opt = build_muon_optimizer(model, cfg)
        groups = opt.param_groups
    else:
        groups = param_groups(model, cfg.weight_decay)
        kwargs: dict[str, Any] = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
        # The fused kernel does the whole update in one pass per tensor list (CUDA, and CPU since torch 2.4);
        # results match the loop implementation to rounding (6e-8 measured), and on CPU it made the
        # optimizer step 7x faster (BENCHMARKS.md), so it is on wherever it exists.
        if cfg.fused and device.type in ("cuda", "cpu") and "fused" in inspect.signature(torch.optim.AdamW).parameters:
            kwargs["fused"] = True
        opt = torch.optim.AdamW(groups, **kwargs)
        groups = opt.param_groups
    for g in opt.param_groups:
        g.setdefault("base_lr", g["lr"])
    return opt, describe_groups(groups)


def lr_factor(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based), in [final/peak, 1]."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    floor = cfg.final_lr / cfg.lr if cfg.lr > 0 else 1.0
    warmup = cfg.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    if cfg.decay == "constant":
        return 1.0
    end = cfg.decay_steps or max_steps
    if step >= end:
        return floor
    if cfg.decay == "wsd":
        # warmup-stable-decay: hold the peak, then a linear cooldown over the last wsd_decay_frac of `end`.
        start = max(warmup, end - round(cfg.wsd_decay_frac * end))
        if step < start:
            return 1.0
        frac = (step - start) / max(1, end - start)
        return 1.0 - frac * (1.0 - floor)
    frac = (step - warmup) / max(1, end - warmup)  # 0 right after warmup, -> 1 at `end`
    if cfg.decay == "linear":
        return 1.0 - frac * (1.0 - floor)
    coeff = 0.5 * (1.0 + math.cos(math.pi * frac))  # cosine: 1 -> 0
    return floor + coeff * (1.0 - floor)


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Learning rate of the main (AdamW) group at optimizer step ``step`` (0-based)."""
    return cfg.lr * lr_factor(step, cfg, max_steps)


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Scale every group's ``base_lr`` by the schedule factor."""
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * factor
