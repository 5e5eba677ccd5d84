"""Named points where tests inject faults (a crash, a NaN loss, a full disk); no environment reads.

Production code marks a few points with :func:`fire` (an event) or :func:`apply` (a value a hook may
replace); with nothing installed each is one dict lookup. Tests install hooks in-process with
:func:`install` (and remove them with the function it returns), or run the CLI in a subprocess through
``tests/fault_cli.py``, which installs one and then calls ``gptlab.cli.main``.

Points (keyword arguments the hooks receive):

- ``step_logged`` (step): step ``step`` is in metrics.jsonl; its evaluations and checkpoint are not done.
- ``checkpoint_partial`` (step, path): a checkpoint save has written the weights file and nothing else.
- ``micro_loss`` (value, step, rank) -> loss: a micro-step's loss just before its backward.
- ``file_write`` (path): a durable writer (:class:`gptlab.fsio.HashingWriter`) is about to write a chunk of
  ``path``; a hook raising ``OSError(ENOSPC)`` is a full disk.
- ``checkpoint_renamed`` (path): a checkpoint dir is in place but has no ``COMPLETE`` yet.
- ``checkpoint_pruning`` (path): pruning has renamed a checkpoint aside and not yet deleted it.
- ``shard_written`` (path): ``prepare`` has written one shard into its build dir beside ``--out``.
- ``swap_before`` / ``swap_between`` / ``swap_after`` (path): a directory replace (``prepare``, ``export``)
  is about to swap, is between the two renames of the no-exchange fallback, has swapped.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable

POINTS = ("step_logged", "checkpoint_partial", "micro_loss", "file_write", "checkpoint_renamed", "checkpoint_pruning",
          "shard_written", "swap_before", "swap_between", "swap_after")
_HOOKS: dict[str, list[Callable[..., Any]]] = defaultdict(list)


def install(point: str, fn: Callable[..., Any]) -> Callable[[], None]:
    """Call ``fn`` at ``point`` from now on; returns a function that removes it again."""
    if point not in POINTS:
        raise ValueError(f"hook point {point!r}: unknown (points: {', '.join(POINTS)})")
    _HOOKS[point].append(fn)
    return lambda: _HOOKS[point].remove(fn)


def fire(point: str, **info: Any) -> None:
    """Run the hooks installed at ``point``."""
    for fn in _HOOKS.get(point, ()):
        fn(**info)


def apply(point: str, value: Any, **info: Any) -> Any:
    """``value`` passed through the hooks installed at ``point`` (each returns the new value)."""
    for fn in _HOOKS.get(point, ()):
        value = fn(value=value, **info)
    return value
