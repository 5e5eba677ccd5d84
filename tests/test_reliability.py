"""Fault injection for issue 11 (reliability): kills at named points, corrupted bytes, two writers, a full disk.

Each test names the defect (``dN``) of issue 11 it pins down. Kills run the CLI in a subprocess through
``tests/fault_cli.py``, whose hook (a :mod:`gptlab.hooks` point, installed by the test, never by gptlab)
SIGKILLs it the n-th time it reaches a named point; a full disk is a hook on ``file_write`` that raises
``OSError(ENOSPC)``. The counts (kills tried / survived, corruptions tried / detected, concurrent writers tried / refused)
are printed at the end of the module and written to ``$GPTLAB_RELIABILITY_COUNTS`` when it is set.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from gptlab import fsio
from gptlab.checkpoint import (
    CHECKSUMS, COMPLETE, CheckpointError, capture_rng_state, list_checkpoints,
    load_newest, load_training_state, pinned, prune_checkpoints, save_checkpoint,
)
from gptlab.config import ModelConfig, to_dict
from gptlab.data import prepare as P
from gptlab.data import shards as S
from gptlab.errors import GptlabError
from gptlab.loading import load_checkpoint as load_model_from_checkpoint
from gptlab.model import GPT

SRC = str(Path(__file__).resolve().parents[1] / "src")
COUNTS = {"kills_tried": 0, "kills_survived": 0, "corruptions_tried": 0, "corruptions_detected": 0,
          "writers_tried": 0, "writers_refused": 0}


@pytest.fixture(scope="module", autouse=True)
def _report_counts():
    yield
    line = ", ".join(f"{k} {v}" for k, v in COUNTS.items())
    print(f"\nreliability counts: {line}", file=sys.stderr)
    if os.environ.get("GPTLAB_RELIABILITY_COUNTS"):
        Path(os.environ["GPTLAB_RELIABILITY_COUNTS"]).write_text(json.dumps(COUNTS))


@pytest.fixture(autouse=True)
def _data_home(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTLAB_DATA_HOME", str(tmp_path / "data_home"))


FAULT_CLI = str(Path(__file__).resolve().parent / "fault_cli.py")


def run_killed(point: str, nth: int, args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The gptlab CLI in a subprocess that SIGKILLs itself the ``nth`` time hook point ``point`` fires."""
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, FAULT_CLI, f"kill_on_{point}={nth}", "--", *args], capture_output=True,
                          text=True, env=env, timeout=240, cwd=cwd)


@pytest.fixture
def fault():
    """``fault(point, fn)`` installs an in-process hook for this test only."""
    from gptlab import hooks

    removers = []
    yield lambda point, fn: removers.append(hooks.install(point, fn))
    for r in removers:
        r()


def gptlab(args: list[str], cwd: Path | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "gptlab", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=cwd)


def corpus(path: Path, seed: int = 0, n: int = 3000) -> Path:
    rng = np.random.default_rng(seed)
    words = "to be or not that is the question whether tis nobler in mind suffer slings arrows".split()
    path.write_text(" ".join(rng.choice(words, n)) + "\n", encoding="utf-8")
    return path


def tiny_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    cfg = ModelConfig.from_preset("tiny")
    m = GPT(cfg)
    m.init_weights(torch.Generator().manual_seed(seed))
    return m


def save(run: Path, step: int, model: GPT, **meta) -> Path:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return save_checkpoint(run, step, model_state=model.state_dict(), tied=model.config.tie_embeddings,
                           optimizer_state=opt.state_dict(), rng_states=[capture_rng_state()],
                           meta={"model_config": to_dict(model.config), "tokenizer": {"type": "gpt2"}, **meta})


def listing(d: Path) -> list[str]:
    """Names in ``d`` (hidden ones included), without the test's data home."""
    return sorted(p.name for p in d.iterdir() if p.name != "data_home")


def flip(path: Path, offset: int, n: int = 16) -> None:
    b = bytearray(path.read_bytes())
    offset = offset % max(1, len(b) - n)
    for i in range(offset, offset + n):
        b[i] ^= 0xFF
    path.write_bytes(bytes(b))


# --------------------------------------------------------------------------- d1: one writer per directory


def test_d1_second_writer_is_refused_with_holder_pid_and_host(tmp_path):
    """Two prepares into one --out, an export into a locked --out: the second writer gets one line naming
    the holder; a SIGKILLed holder leaves no stale lock."""
    import socket

    src = corpus(tmp_path / "a.txt")
    out = tmp_path / "d"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from gptlab.fsio import DirLock
        DirLock({str(out)!r}, "dataset directory").acquire()
        print("locked", flush=True)
        time.sleep(120)
    """)], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": SRC})
    try:
        assert holder.stdout.readline().strip() == "locked"
        for attempt in ("prepare", "export", "lock"):
            COUNTS["writers_tried"] += 1
            with pytest.raises(fsio.LockError) as e:
                if attempt == "prepare":
                    P.prepare_dataset("text", input=src, out=out, tokenizer="char", progress=False)
                elif attempt == "export":
                    from gptlab.hf import export_hf

                    export_hf(tiny_model(), None, out)
                else:
                    fsio.DirLock(out).acquire()
            assert f"pid {holder.pid} on host {socket.gethostname()}" in str(e.value)
            COUNTS["writers_refused"] += 1
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    # the kernel dropped the dead holder's lock: the next writer just works
    P.prepare_dataset("text", input=src, out=out, tokenizer="char", progress=False)
    assert S.verify_dataset(out)["ok"]


def test_d1_two_concurrent_prepares_one_wins_and_the_dataset_is_consistent(tmp_path):
    a, b = corpus(tmp_path / "a.txt", 1, 20000), corpus(tmp_path / "b.txt", 2, 20000)
    out = tmp_path / "d"
    results: dict[str, object] = {}

    def go(name: str, src: Path) -> None:
        try:
            results[name] = P.prepare_dataset("text", input=src, out=out, tokenizer="char", shard_tokens=2000,
                                              progress=False, overwrite=True)
        except GptlabError as e:
            results[name] = e

    ts = [threading.Thread(target=go, args=(n, s)) for n, s in (("a", a), ("b", b))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    COUNTS["writers_tried"] += 1
    refused = [r for r in results.values() if isinstance(r, fsio.LockError)]
    COUNTS["writers_refused"] += len(refused)
    # Either one was refused, or they ran one after the other; either way the manifest matches its shards.
    assert not [r for r in results.values() if isinstance(r, GptlabError) and not isinstance(r, fsio.LockError)]
    assert S.verify_dataset(out)["ok"] and S.verify_cached(out) >= 0


# --------------------------------------------------------------------------- d2 / d9: checkpoints


CORRUPTIONS = ["weights_bytes", "weights_header", "weights_truncated", "optimizer_bytes", "rng_bytes",
               "meta_edit", "optimizer_missing", "checksums_edit"]


def _corrupt(ckpt: Path, how: str) -> None:
    if how == "weights_bytes":
        flip(ckpt / "model.safetensors", (ckpt / "model.safetensors").stat().st_size // 2)
    elif how == "weights_header":
        flip(ckpt / "model.safetensors", 8, 4)
    elif how == "weights_truncated":
        p = ckpt / "model.safetensors"
        p.write_bytes(p.read_bytes()[:-100])
    elif how == "optimizer_bytes":
        flip(ckpt / "optimizer.pt", (ckpt / "optimizer.pt").stat().st_size // 2)
    elif how == "rng_bytes":
        flip(ckpt / "rng.pt", (ckpt / "rng.pt").stat().st_size // 2)
    elif how == "meta_edit":
        m = json.loads((ckpt / "meta.json").read_text())
        m["step"] = 999
        (ckpt / "meta.json").write_text(json.dumps(m, indent=2) + "\n")
    elif how == "optimizer_missing":
        (ckpt / "optimizer.pt").unlink()
    elif how == "checksums_edit":
        (ckpt / CHECKSUMS).write_text((ckpt / CHECKSUMS).read_text().replace('"bytes": ', '"bytes":  '))


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_d2_corrupt_checkpoint_is_detected_and_readers_fall_back(tmp_path, how, capsys):
    run = tmp_path / "run"
    good, bad = tiny_model(1), tiny_model(2)
    save(run, 5, good)
    newest = save(run, 10, bad)
    _corrupt(newest, how)
    COUNTS["corruptions_tried"] += 1
    with pytest.raises(CheckpointError) as e:
        load_training_state(newest)
    assert str(newest) in str(e.value)
    COUNTS["corruptions_detected"] += 1
    # resume falls back to the newest checkpoint that verifies, and says which one it skipped and why
    ckpt, state = load_newest(run, load_training_state)
    assert ckpt.name == "step_00000005" and state["meta"]["step"] == 5
    assert "skipping checkpoint" in capsys.readouterr().err
    # sample / eval / export --init read the run dir the same way
    model, _tok, meta = load_model_from_checkpoint(run)
    assert meta["step"] == 5 or how in ("optimizer_bytes", "rng_bytes", "optimizer_missing")
    ref = good if meta["step"] == 5 else bad
    for k, v in ref.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k


def test_d2_no_checkpoint_verifies_is_one_clear_error(tmp_path):
    run = tmp_path / "run"
    c = save(run, 3, tiny_model())
    flip(c / "model.safetensors", 5000)
    with pytest.raises(CheckpointError, match="no checkpoint verifies"):
        load_newest(run, load_training_state)


def test_d2_checkpoints_without_checksums_still_load(tmp_path):
    """Checkpoints written before checksums.json existed stay readable (backward-compatible layout)."""
    run = tmp_path / "run"
    c = save(run, 4, tiny_model(3))
    (c / CHECKSUMS).unlink()
    (c / COMPLETE).write_text("4\n")
    assert load_training_state(c)["meta"]["step"] == 4
    assert load_model_from_checkpoint(run)[2]["step"] == 4


def test_d9_pinned_checkpoint_survives_pruning_and_readers_skip_one_being_deleted(tmp_path):
    run = tmp_path / "run"
    for s in (1, 2, 3):
        save(run, s, tiny_model(s))
    oldest = list_checkpoints(run)[0]
    with pinned(oldest):
        prune_checkpoints(run, keep_last=1, keep_best=False)
        assert oldest.is_dir() and (oldest / COMPLETE).is_file()  # a reader holds it: kept for now
    assert [c.name for c in list_checkpoints(run)] == ["step_00000001", "step_00000003"]
    prune_checkpoints(run, keep_last=1, keep_best=False)
    assert [c.name for c in list_checkpoints(run)] == ["step_00000003"]
    # a checkpoint whose deletion has begun (exclusive lock on COMPLETE) is skipped, not failed on
    save(run, 4, tiny_model(4))
    import fcntl

    fd = os.open(run / "checkpoints" / "step_00000004" / COMPLETE, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        assert load_model_from_checkpoint(run)[2]["step"] == 3
    finally:
        os.close(fd)


def test_d9_readers_never_fail_while_a_writer_saves_and_prunes(tmp_path):
    run = tmp_path / "run"
    model = tiny_model()
    save(run, 1, model)
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        step = 2
        while not stop.is_set():
            save(run, step, model)
            prune_checkpoints(run, keep_last=1, keep_best=False)
            step += 1

    t = threading.Thread(target=writer)
    t.start()
    try:
        for _ in range(25):
            try:
                load_model_from_checkpoint(run)
            except BaseException as e:  # noqa: BLE001 - any failure is the defect
                errors.append(e)
    finally:
        stop.set()
        t.join()
    assert not errors, errors[:3]


# --------------------------------------------------------------------------- d3: data verification


def _dataset(tmp_path: Path) -> Path:
    out = tmp_path / "d"
    P.prepare_dataset("text", input=corpus(tmp_path / "c.txt", 3, 6000), out=out, tokenizer="char",
                      shard_tokens=4000, val_fraction=0.1, progress=False)
    return out


DATA_CORRUPTIONS = ["tokens_in_place", "manifest_sha", "manifest_tokenizer", "manifest_splits", "files_swapped"]


@pytest.mark.parametrize("how", DATA_CORRUPTIONS)
def test_d3_changed_data_is_detected_before_training(tmp_path, how):
    out = _dataset(tmp_path)
    assert S.verify_cached(out) > 0 and S.verify_cached(out) == 0  # hashed once, then remembered
    m = json.loads((out / "manifest.json").read_text())
    shard = out / m["shards"][0]["file"]
    if how == "tokens_in_place":  # same length, ids still in range, mtime changes
        arr = np.fromfile(shard, dtype=np.uint8)
        arr[S.HEADER_BYTES:S.HEADER_BYTES + 20] = 1
        arr.tofile(shard)
    elif how == "manifest_sha":
        m["shards"][0]["sha256"] = "0" * 64
    elif how == "manifest_tokenizer":
        m["tokenizer"]["chars"] = m["tokenizer"]["chars"][::-1]
    elif how == "manifest_splits":
        for s in m["shards"]:
            s["split"] = {"train": "val", "val": "train"}[s["split"]]
    elif how == "files_swapped":
        a, b = (out / s["file"] for s in m["shards"][:2])
        tmp = a.with_suffix(".x")
        os.rename(a, tmp), os.rename(b, a), os.rename(tmp, b)
    if how.startswith("manifest"):
        (out / "manifest.json").write_text(json.dumps(m, indent=2))
    COUNTS["corruptions_tried"] += 1
    with pytest.raises(GptlabError) as e:
        S.verify_cached(out)
    assert "manifest.json" in str(e.value) or ".bin" in str(e.value)
    COUNTS["corruptions_detected"] += 1


def test_d3_out_of_range_token_names_shard_and_offset(tmp_path):
    from gptlab.data.loader import TokenLoader

    out = _dataset(tmp_path)
    m = S.read_manifest(out)
    first = m["shards"][0]
    shard = out / first["file"]
    toks = np.array(S.read_shard(shard))
    toks[37] = m["vocab_size"] + 5
    S.write_shard(shard, toks, 2**16)
    first["sha256"] = S.file_sha256(shard)
    S.write_manifest(out, m)
    COUNTS["corruptions_tried"] += 1
    with pytest.raises(GptlabError, match=rf"{first['file']}: token {m['vocab_size'] + 5} at token offset 37"):
        S.verify_cached(out)
    loader = TokenLoader(out, "train", 2, 16)
    loader.next_batch()  # tokens 0..32
    with pytest.raises(GptlabError, match=rf"{first['file']}: token {m['vocab_size'] + 5} at token offset 37"):
        loader.next_batch()
    COUNTS["corruptions_detected"] += 1


# --------------------------------------------------------------------------- d4 / d12 / d13: replace atomically


def _export(src_model_seed: int, out: Path) -> None:
    from gptlab.hf import export_hf

    export_hf(tiny_model(src_model_seed), None, out, overwrite=True)


def _export_seed(out: Path) -> int:
    from gptlab.loading import load_model

    with pytest.warns(UserWarning):  # no tokenizer in these exports
        model, _ = load_model(out)
    for seed in (1, 2):
        if torch.equal(model.transformer.wte.weight, tiny_model(seed).transformer.wte.weight):
            return seed
    raise AssertionError("--out holds neither export")


@pytest.mark.parametrize("point,nth", [("swap_before", 1), ("swap_after", 1), ("file_write", 1)])
def test_d4_export_overwrite_killed_leaves_a_complete_out(tmp_path, point, nth):
    src_old, src_new, out = tmp_path / "old", tmp_path / "new", tmp_path / "out"
    _export(1, src_old)
    _export(2, src_new)
    _export(1, out)
    r = run_killed(point, nth, ["export", "--init", str(src_new), "--out", str(out), "--overwrite"])
    COUNTS["kills_tried"] += 1
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert _export_seed(out) in (1, 2)  # old or new, complete either way
    COUNTS["kills_survived"] += 1
    r = gptlab(["export", "--init", str(src_new), "--out", str(out), "--overwrite"])
    assert r.returncode == 0, r.stderr
    assert _export_seed(out) == 2
    assert listing(tmp_path) == ["new", "old", "out"]  # no leftovers


def test_d4_without_exchange_rename_the_next_run_restores_out(tmp_path, monkeypatch, fault):
    """Where the filesystem has no exchange rename, a kill between the two renames is repaired by the
    next writer (which takes the lock first)."""
    out = tmp_path / "out"
    _export(1, out)
    new = tmp_path / ".out.tmp-x"
    _export(2, new)
    monkeypatch.setattr(fsio, "exchange", lambda a, b: False)

    def die(path):
        raise KeyboardInterrupt

    fault("swap_between", die)
    with pytest.raises(KeyboardInterrupt):
        fsio.swap_dirs(new, out)
    assert not out.exists()
    fsio.recover_swap(out)
    assert _export_seed(out) == 1


def test_d4_d13_export_refuses_its_own_source_and_foreign_dirs_and_missing_local_init(tmp_path):
    run = tmp_path / "runs" / "x"
    save(run, 1, tiny_model())
    for out in (run, tmp_path / "runs"):
        r = gptlab(["export", "--init", str(run), "--out", str(out), "--overwrite"])
        assert r.returncode == 1 and "is or contains the --init source" in r.stderr, r.stderr
    assert list_checkpoints(run)
    (tmp_path / "exp").mkdir()
    r = gptlab(["export", "--init", "exp/a", "--out", str(tmp_path / "o")], cwd=tmp_path)
    assert r.returncode == 1 and "not found" in r.stderr and "download" not in r.stderr, r.stderr


@pytest.mark.parametrize("failure", ["bad_input", "interrupt"])
def test_d12_failed_prepare_overwrite_keeps_the_old_dataset(tmp_path, failure, fault):
    out = _dataset(tmp_path)
    before = S.read_manifest(out)["data_fingerprint"]
    if failure == "bad_input":
        bad = tmp_path / "b.jsonl"
        bad.write_text('{"text":"a"}\n{"text": x\n')
        with pytest.raises(GptlabError, match="b.jsonl:2"):
            P.prepare_dataset("jsonl", input=bad, out=out, overwrite=True, progress=False)
    else:
        def interrupt(path):
            raise KeyboardInterrupt

        fault("shard_written", interrupt)
        with pytest.raises(KeyboardInterrupt):
            P.prepare_dataset("text", input=corpus(tmp_path / "n.txt", 9, 6000), out=out, tokenizer="char",
                              shard_tokens=1000, overwrite=True, progress=False)
    assert S.verify_dataset(out)["ok"] and S.read_manifest(out)["data_fingerprint"] == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    # a failed first prepare leaves no --out at all
    with pytest.raises(GptlabError):
        P.prepare_dataset("text", input=tmp_path / "missing.txt", out=tmp_path / "fresh", progress=False)
    assert not (tmp_path / "fresh").exists()


@pytest.mark.parametrize("nth", [1, 3])
def test_d8_d12_killed_prepare_overwrite_keeps_old_and_next_run_clears_leftovers(tmp_path, nth):
    out = _dataset(tmp_path)
    before = S.read_manifest(out)["data_fingerprint"]
    new = corpus(tmp_path / "n.txt", 9, 6000)
    args = ["prepare", "text", "--input", str(new), "--out", str(out), "--tokenizer", "char",
            "--shard-tokens", "1000", "--overwrite"]
    r = run_killed("shard_written", nth, args)
    COUNTS["kills_tried"] += 1
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert S.verify_dataset(out)["ok"] and S.read_manifest(out)["data_fingerprint"] == before
    assert list(tmp_path.glob(".d.tmp-*"))  # the partial build, beside --out
    COUNTS["kills_survived"] += 1
    r = gptlab(args)
    assert r.returncode == 0, r.stderr
    assert S.read_manifest(out)["data_fingerprint"] != before and S.verify_dataset(out)["ok"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# --------------------------------------------------------------------------- d5: --out checks


def test_d5_out_must_not_be_root_home_or_someone_elses_directory(tmp_path, monkeypatch):
    src = corpus(tmp_path / "a.txt")
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for out, msg in (("/", "root"), (str(home), "home"), ("~", "home")):
        with pytest.raises(GptlabError, match=msg):
            P.prepare_dataset("text", input=src, out=out, tokenizer="char", progress=False)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    for overwrite in (False, True):
        with pytest.raises(GptlabError, match="not a gptlab dataset"):
            P.prepare_dataset("text", input=src, out=mine, tokenizer="char", progress=False, overwrite=overwrite)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


# --------------------------------------------------------------------------- d7: full disk


def _enospc_on(fragment: str):
    def hook(path):
        if fragment in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return hook


@pytest.mark.parametrize("target", ["model.safetensors", "optimizer.pt", "rng.pt"])
def test_d7_checkpoint_on_a_full_disk_is_one_line_naming_the_file(tmp_path, target, fault):
    run = tmp_path / "run"
    save(run, 1, tiny_model())
    fault("file_write", _enospc_on(target))
    with pytest.raises(fsio.DiskError) as e:
        save(run, 2, tiny_model())
    msg = str(e.value)
    assert target in msg and "No space left on device" in msg and "free there" in msg and "\n" not in msg
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000001"]  # no partial temp left


def test_d7_prepare_and_export_on_a_full_disk_name_the_file(tmp_path, fault):
    fault("file_write", _enospc_on(".bin"))
    with pytest.raises(fsio.DiskError, match=r"/text_train_000000\.bin: write failed: No space left on device.*free there"):
        P.prepare_dataset("text", input=corpus(tmp_path / "a.txt"), out=tmp_path / "d", tokenizer="char",
                          progress=False)
    fault("file_write", _enospc_on("model.safetensors"))
    from gptlab.hf import export_hf

    with pytest.raises(fsio.DiskError, match=r"model\.safetensors.*No space left on device"):
        export_hf(tiny_model(), None, tmp_path / "e")
    assert listing(tmp_path) == ["a.txt"]


# --------------------------------------------------------------------------- d8: leftovers


def test_d8_kill_while_pruning_leaves_nothing_for_good(tmp_path):
    run = tmp_path / "run"
    driver = textwrap.dedent(f"""
        import os, signal, torch
        from gptlab import hooks
        from gptlab.checkpoint import prune_checkpoints
        hooks.install("checkpoint_pruning", lambda path: os.kill(os.getpid(), signal.SIGKILL))
        prune_checkpoints({str(run)!r}, keep_last=1, keep_best=False)
    """)
    for s in (1, 2):
        save(run, s, tiny_model(s))
    r = subprocess.run([sys.executable, "-c", driver], env={**os.environ, "PYTHONPATH": SRC}, capture_output=True)
    COUNTS["kills_tried"] += 1
    assert r.returncode == -signal.SIGKILL
    assert [c.name for c in list_checkpoints(run)] == ["step_00000002"]
    COUNTS["kills_survived"] += 1
    prune_checkpoints(run, keep_last=1, keep_best=False)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002"]
    # a step dir without COMPLETE (killed before the marker) is cleared too
    c = save(run, 3, tiny_model(3))
    (c / COMPLETE).unlink()
    prune_checkpoints(run, keep_last=1, keep_best=False)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002"]


# --------------------------------------------------------------------------- d10, d15, umask


def test_d10_index_entries_outside_the_model_dir_are_refused(tmp_path):
    from gptlab.hf import HFFormatError, export_hf, read_hf_weights

    d = tmp_path / "m"
    export_hf(tiny_model(), None, d)
    (d / "model.safetensors").rename(tmp_path / "x.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../x.safetensors"}}))
    with pytest.raises(HFFormatError, match="outside the model directory"):
        read_hf_weights(d)


def test_d15_binary_and_empty_inputs_are_refused_naming_the_file(tmp_path):
    g = tmp_path / "g.bin"
    g.write_bytes(np.random.default_rng(0).integers(0, 256, 100_000, dtype=np.uint8).tobytes())
    for tok in ("char", "gpt2"):
        with pytest.raises(GptlabError, match=r"g\.bin: not UTF-8 text"):
            P.prepare_dataset("text", input=g, out=tmp_path / "g", tokenizer=tok, progress=False)
    z = tmp_path / "z.txt"
    z.write_bytes(b"abc\x00\x00def")
    with pytest.raises(GptlabError, match=r"z\.txt: not UTF-8 text \(a NUL byte"):
        P.prepare_dataset("text", input=z, out=tmp_path / "z", tokenizer="char", progress=False)
    e = tmp_path / "e.txt"
    e.write_text("")
    for tok in ("char", "gpt2"):
        with pytest.raises(GptlabError, match="empty"):
            P.prepare_dataset("text", input=e, out=tmp_path / "e", tokenizer=tok, progress=False)
    assert listing(tmp_path) == ["e.txt", "g.bin", "z.txt"]


def test_files_honour_the_umask(tmp_path):
    """Issue 14 item 7: shards, manifest, checkpoints and exports are 0644 under umask 022 (not 0600)."""
    from gptlab.hf import export_hf

    old = os.umask(0o022)
    try:
        out = _dataset(tmp_path)
        c = save(tmp_path / "run", 1, tiny_model())
        export_hf(tiny_model(), None, tmp_path / "e")
    finally:
        os.umask(old)
    files = [*out.iterdir(), *c.iterdir(), *(tmp_path / "e").iterdir()]
    assert len(files) > 10
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in files}
    assert set(modes.values()) == {"0o644"}, modes


# --------------------------------------------------------------------------- train: d1, d2, d5, d6, d8, d11, d14

TINY = ["--model.n_layer=2", "--model.n_head=2", "--model.n_embd=32", "--model.block_size=32",
        "--eval.eval_every=0", "--eval.sample_every=0", "--logging.progress=false", "--system.device=cpu",
        "--optim.warmup_steps=2", "--optim.lr=1e-2", "--system.threads=1", "--batch.batch_tokens=128",
        "--batch.micro_batch=4", "--checkpoint.every=2"]


@pytest.fixture(scope="module")
def chars(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("chars")
    P.prepare_dataset("text", input=corpus(root / "c.txt", 5, 8000), out=root / "d", tokenizer="char",
                      progress=False)
    return root / "d"


def cfg(data: Path, out: Path, *extra: str, **flags):
    """A train config; ``flags`` by ``gptlab train`` flag name (max_steps=3 is --max-steps 3)."""
    from gptlab.commands.train import FLAGS
    from gptlab.config import resolve_train_config

    key = {name[2:].replace("-", "_"): k for name, k, _ in FLAGS}
    settings = {key[k]: v for k, v in {"data": str(data), "out": str(out), **flags}.items()}
    return resolve_train_config(None, settings, [*TINY, *extra])


def weights(run: Path) -> dict[str, torch.Tensor]:
    from gptlab.checkpoint import latest_checkpoint, load_model_state

    return load_model_state(latest_checkpoint(run))


def test_d1_train_refuses_a_second_writer_of_its_run_dir(chars, tmp_path):
    """A real second ``gptlab train`` while one runs (and a held lock in-process): refused, naming the holder."""
    from gptlab.train import train

    run = tmp_path / "r"
    COUNTS["writers_tried"] += 1
    with fsio.DirLock(run, "run directory"):
        with pytest.raises(fsio.LockError, match=f"in use by another gptlab process, pid {os.getpid()}"):
            train(cfg(chars, run, max_steps=2))
    COUNTS["writers_refused"] += 1
    assert not run.exists()
    first = subprocess.Popen([sys.executable, "-m", "gptlab", "train", "--data", str(chars), "--out", str(run),
                              "--max-steps", "100000", "--resume", "auto", *TINY], env={**os.environ, "PYTHONPATH": SRC},
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        import time

        deadline = time.time() + 180
        while not list(run.glob("checkpoints/step_*")) and time.time() < deadline and first.poll() is None:
            time.sleep(0.2)
        assert first.poll() is None, first.stderr.read()
        COUNTS["writers_tried"] += 1
        r = gptlab(["train", "--data", str(chars), "--out", str(run), "--max-steps", "3", "--resume", "never", *TINY])
        assert r.returncode == 1 and f"pid {first.pid}" in r.stderr and "in use" in r.stderr, r.stderr
        COUNTS["writers_refused"] += 1
        assert first.poll() is None  # the first run goes on, its checkpoints intact
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=120)
    assert first.returncode == 0


@pytest.mark.parametrize("how", ["weights_bytes", "optimizer_missing", "rng_bytes"])
def test_d2_resume_skips_a_damaged_checkpoint_and_stays_exact(chars, tmp_path, how, capsys):
    from gptlab.train import train

    ref = tmp_path / "ref"
    train(cfg(chars, ref, max_steps=6))
    run = tmp_path / "r"
    train(cfg(chars, run, "--checkpoint.keep_last=0", max_steps=4))
    _corrupt(run / "checkpoints" / "step_00000004", how)
    COUNTS["corruptions_tried"] += 1
    s = train(cfg(chars, run, "--checkpoint.keep_last=0", max_steps=6, resume="auto"))
    err = capsys.readouterr().err
    assert "skipping checkpoint" in err and "step_00000004" in err and "resumed from" in err
    COUNTS["corruptions_detected"] += 1
    assert s["steps"] == 6
    a, b = weights(ref), weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)  # resumed from step 2: the same run as uninterrupted


def test_d6_resume_step_picks_a_checkpoint_and_max_steps_change_is_reported(chars, tmp_path, capsys):
    from gptlab.train import train

    ref = tmp_path / "ref"
    train(cfg(chars, ref, max_steps=6))
    run = tmp_path / "r"
    train(cfg(chars, run, "--checkpoint.keep_last=0", max_steps=6))
    train(cfg(chars, run, "--checkpoint.keep_last=0", max_steps=6, resume="2"))
    assert "resumed from" in capsys.readouterr().err and "step_00000002" in str(list_checkpoints(run)[0])
    a, b = weights(ref), weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(CheckpointError, match="no complete checkpoint for step 3"):
        train(cfg(chars, run, max_steps=6, resume="3"))
    train(cfg(chars, run, max_steps=8, resume="auto"))
    assert "learning-rate schedule changes" in capsys.readouterr().err


def test_d5_train_out_is_checked_and_resume_never_removes_only_gptlab_files(chars, tmp_path, monkeypatch):
    from gptlab.train import train

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"my": "settings"}')
    with pytest.raises(GptlabError, match="not a gptlab run"):
        train(cfg(chars, mine, max_steps=2, resume="never"))
    assert (mine / "config.json").read_text() == '{"my": "settings"}'
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(GptlabError, match="home"):
        train(cfg(chars, tmp_path, max_steps=2))
    run = tmp_path / "r"
    train(cfg(chars, run, max_steps=2))
    (run / "checkpoints" / "k.txt").write_text("keep")
    (run / "notes.md").write_text("keep")
    train(cfg(chars, run, max_steps=2, resume="never"))
    assert (run / "checkpoints" / "k.txt").read_text() == "keep" and (run / "notes.md").read_text() == "keep"


def test_d8_a_checkpoint_beyond_keep_last_is_pruned_at_start(chars, tmp_path):
    """A kill after the last COMPLETE but before pruning leaves keep_last + 1 checkpoints; the next start trims."""
    from gptlab.train import train

    run = tmp_path / "r"
    train(cfg(chars, run, "--checkpoint.keep_last=0", max_steps=6))
    assert len(list_checkpoints(run)) == 3
    train(cfg(chars, run, "--checkpoint.keep_last=1", max_steps=6, resume="auto"))
    assert [c.name for c in list_checkpoints(run)] == ["step_00000006"]


def test_d11_sigterm_during_start_up_exits_cleanly(chars, tmp_path):
    import time

    run = tmp_path / "r"
    p = subprocess.Popen([sys.executable, "-m", "gptlab", "train", "--data", str(chars), "--out", str(run),
                          "--max-steps", "5", *TINY], env={**os.environ, "PYTHONPATH": SRC},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = fsio.lock_path(run)
    deadline = time.time() + 120
    while not lock.exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.01)
    p.send_signal(signal.SIGTERM)  # the run dir is locked: start-up is under way, no step has run
    out, err = p.communicate(timeout=120)
    COUNTS["kills_tried"] += 1
    assert p.returncode == 0, err
    assert "during start-up" in err and not list_checkpoints(run) and not lock.exists()
    COUNTS["kills_survived"] += 1


def test_d14_train_init_refuses_a_model_with_another_tokenizer(chars, tmp_path):
    from gptlab.config import ConfigError
    from gptlab.train import train

    run = tmp_path / "a"
    train(cfg(chars, run, max_steps=2))
    other = tmp_path / "other"
    P.prepare_dataset("text", input=corpus(tmp_path / "o.txt", 6, 8000), out=other, tokenizer="char", progress=False)
    (other / "x").touch()  # not part of the dataset; irrelevant here
    m = S.read_manifest(other)
    m["tokenizer"]["chars"] = m["tokenizer"]["chars"][::-1]  # same size, another character table
    S.write_manifest(other, m)
    with pytest.raises(ConfigError, match="fingerprints differ"):
        train(cfg(other, tmp_path / "b", f"--model.init={run}", max_steps=2))
    with pytest.raises(GptlabError, match="fingerprints differ"):
        train(cfg(other, run, max_steps=4, resume="auto"))


@pytest.mark.parametrize("point,nth", [("checkpoint_renamed", 2), ("checkpoint_pruning", 1), ("file_write", 7)])
def test_d8_training_killed_while_saving_or_pruning_resumes_exactly(chars, tmp_path, point, nth):
    """SIGKILL between a checkpoint's rename and its COMPLETE, in the middle of pruning, or mid-write; the
    restarted run (--resume auto) ends with the weights of an uninterrupted one and no leftovers."""
    from gptlab.train import train

    ref = tmp_path / "ref"
    train(cfg(chars, ref, "--checkpoint.keep_last=1", max_steps=8))
    run = tmp_path / "r"
    args = ["train", "--data", str(chars), "--out", str(run), "--max-steps", "8", "--checkpoint.keep_last=1", *TINY]
    r = run_killed(point, nth, args)
    COUNTS["kills_tried"] += 1
    assert r.returncode == -signal.SIGKILL, r.stderr
    train(cfg(chars, run, "--checkpoint.keep_last=1", max_steps=8, resume="auto"))
    a, b = weights(ref), weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000008"]
    COUNTS["kills_survived"] += 1
