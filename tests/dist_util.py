"""Helper for tests that compare a distributed run with one process: run a function on N gloo ranks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable


def _rank_main(rank: int, world: int, out_dir: str, fn: Callable[..., Any], args: tuple) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{out_dir}/init", rank=rank, world_size=world)
    try:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(fn(*args)))
    finally:
        dist.destroy_process_group()


def run_on_gloo_ranks(fn: Callable[..., Any], world: int, out_dir: Path, *args: Any) -> list[Any]:
    """``fn(*args)`` in ``world`` spawned processes joined in a gloo process group; each rank's JSON-able
    return value, in rank order. ``fn`` must be a module-level function (it is pickled by name)."""
    import torch.multiprocessing as mp

    mp.spawn(_rank_main, args=(world, str(out_dir), fn, args), nprocs=world, join=True)
    return [json.loads((Path(out_dir) / f"rank{rank}.json").read_text()) for rank in range(world)]
