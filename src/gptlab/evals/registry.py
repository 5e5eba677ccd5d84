"""Evaluations run during training, as a registry: the trainer runs every registered eval that is due.

An eval is a small class, registered with ``@register``:

- ``name``: the ``kind`` of its records in ``metrics.jsonl`` (``val``, ``hellaswag``, ``sample``); the
  name ``gptlab plot`` and ``gptlab eval`` know it by.
- ``every_key``: the ``[eval]`` config field holding its interval in steps (0: off), or override the
  classmethod ``every(cfg) -> int``. Like every eval it also runs after the last step.
- ``__init__(self, ctx)``: set-up, once, only when the interval is not 0 (open a loader, load a file).
- ``run(self, model, ctx) -> list[dict]``: one evaluation of ``model`` (the raw model: not compiled, not
  DDP-wrapped, but sharded under FSDP2) at step ``ctx.step``; returns its records, to which the trainer
  adds ``kind`` and ``step``. It must leave ``model`` in training mode.
- ``report(self, records) -> str | None``: the line printed after it.
- ``describe(self) -> str | None``: a few words for the start-up banner (optional).
- ``main_only``: True when rank 0 alone runs it; False when every rank must (it uses collectives). With
  a sharded model every rank runs every eval (a forward pass needs all of them).

Either ``__init__`` or ``run`` may raise :class:`EvalOff`: the trainer prints ``warning: <message>`` and
stops running that eval (a missing HellaSwag file must not end a long run).

Outside training the same class may serve two commands, which iterate the registry too:

- ``gptlab eval COMMAND``: set ``command`` (and ``command_help``), declare the flags in the classmethod
  ``add_arguments(parser)`` and evaluate in the classmethod ``run_cli(args) -> dict`` (the ``--json``
  object); ``cli_report(result, args)`` is the line printed without ``--json``.
- ``gptlab plot``: ``curves`` names the record fields drawn (:class:`Curve`): a curve with a ``metric``
  is a ``--metric`` choice of the first panel, any other gets a panel of its own; ``plot_summary`` names
  the per-run numbers of ``plot --json``.

Eval modules import no torch at import time (only inside functions), so building the parsers for
``--help`` can import them all.

Adding an eval (e.g. ``chat_eval``): write its class in a module under ``gptlab/evals/`` with
``@register``, add the module to :data:`MODULES` (the position there is the order evals run within a
step and their records' order in ``metrics.jsonl``), and add its ``every_key`` field to
``EvalConfig`` in ``config.py`` (or override ``every``). The trainer, ``commands/eval.py`` and ``plot.py``
need no change.

Why here and not in the trainer: each eval's set-up, state (a loader, cached examples, an off switch)
and console line are its own; the trainer only knows "name, interval, run".
"""

from __future__ import annotations

import argparse
import functools
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, TypeVar

from gptlab.errors import GptlabError

if TYPE_CHECKING:  # the registry itself imports no torch
    import torch

    from gptlab.config import TrainConfig
    from gptlab.dist import DistInfo, Parallel

# Modules whose import registers the in-training evals, in the order they run within a step.
MODULES: tuple[str, ...] = ("gptlab.evals.loss", "gptlab.evals.hellaswag", "gptlab.evals.samples", "gptlab.evals.chat")

_REGISTRY: dict[str, type[Eval]] = {}


class EvalOff(GptlabError):
    """This eval cannot run in this training run; the message says why (printed as a warning)."""


@dataclass
class EvalContext:
    """What an eval may use; the trainer fills it once and updates ``step`` before each evaluation."""

    cfg: TrainConfig
    info: DistInfo
    parallel: Parallel
    device: torch.device
    dtype: torch.dtype
    data_dir: Path
    run_dir: Path
    tokenizer: Any | None
    step: int = 0

    def amp(self) -> Any:
        """Autocast as the trainer uses it (bf16 / fp16 on GPUs, nothing in fp32)."""
        from gptlab.runtime import autocast

        return autocast(self.device, self.dtype)


@dataclass(frozen=True)
class Curve:
    """A record field that ``gptlab plot`` draws, one series per run (a repeated step keeps its last value)."""

    field: str
    ylabel: str
    title: str
    # A --metric choice: the curve goes in the first panel (beside the train loss when the metric is
    # "loss"); None: a panel of its own.
    metric: str | None = None
    help: str = ""  # of a --metric choice, in ``gptlab plot --help``
    # A record without the field is skipped silently (an older run, no tokenizer), not counted as garbled.
    optional: bool = False
    missing: str = ""  # why a --metric choice may have no records, for the error when no run has any
    chance: float | None = None  # a "random" line (own panel)
    baselines: tuple[tuple[float, str, str], ...] = ()  # (value, label, color) lines (own panel)
    empty: str | None = None  # own panel: drawn even without records, with this note


class Eval:
    """Base of the in-training evals (see the module docstring)."""

    name: ClassVar[str]
    every_key: ClassVar[str]
    main_only: ClassVar[bool] = False
    command: ClassVar[str | None] = None  # gptlab eval COMMAND (None: no command)
    command_help: ClassVar[str] = ""
    report_to_stderr: ClassVar[bool] = False  # where cli_report's line goes without --json
    curves: ClassVar[tuple[Curve, ...]] = ()
    # plot --json per-run numbers: key -> "last" | "min" | "max" of the series drawn
    plot_summary: ClassVar[dict[str, str]] = {}

    def __init__(self, ctx: EvalContext) -> None:
        pass

    def run(self, model: Any, ctx: EvalContext) -> list[dict[str, Any]]:
        raise NotImplementedError

    def report(self, records: list[dict[str, Any]]) -> str | None:
        return None

    def describe(self) -> str | None:
        """A few words for the start-up banner (e.g. ``val 20 batches/eval``), or None."""
        return None

    @classmethod
    def every(cls, cfg: TrainConfig) -> int:
        """The interval in steps (0: off), from ``cfg.eval``."""
        return int(getattr(cfg.eval, cls.every_key))

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """The flags of ``gptlab eval COMMAND`` (build them without importing torch)."""

    @classmethod
    def run_cli(cls, args: argparse.Namespace) -> dict[str, Any]:
        """``gptlab eval COMMAND``: evaluate the model ``args`` name; the result is the ``--json`` object."""
        raise NotImplementedError

    @classmethod
    def cli_report(cls, result: dict[str, Any], args: argparse.Namespace) -> str:
        """The line ``gptlab eval COMMAND`` prints without ``--json``."""
        return " ".join(f"{k} {v}" for k, v in result.items())


def register(cls: type[Eval]) -> type[Eval]:
    """Class decorator: make ``cls`` an in-training eval under ``cls.name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"eval {cls.name!r} is registered twice ({_REGISTRY[cls.name].__module__}, {cls.__module__})")
    _REGISTRY[cls.name] = cls
    return cls


def registered() -> list[type[Eval]]:
    """Every in-training eval, in the order of :data:`MODULES`."""
    for mod in MODULES:
        importlib.import_module(mod)
    order = {m: i for i, m in enumerate(MODULES)}
    return sorted(_REGISTRY.values(), key=lambda c: order.get(c.__module__, len(order)))


def curve(cls: type[Eval], metric: str) -> Curve | None:
    """The curve ``cls`` draws in a plot of ``metric``: its curve for that metric, else its own-panel curve."""
    mine = [c for c in cls.curves if c.metric == metric] or [c for c in cls.curves if c.metric is None]
    return mine[0] if mine else None


F = TypeVar("F", bound=Callable[..., Any])


def no_grad(fn: F) -> F:
    """``torch.no_grad()`` as a decorator that imports torch only when ``fn`` is called (eval modules stay
    importable without torch)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def due(step: int, every: int, last: bool) -> bool:
    """An interval of ``every`` steps is due after ``step`` (or after the last step); 0 is never."""
    return bool(every) and (step % every == 0 or last)
