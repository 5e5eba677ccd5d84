"""Run the gptlab CLI with test faults installed through ``gptlab.hooks`` (the production code reads no
test switches). For tests that need a real process to die:

    python tests/fault_cli.py kill_at_step=10 -- train --data ...
    python -m torch.distributed.run --nproc_per_node=2 tests/fault_cli.py nan_at_step=2,nan_rank=1 -- train ...

Faults: ``kill_at_step=N`` (SIGKILL once step N is logged, before its evaluations and checkpoint),
``kill_in_save=N`` (SIGKILL once checkpoint N has written its weights and nothing else),
``nan_at_step=N`` with optional ``nan_rank=R`` (a NaN loss at step N, on rank R only), and for any other
point of :mod:`gptlab.hooks`, ``kill_on_POINT=N`` (SIGKILL the N-th time ``POINT`` fires, e.g.
``kill_on_swap_after=1``, ``kill_on_shard_written=3``).
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Callable


def install_faults(spec: str) -> Callable[[], None]:
    """Install the faults of ``spec`` (``key=N[,key=N...]``); returns a function removing them."""
    from gptlab import hooks

    f = {k: int(v) for k, v in (kv.split("=") for kv in spec.split(",") if kv)}
    removers = []

    def kill() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    if "kill_at_step" in f:
        removers.append(hooks.install("step_logged", lambda step: kill() if step == f["kill_at_step"] else None))
    if "kill_in_save" in f:
        removers.append(hooks.install("checkpoint_partial",
                                      lambda step, path: kill() if step == f["kill_in_save"] else None))
    if "nan_at_step" in f:
        def nan(value, step, rank):
            hit = step == f["nan_at_step"] and f.get("nan_rank", rank) == rank
            return value * float("nan") if hit else value

        removers.append(hooks.install("micro_loss", nan))
    for key, nth in f.items():
        if key.startswith("kill_on_"):
            seen = [0]

            def kill_nth(nth: int = nth, seen: list = seen, **info) -> None:
                seen[0] += 1
                if seen[0] == nth:
                    kill()

            removers.append(hooks.install(key[len("kill_on_"):], kill_nth))

    def remove() -> None:
        for r in removers:
            r()

    return remove


if __name__ == "__main__":
    spec, sep, *args = sys.argv[1:]
    assert sep == "--", "usage: fault_cli.py FAULTS -- gptlab arguments"
    install_faults(spec)
    from gptlab.cli import main

    sys.exit(main(args))
