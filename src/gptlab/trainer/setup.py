"""What :func:`gptlab.train.build` does once before the loop: precision, data, the resume decision and
its rules, the model's initial weights, the run dir's files, the start-up banner, signal handling.

Every function here runs once per run; nothing here is called from inside the training loop.
"""

from __future__ import annotations

import json
import platform
import signal
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptlab import dist as gdist
from gptlab.checkpoint import latest_checkpoint, load_model_state, read_meta
from gptlab.config import ConfigError, ModelConfig, TrainConfig, from_dict, to_dict
from gptlab.errors import GptlabError
from gptlab.metrics import read_metrics
from gptlab.model import GPT
from gptlab.runtime import git_sha  # noqa: F401  (re-exported: the run banner and meta use it)


class ResumeError(GptlabError):
    """``--resume`` cannot continue this run dir; the message says why and what to do."""


def set_precision(cfg: TrainConfig, device: torch.device) -> None:
    """Threads, and TF32 for fp32 matmuls on CUDA when ``system.tf32``."""
    if cfg.system.threads:
        torch.set_num_threads(cfg.system.threads)
    if device.type == "cuda" and cfg.system.tf32:
        # fp32 matmuls outside autocast run on TF32 tensor cores (10-bit mantissa inputs, fp32 accumulate).
        matmul = torch.backends.cuda.matmul
        if hasattr(matmul, "fp32_precision"):  # torch >= 2.9 API; allow_tf32 is its deprecated alias
            matmul.fp32_precision = "tf32"
            torch.backends.cudnn.conv.fp32_precision = "tf32"
        else:  # pragma: no cover - older torch
            matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True


class StopFlag:
    """Set by SIGTERM / SIGINT: finish the current step, checkpoint, exit 0. A second signal aborts."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.reason is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.reason = signal.Signals(signum).name
        print(f"\n{self.reason}: stopping after this step (checkpoint, then exit)", file=sys.stderr, flush=True)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

def versions() -> dict[str, str]:
    from gptlab import __version__

    return {"gptlab": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def on_main(fn: Any, *args: Any) -> Any:
    """Run ``fn`` on rank 0 only and hand its result to every rank; a :class:`GptlabError` there is
    raised on every rank (instead of leaving the others waiting in a collective)."""
    result, error = None, None
    if gdist.is_main_process():
        try:
            result = fn(*args)
        except GptlabError as e:
            error = (type(e).__name__, str(e))
    result, error = gdist.broadcast_object((result, error))
    if error is not None:
        cls = {c.__name__: c for c in (ResumeError, ConfigError)}.get(error[0], GptlabError)
        raise cls(error[1])
    return result


def resolve_data_dir(cfg: TrainConfig) -> Path:
    if cfg.data.dir:
        return Path(cfg.data.dir).expanduser()
    from gptlab.data.sources import default_data_dir

    return default_data_dir(cfg.data.dataset)


def prepare_data(cfg: TrainConfig, data_dir: Path) -> dict[str, Any]:
    """The manifest of ``data_dir``, preparing ``data.dataset`` there first when it has none (rank 0).

    A glob, or a directory of llm.c / build-nanogpt shards without a manifest, is used as it is
    (:func:`gptlab.data.shards.open_manifest`); nothing is ever prepared beside such shards."""
    from gptlab.data.shards import foreign_shard_files, is_glob, open_manifest, read_manifest

    if not (data_dir / "manifest.json").is_file() and (is_glob(data_dir) or foreign_shard_files(data_dir)):
        if cfg.data.input:
            raise GptlabError(f"{data_dir}: holds token shards that gptlab prepare did not write, so --data.input "
                              f"{cfg.data.input} will not be prepared there; pass a new directory as --data for it, "
                              f"or drop --data.input to train on those shards")
        return open_manifest(data_dir, cfg.data.val or None)
    if cfg.data.val:
        raise GptlabError(f"--data.val {cfg.data.val}: only for a glob or directory of shards without manifest.json")
    if not (data_dir / "manifest.json").is_file():
        if not cfg.data.dataset:
            raise GptlabError(f"{data_dir}: no manifest.json; run `gptlab prepare` or set data.dataset")
        from gptlab.data.prepare import prepare_dataset

        gdist.print0(f"data: {data_dir} has no manifest.json; preparing {cfg.data.dataset!r}"
                     + (f" from {cfg.data.input}" if cfg.data.input else ""))
        prepare_dataset(cfg.data.dataset, input=cfg.data.input or None, out=data_dir,
                        field=cfg.data.field, tokenizer=cfg.data.tokenizer or None,
                        val_fraction=cfg.data.val_fraction, progress=True)
    return read_manifest(data_dir)


def split_tokens(manifest: dict[str, Any], split: str) -> int:
    return sum(int(s["tokens"]) for s in manifest["shards"] if s["split"] == split)


def build_model(cfg: TrainConfig, vocab_size: int, resume: Path | None) -> tuple[GPT, Any | None, str]:
    """The raw model (weights from the checkpoint being resumed, ``model.init``, or a seeded init),
    the init source's tokenizer (if any) and a description of where the weights came from.

    Saved weights go through :func:`gptlab.loading.materialize` (meta device, then assign): no random
    init is computed for weights that are about to be replaced."""
    from gptlab.loading import load_model, materialize

    if resume is not None:
        meta = read_meta(resume)
        mcfg = from_dict(ModelConfig, {**meta["model_config"], "dropout": cfg.model.dropout}, "model")
        return materialize(mcfg, load_model_state(resume), where=str(resume)), None, "checkpoint"
    if cfg.model.init:
        # fp32 master weights whatever the source stores (llm.c's bf16 files, bf16 HF dirs).
        model, init_tok = load_model(cfg.model.init, device="cpu", dtype=torch.float32,
                                     overrides={"dropout": cfg.model.dropout})
        if model.config.vocab_size < vocab_size:
            raise ConfigError(f"model.init={cfg.model.init!r} has {model.config.vocab_size} tokens but the dataset "
                              f"uses {vocab_size}: prepare the data with the model's tokenizer")
        return model, init_tok, f"init from {cfg.model.init}"
    if cfg.model.vocab_size and cfg.model.vocab_size < vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is below the dataset's {vocab_size} tokens: "
                          f"set model.vocab_size=0 (from the dataset) or >= {vocab_size}")
    mcfg = cfg.model.to_model_config(cfg.model.vocab_size or vocab_size)
    model = GPT(mcfg)
    # A dedicated generator: the init is the same whatever else consumed the global RNG.
    model.init_weights(torch.Generator().manual_seed(cfg.system.seed))
    return model, None, "random init"


def check_resume_compatible(cfg: TrainConfig, meta: dict[str, Any], world_size: int, ckpt: Path) -> None:
    """Refuse to resume with a different world size, model, batch or data order: the run would not
    be the same run (and the saved loader positions would not mean the same thing)."""
    if meta.get("world_size", 1) != world_size:
        raise ResumeError(f"{ckpt}: saved with world size {meta.get('world_size')} but this run has {world_size}; "
                          f"resume with the same number of processes (or start a new --out)")
    old = meta.get("config", {})
    new = to_dict(cfg)
    diffs = []
    old_model = {k: v for k, v in old.get("model", {}).items() if k not in ("dropout", "init", "vocab_size")}
    for k, v in old_model.items():
        if new["model"].get(k) != v and not (k in ("n_layer", "n_head", "n_embd", "block_size") and cfg.model.init):
            diffs.append(f"model.{k}: {v!r} -> {new['model'].get(k)!r}")
    for section, keys in (("batch", ("batch_tokens", "micro_batch", "seq_len")), ("data", ("shuffle", "seed")),
                          ("optim", ("optimizer",)), ("system", ("fsdp",))):
        for k in keys:
            a, b = old.get(section, {}).get(k), new[section].get(k)
            if a != b:
                diffs.append(f"{section}.{k}: {a!r} -> {b!r}")
    if diffs:
        raise ResumeError(f"{ckpt}: the config differs from the checkpoint's in ways a resumed run cannot "
                          f"follow ({'; '.join(diffs)}); use the original values or a new --out")


def decide_resume(cfg: TrainConfig, run_dir: Path) -> Path | None:
    """The checkpoint to resume from (None: start at step 0), following ``cfg.resume``."""
    train_records = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind") == "train"]
    last_logged = max((int(r["step"]) for r in train_records), default=0)
    ckpt = latest_checkpoint(run_dir)
    if cfg.resume == "never":
        return None
    if cfg.resume == "auto":
        if ckpt is not None:
            return ckpt
        if last_logged:
            raise ResumeError(f"{run_dir}: --resume auto, but no complete checkpoint while metrics.jsonl shows "
                              f"progress up to step {last_logged}; refusing to restart it from step 0 (use "
                              f"--resume never to start over, or another --out)")
        gdist.print0(f"resume: no checkpoint in {run_dir}; starting from step 0")
        return None
    if ckpt is not None or last_logged:
        raise ResumeError(f"{run_dir}: already holds a run (step {last_logged or ckpt.name}); pass --resume auto "
                          f"to continue it, --resume never to start over there, or another --out")
    return None



def write_run_dir(cfg: TrainConfig, run_dir: Path, start_step: int, resumed: bool, model_config: ModelConfig,
                  data_dir: Path, tok_spec: dict[str, Any]) -> None:
    """Rank 0: make the run dir; start over (``--resume never``) or cut metrics and samples written after
    the resumed step; write the resolved ``config.json`` and ``tokenizer.json``."""
    from gptlab.evals.samples import truncate_samples
    from gptlab.metrics import truncate_metrics

    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.resume == "never" and not resumed:
        for f in ("metrics.jsonl", "samples.txt"):
            (run_dir / f).unlink(missing_ok=True)
        import shutil

        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    truncate_metrics(run_dir / "metrics.jsonl", start_step)
    truncate_samples(run_dir / "samples.txt", start_step)
    resolved = to_dict(cfg)
    resolved["model"].update(to_dict(model_config))
    resolved["model"]["init"] = cfg.model.init
    resolved["data"]["dir"] = str(data_dir)
    resolved["out_dir"] = str(run_dir)
    (run_dir / "config.json").write_text(json.dumps(resolved, indent=2) + "\n", encoding="utf-8")
    (run_dir / "tokenizer.json").write_text(json.dumps(tok_spec, indent=2) + "\n", encoding="utf-8")
    if tok_spec.get("type") == "bpe":  # a trained BPE's ranks beside its spec: the run dir is self-contained
        import shutil

        from gptlab.tokenizer import RANKS_FILE

        shutil.copyfile(data_dir / RANKS_FILE, run_dir / RANKS_FILE)


def banner(cfg: TrainConfig, *, run_dir: Path, data_dir: Path, device: torch.device, dtype: torch.dtype,
           world: str, model: GPT, origin: str, grad_accum: int, world_size: int, evals: list[str],
           groups: str, sha: str | None, resumed: str | None) -> str:
    """The start-up summary: where, on what, which model, which batch, which versions."""
    c = model.config
    return (
        f"gptlab train: run dir {run_dir} | data {data_dir}\n"
        f"device {device} | dtype {str(dtype).replace('torch.', '')} | compile {'on' if cfg.system.compile else 'off'} | "
        f"world size {world_size}{world}\n"
        f"model: {model.num_params():,} parameters ({origin}); {c.n_layer} layers, {c.n_head} heads, "
        f"{c.n_embd} wide, context {c.block_size}, vocab {c.vocab_size} (padded {c.padded_vocab_size})\n"
        f"batch: {cfg.batch.batch_tokens:,} tokens/step = {cfg.batch.micro_batch} seq x {cfg.seq_len} tokens x "
        f"{world_size} ranks x {grad_accum} grad-accum steps"
        + "".join(f" | {e}" for e in evals) + "\n"
        f"{groups}\n"
        f"versions: {', '.join(f'{k} {v}' for k, v in versions().items())} | git {sha or 'n/a'}"
        + (f"\n{resumed}" if resumed else ""))
