"""The one timing harness: warm-up, alternating rounds, per-call times, medians.

Every benchmark (``gptlab.bench``) and the CPU kernel choice (``gptlab.kernels``) time their contenders
with :func:`alternate`: each contender is warmed up, then the rounds run A, B, A, B ..., so a noisy,
shared machine slows every contender alike, and figures are medians of per-call times. ``sync`` is
called before and after every timed call (``torch.cuda.synchronize`` on a GPU); nothing else in the
timed region talks to the host.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence


@dataclass
class Timings:
    """What :func:`alternate` measured, per contender name."""

    seconds: dict[str, list[float]] = field(default_factory=dict)  # one entry per timed call
    last: dict[str, Any] = field(default_factory=dict)  # what the last timed call returned
    warmup_s: dict[str, float] = field(default_factory=dict)

    def median(self, name: str) -> float:
        return statistics.median(self.seconds[name])

    def best(self, name: str) -> float:
        """The fastest call: on a shared machine interference only ever adds time, so the minimum is what
        to compare when the question is which contender is faster, not how fast a run will be."""
        return min(self.seconds[name])

    def summary(self, name: str) -> dict[str, float]:
        """Milliseconds per call: median, mean, min, max (the JSON figures of every bench)."""
        t = self.seconds[name]
        return {"median_ms": 1e3 * statistics.median(t), "mean_ms": 1e3 * statistics.fmean(t),
                "min_ms": 1e3 * min(t), "max_ms": 1e3 * max(t)}


def alternate(contenders: dict[str, Callable[[], Any]], *, rounds: int = 1, calls: int | Sequence[int] = 1,
              warmup: int = 1, warmup_fns: dict[str, Callable[[], Any]] | None = None,
              sync: Callable[[], None] = lambda: None, around: Callable[[str, str], None] | None = None,
              on_round: Callable[[int, Timings], None] | None = None) -> Timings:
    """Time every contender: ``warmup`` untimed calls each (of ``warmup_fns[name]`` when given), then
    ``rounds`` rounds in which each contender in turn makes ``calls`` timed calls (or ``calls[r]`` in
    round r). ``around(name, "start" | "end")`` brackets each contender's warm-up and each of its rounds
    (peak-memory counters); ``on_round(r, timings)`` follows every round (progress lines)."""
    out = Timings({n: [] for n in contenders})
    hook = around or (lambda name, when: None)
    for name, fn in contenders.items():
        hook(name, "start")
        warm = (warmup_fns or {}).get(name, fn)
        t0 = time.perf_counter()
        for _ in range(warmup):
            warm()
        sync()
        out.warmup_s[name] = time.perf_counter() - t0
        hook(name, "end")
    per_round = [calls] * rounds if isinstance(calls, int) else list(calls)
    for r, n in enumerate(per_round):
        for name, fn in contenders.items():
            hook(name, "start")
            for _ in range(n):
                sync()
                t0 = time.perf_counter()
                res = fn()
                sync()
                out.seconds[name].append(time.perf_counter() - t0)
                out.last[name] = res
            hook(name, "end")
        if on_round is not None and n:
            on_round(r, out)
    return out


def split_calls(total: int, rounds: int) -> list[int]:
    """``total`` calls spread over ``rounds`` rounds as evenly as possible (earlier rounds take the rest)."""
    return [total // rounds + (1 if r < total % rounds else 0) for r in range(rounds)]
