"""Checkpoints: atomic save, newest complete one, keep-last-K plus best, load.

Layout of ``RUN_DIR/checkpoints/step_NNNNNNNN/``:

- ``model.safetensors``: the weights (a tied ``lm_head.weight`` is stored once, as ``transformer.wte.weight``)
- ``optimizer.pt``: the optimizer's ``state_dict()``: tensors and numbers only (``torch.load(weights_only=True)``)
- ``rng.pt``: every rank's RNG states (torch CPU/CUDA as uint8 tensors, numpy, python), weights-only loadable
- ``meta.json``: step, tokens seen, config, model config, tokenizer spec, every rank's loader state, versions, git SHA
- ``checksums.json``: SHA-256 and size of every file above (absent in checkpoints from before it existed)
- ``COMPLETE``: written last; its first line is the step, its second the SHA-256 of ``checksums.json``.
  A directory without it is not a checkpoint (a save was interrupted).

A save writes into a hidden temporary directory, fsyncs every file, renames it into place, then writes
``COMPLETE``, so a kill at any moment leaves the previous checkpoint intact and loadable. Every read
verifies the bytes it read against ``checksums.json`` (hashing the buffer it parses), and readers of a
run dir fall back to the newest checkpoint that verifies. A reader *pins* the checkpoint it reads (a
shared ``flock`` on its ``COMPLETE``): pruning skips a pinned checkpoint, and a reader never reads one
that pruning has begun to delete.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from gptlab import hooks
from gptlab.errors import GptlabError
from gptlab.fsio import HashingWriter, fsync_dir, write_file

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
CHECKSUMS = "checksums.json"
CHECKSUMS_FORMAT = "gptlab-checkpoint-checksums"
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


def _nbytes(obj: Any) -> int:
    """Bytes of the tensors inside ``obj`` (what a save of it needs on disk, roughly)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 8


def _torch_save(obj: Any, path: Path) -> str:
    """``torch.save`` through a hashing writer: returns the SHA-256; a full disk is a :class:`DiskError`."""
    with HashingWriter(path, _nbytes(obj) + 4096) as w:
        torch.save(obj, w)
    return w.hexdigest()


def save_checkpoint(run_dir: str | os.PathLike, step: int, *, model_state: dict[str, torch.Tensor], tied: bool,
                    optimizer_state: dict[str, Any] | None, rng_states: list[dict[str, Any]],
                    meta: dict[str, Any]) -> Path:
    """Write ``checkpoints/step_NNNNNNNN`` atomically (call on rank 0 only); returns its path."""
    from safetensors.torch import save as st_save

    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        meta = {**meta, "step": step, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        sums: dict[str, dict[str, Any]] = {}

        def put(name: str, digest: str) -> None:
            sums[name] = {"sha256": digest, "bytes": (tmp / name).stat().st_size}

        weights = st_save(model_tensors(model_state, tied), metadata={"format": "pt", "gptlab_step": str(step)})
        put("model.safetensors", write_file(tmp / "model.safetensors", weights))
        del weights
        hooks.fire("checkpoint_partial", step=step, path=tmp)
        if optimizer_state is not None:
            put("optimizer.pt", _torch_save(optimizer_state, tmp / "optimizer.pt"))
        put("rng.pt", _torch_save({"ranks": rng_states}, tmp / "rng.pt"))
        put("meta.json", write_file(tmp / "meta.json", (json.dumps(meta, indent=2) + "\n").encode("utf-8")))
        sums_sha = write_file(tmp / CHECKSUMS, (json.dumps({"format": CHECKSUMS_FORMAT, "version": 1, "files": sums},
                                                           indent=2) + "\n").encode("utf-8"))
        fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed save leaves nothing behind
        raise
    old = None
    if final.exists():  # the same step saved again (e.g. an incomplete leftover): swap, then delete
        old = root / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(root)
    hooks.fire("checkpoint_renamed", path=final)
    write_file(final / COMPLETE, f"{step}\n{CHECKSUMS} {sums_sha}\n".encode("utf-8"))
    fsync_dir(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _try_delete(d: Path) -> bool:
    """Delete a complete checkpoint unless a reader has it pinned (then keep it; the next prune retries)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - no flock: delete as before
        fcntl = None  # type: ignore[assignment]
    marker = d / COMPLETE
    try:
        fd = os.open(marker, os.O_RDONLY)
    except FileNotFoundError:
        fd = -1
    try:
        if fd >= 0 and fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    return False
                raise
        # The marker goes first, while locked: a half-deleted directory must never look complete, and a
        # reader that pins after this sees the marker gone.
        marker.unlink(missing_ok=True)
    finally:
        if fd >= 0:
            os.close(fd)
    gone = d.parent / f".del-{d.name}-{os.getpid()}"
    os.rename(d, gone)
    hooks.fire("checkpoint_pruning", path=gone)
    shutil.rmtree(gone, ignore_errors=True)
    return True


def prune_checkpoints(run_dir: str | os.PathLike, keep_last: int, keep_best: bool,
                      protect: Path | None = None) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints (0 = keep all) and, with ``keep_best``,
    the one with the lowest ``val_loss`` in its meta.json; also clears leftovers of interrupted saves and
    deletions (hidden dirs, ``step_*`` dirs without ``COMPLETE``). Call with the run dir's lock held.
    A checkpoint a reader has pinned, and ``protect``, are kept. Returns the deleted paths."""
    root = Path(run_dir) / CHECKPOINTS
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for d in root.iterdir():
        stale = d.name.startswith((".tmp-", ".old-", ".del-")) or (_STEP_RE.match(d.name) and not is_complete(d))
        if stale and d.is_dir():
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    ckpts = list_checkpoints(run_dir)
    if keep_last <= 0:
        return removed
    keep = set(ckpts[-keep_last:])
    if protect is not None:
        keep.add(Path(protect))
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
        if d not in keep and _try_delete(d):
            removed.append(d)
    return removed


# --------------------------------------------------------------------------- load


@contextlib.contextmanager
def pinned(ckpt_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold a checkpoint so pruning cannot delete it while it is read (a shared flock on ``COMPLETE``).

    Raises :class:`CheckpointError` when it is not complete or is being deleted (a reader then tries the
    next newest); never blocks.
    """
    d = Path(ckpt_dir)
    marker = d / COMPLETE
    try:
        fd = os.open(marker, os.O_RDONLY)
    except FileNotFoundError:
        raise CheckpointError(f"{d}: not a complete checkpoint (no {COMPLETE}: its save was interrupted, or it "
                              f"was deleted)") from None
    try:
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except ImportError:  # pragma: no cover - no flock (Windows)
            pass
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise CheckpointError(f"{d}: being deleted by the training run that owns it") from None
            raise
        try:
            same = os.stat(marker).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            raise CheckpointError(f"{d}: was deleted while being opened (the training run pruned it)")
        yield d
    finally:
        os.close(fd)


def read_checksums(ckpt_dir: str | os.PathLike) -> dict[str, dict[str, Any]] | None:
    """The verified ``{file: {"sha256", "bytes"}}`` of a checkpoint; None for one saved before checksums."""
    d = Path(ckpt_dir)
    p = d / CHECKSUMS
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        try:
            marker = (d / COMPLETE).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            marker = ""
        if CHECKSUMS in marker:
            raise CheckpointError(f"{p}: missing although {COMPLETE} names it; the checkpoint is damaged") from None
        return None
    try:
        lines = (d / COMPLETE).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{d / COMPLETE}: unreadable ({e})") from None
    want = next((ln.split()[1] for ln in lines if ln.startswith(CHECKSUMS + " ") and len(ln.split()) == 2), None)
    if want != hashlib.sha256(raw).hexdigest():
        raise CheckpointError(f"{p}: does not match the sha256 recorded in {COMPLETE}; the checkpoint is damaged")
    try:
        data = json.loads(raw)
        files = data["files"]
        assert data.get("format") == CHECKSUMS_FORMAT and isinstance(files, dict)
    except (ValueError, KeyError, AssertionError, TypeError):
        raise CheckpointError(f"{p}: not a gptlab checksums file") from None
    return files


def read_verified(ckpt_dir: str | os.PathLike, name: str, sums: dict[str, Any] | None = None,
                  *, required: bool = True) -> bytes | None:
    """The bytes of one checkpoint file, checked against ``checksums.json`` as they are read.

    ``sums`` is :func:`read_checksums`'s result (read here when None). A missing file is a
    :class:`CheckpointError` (or None when ``required`` is False and the checkpoint never had it).
    """
    d = Path(ckpt_dir)
    if sums is None:
        sums = read_checksums(d)
    p = d / name
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        if not required and (sums is None or name not in sums):
            return None
        raise CheckpointError(f"{p}: missing; the checkpoint is incomplete or damaged") from None
    except OSError as e:
        raise CheckpointError(f"{p}: unreadable ({e.strerror or e})") from None
    if sums is not None:
        entry = sums.get(name)
        if entry is None:
            raise CheckpointError(f"{p}: not listed in {CHECKSUMS}; the checkpoint is damaged")
        if len(data) != entry.get("bytes") or hashlib.sha256(data).hexdigest() != entry.get("sha256"):
            raise CheckpointError(f"{p}: sha256 does not match {CHECKSUMS} ({len(data)} bytes, "
                                  f"{entry.get('bytes')} expected): the file changed or is corrupt")
    return data


def verify_checkpoint(ckpt_dir: str | os.PathLike) -> None:
    """Check every file ``checksums.json`` lists (raises :class:`CheckpointError` naming the first bad one)."""
    sums = read_checksums(ckpt_dir)
    if sums is None:
        return
    for name in sums:
        read_verified(ckpt_dir, name, sums)


def read_meta(ckpt_dir: str | os.PathLike, sums: dict[str, Any] | None = None) -> dict[str, Any]:
    p = Path(ckpt_dir) / "meta.json"
    if not p.is_file() and not (Path(ckpt_dir) / CHECKSUMS).is_file():
        raise CheckpointError(f"{p}: missing; not a gptlab checkpoint")
    raw = read_verified(ckpt_dir, "meta.json", sums)
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{p}: invalid JSON ({e})") from None


def load_model_state(ckpt_dir: str | os.PathLike, device: str | torch.device = "cpu",
                     sums: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    from safetensors.torch import load as st_load

    p = Path(ckpt_dir) / "model.safetensors"
    if not p.is_file() and not (Path(ckpt_dir) / CHECKSUMS).is_file():
        raise CheckpointError(f"{p}: missing; not a gptlab checkpoint")
    raw = read_verified(ckpt_dir, "model.safetensors", sums)
    try:
        state = st_load(raw)
    except Exception as e:  # safetensors raises its own error type for a damaged header
        raise CheckpointError(f"{p}: unreadable safetensors file ({str(e).splitlines()[0] if str(e) else e})") from None
    if str(device) != "cpu":
        state = {k: v.to(device) for k, v in state.items()}
    return state


def _torch_load(raw: bytes, path: Path) -> Any:
    try:
        return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                              ) from None


def load_training_state(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    """Meta, weights, optimizer state and RNG states of a checkpoint, every file verified as it is read
    (``torch.load(weights_only=True)``). Raises :class:`CheckpointError` naming the first bad file."""
    d = Path(ckpt_dir)
    sums = read_checksums(d)
    out: dict[str, Any] = {"meta": read_meta(d, sums)}
    out["model"] = load_model_state(d, "cpu", sums)
    opt = read_verified(d, "optimizer.pt", sums, required=sums is not None)
    out["optimizer"] = _torch_load(opt, d / "optimizer.pt") if opt is not None else None
    rng = read_verified(d, "rng.pt", sums)
    rng_obj = _torch_load(rng, d / "rng.pt")
    if not isinstance(rng_obj, dict) or "ranks" not in rng_obj:
        raise CheckpointError(f"{d / 'rng.pt'}: not a gptlab RNG file")
    out["rng"] = rng_obj["ranks"]
    return out


def candidates(run_dir: str | os.PathLike, step: int | None = None) -> list[Path]:
    """Complete checkpoints to try, newest first (only ``step`` when given)."""
    ckpts = list_checkpoints(run_dir)[::-1]
    if step is None:
        return ckpts
    want = [c for c in ckpts if c.name == step_dir_name(step)]
    if not want:
        have = ", ".join(str(int(c.name[5:])) for c in ckpts[::-1]) or "none"
        raise CheckpointError(f"{run_dir}: no complete checkpoint for step {step} (complete: {have})")
    return want


def load_newest(run_dir: str | os.PathLike, load: Callable[[Path], Any], *, step: int | None = None,
                warn: Callable[[str], None] | None = None) -> tuple[Path, Any] | None:
    """``(checkpoint, load(checkpoint))`` for the newest checkpoint of ``run_dir`` that loads and verifies,
    pinned while ``load`` reads it; each one skipped is reported through ``warn`` with the reason.

    None when the run dir has no complete checkpoint; :class:`CheckpointError` when none verifies (or
    ``step`` is given and that one does not).
    """
    warn = warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr, flush=True))
    skipped = []
    tried = candidates(run_dir, step)
    for c in tried:
        try:
            with pinned(c):
                return c, load(c)
        except CheckpointError as e:
            if step is not None:
                raise
            skipped.append(f"{c.name}: {e}")
            warn(f"skipping checkpoint {c}: {e}")
    if not tried:
        return None
    raise CheckpointError(f"{run_dir}: no checkpoint verifies ({'; '.join(skipped)[:600]}); start a new run "
                          f"(--resume never) or restore the files")
