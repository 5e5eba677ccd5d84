"""gptlab.dist: no-op behaviour without a process group, and real collectives on two gloo processes."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from gptlab import dist as gdist


def test_single_process_helpers_are_identity(monkeypatch, capsys):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info, device = gdist.init_distributed("cpu")
    assert (info.rank, info.world_size, info.is_main, info.distributed) == (0, 1, True, False)
    assert device == torch.device("cpu") and not gdist.is_initialized()
    t = torch.tensor([1.0, 2.0])
    assert torch.equal(gdist.all_reduce_sum(t.clone()), t) and torch.equal(gdist.all_reduce_mean(t.clone()), t)
    assert gdist.all_gather_object({"a": 1}) == [{"a": 1}] and gdist.broadcast_object(5) == 5
    gdist.barrier()
    gdist.print0("hello")
    assert "hello" in capsys.readouterr().err
    gdist.destroy()


def test_missing_master_addr_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    from gptlab.errors import GptlabError

    with pytest.raises(GptlabError, match="MASTER_ADDR is not set: launch with torchrun"):
        gdist.init_distributed("cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    info, device = gdist.init_distributed("cpu")
    assert (info.rank, info.world_size, gdist.get_rank(), gdist.get_world_size()) == (rank, world, rank, world)
    s = gdist.all_reduce_sum(torch.tensor([float(rank + 1)]))
    m = gdist.all_reduce_mean(torch.tensor([float(rank + 1)]))
    mx = gdist.all_reduce_max(torch.tensor([float(rank)]))
    objs = gdist.all_gather_object({"rank": rank})
    b = gdist.broadcast_object(f"from {rank}")
    gdist.barrier()
    result = {"sum": s.item(), "mean": m.item(), "max": mx.item(), "objs": objs, "bcast": b,
              "main": gdist.is_main_process()}
    import json

    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    gdist.destroy()


def test_two_gloo_processes_collectives(tmp_path):
    world = 2
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    import json

    for r in range(world):
        res = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert res["sum"] == 3.0 and res["mean"] == 1.5 and res["max"] == 1.0
        assert res["objs"] == [{"rank": 0}, {"rank": 1}]
        assert res["bcast"] == "from 0"
        assert res["main"] is (r == 0)
