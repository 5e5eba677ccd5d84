"""Checkpoints: atomic save, newest complete one, keep-last-K plus best, load.

Layout of ``RUN_DIR/checkpoints/step_NNNNNNNN/``:

- ``model.safetensors``: the weights (a tied ``lm_head.weight`` is stored once, as ``transformer.wte.weight``)
- ``optimizer.pt``: the optimizer's ``state_dict()``: tensors and numbers only (``torch.load(weights_only=True)``)
- ``rng.pt``: every rank's RNG states (torch CPU/CUDA as uint8 tensors, numpy, python), weights-only loadable
- ``meta.json``: step, tokens seen, config, model config, tokenizer spec, every rank's loader state, versions, git SHA
- ``COMPLETE``: written last. A directory without it is not a checkpoint (a save was interrupted).

A save writes into a hidden temporary directory, fsyncs every file, renames it into place, then writes
``COMPLETE``, so a kill at any moment leaves the previous checkpoint intact and loadable.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptlab import hooks
from gptlab.errors import GptlabError
from gptlab.fsio import fsync_dir, fsync_file

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
_STEP_RE = re.compile(r"^step_(\d{8,})$")


class CheckpointError(GptlabError):
    """No usable checkpoint where one was expected; the message says where and what to do."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def is_complete(ckpt_dir: str | os.PathLike) -> bool:
    return (Path(ckpt_dir) / COMPLETE).is_file()


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run dir, oldest step first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _STEP_RE.match(d.name)
        if m and d.is_dir() and is_complete(d):
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run dir, or None."""
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint dir from a run dir (its newest complete checkpoint) or a checkpoint dir itself."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such run or checkpoint directory")
    if (p / "meta.json").is_file() or (p / "model.safetensors").is_file():
        if not is_complete(p):
            raise CheckpointError(f"{p}: checkpoint is incomplete (no {COMPLETE} marker: its save was "
                                  f"interrupted); use an older checkpoint or the run dir")
        return p
    latest = latest_checkpoint(p)
    if latest is None:
        raise CheckpointError(f"{p}: no complete checkpoint in {p / CHECKPOINTS} "
                              f"(train longer, or check that the run saved one)")
    return latest


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- RNG state


def capture_rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors / numbers (``torch.load(weights_only=True)``-safe)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch_cpu": torch.get_rng_state(),
        "numpy": {"name": str(np_state[0]), "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": list(random.getstate()[1]) + [random.getstate()[0]],
        "python_gauss": random.getstate()[2],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Undo :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch_cpu"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    py = state["python"]
    random.setstate((py[-1], tuple(py[:-1]), state["python_gauss"]))
    if "torch_cuda" in state and torch.cuda.is_available():
        cuda = state["torch_cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


# --------------------------------------------------------------------------- save


def model_tensors(state_dict: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies for safetensors; the tied head is dropped (safetensors refuses shared storage)."""
    out = {}
    for k, v in state_dict.items():
        if tied and k == "lm_head.weight":
            continue
        out[k] = v.detach().to("cpu").contiguous()
    return out


def save_checkpoint(run_dir: str | os.PathLike, step: int, *, model_state: dict[str, torch.Tensor], tied: bool,
                    optimizer_state: dict[str, Any] | None, rng_states: list[dict[str, Any]],
                    meta: dict[str, Any]) -> Path:
    """Write ``checkpoints/step_NNNNNNNN`` atomically (call on rank 0 only); returns its path."""
    from safetensors.torch import save_file

    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    meta = {**meta, "step": step, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    save_file(model_tensors(model_state, tied), str(tmp / "model.safetensors"),
              metadata={"format": "pt", "gptlab_step": str(step)})
    fsync_file(tmp / "model.safetensors")
    hooks.fire("checkpoint_partial", step=step, path=tmp)
    if optimizer_state is not None:
        torch.save(optimizer_state, tmp / "optimizer.pt")
        fsync_file(tmp / "optimizer.pt")
    torch.save({"ranks": rng_states}, tmp / "rng.pt")
    fsync_file(tmp / "rng.pt")
    _write_json(tmp / "meta.json", meta)
    fsync_file(tmp / "meta.json")
    fsync_dir(tmp)
    old = None
    if final.exists():  # the same step saved again (e.g. an incomplete leftover): swap, then delete
        old = root / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(root)
    (final / COMPLETE).write_text(f"{step}\n", encoding="utf-8")
    fsync_file(final / COMPLETE)
    fsync_dir(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def prune_checkpoints(run_dir: str | os.PathLike, keep_last: int, keep_best: bool) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints (0 = keep all) and, with ``keep_best``,
    the one with the lowest ``val_loss`` in its meta.json; also clears leftovers of interrupted saves.
    Returns the deleted paths."""
    root = Path(run_dir) / CHECKPOINTS
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for d in root.iterdir():
        if d.name.startswith((".tmp-", ".old-")) and d.is_dir():
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    ckpts = list_checkpoints(run_dir)
    if keep_last <= 0:
        return removed
    keep = set(ckpts[-keep_last:])
    if keep_best:
        best, best_loss = None, float("inf")
        for d in ckpts:
            try:
                loss = json.loads((d / "meta.json").read_text()).get("val_loss")
            except (OSError, json.JSONDecodeError):
                continue
            if loss is not None and loss < best_loss:
                best, best_loss = d, loss
        if best is not None:
            keep.add(best)
    for d in ckpts:
        if d not in keep:
            # Remove the marker first: a half-deleted directory must never look complete.
            (d / COMPLETE).unlink(missing_ok=True)
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


# --------------------------------------------------------------------------- load


def read_meta(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    p = Path(ckpt_dir) / "meta.json"
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{p}: missing; not a gptlab checkpoint") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p}: invalid JSON ({e})") from None


def load_model_state(ckpt_dir: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    from gptlab.fsio import read_safetensors

    p = Path(ckpt_dir) / "model.safetensors"
    if not p.is_file():
        raise CheckpointError(f"{p}: missing; not a gptlab checkpoint")
    return read_safetensors(p, device=str(device))


def load_training_state(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    """Optimizer state and RNG states of a checkpoint (both loaded with ``weights_only=True``)."""
    d = Path(ckpt_dir)
    out: dict[str, Any] = {"meta": read_meta(d)}
    opt = d / "optimizer.pt"
    out["optimizer"] = torch.load(opt, map_location="cpu", weights_only=True) if opt.is_file() else None
    rng = d / "rng.pt"
    out["rng"] = torch.load(rng, map_location="cpu", weights_only=True)["ranks"] if rng.is_file() else None
    return out
