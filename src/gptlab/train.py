"""``gptlab train``: the training loop, on one process or many (torchrun: DDP, or FSDP2 with system.fsdp).

Reads top to bottom: set up (process group, data, run dir, model, optimizer, resume), then the loop;
each optimizer step is :func:`train_step`, followed by evaluation, samples and checkpoints when due.

Numerics worth knowing:
- The loss of each micro-step is divided by the number of micro-steps, so the accumulated gradient is the
  gradient of the mean loss over the whole batch (as one big batch would give).
- Under DDP gradients are all-reduced (averaged) only on the last micro-step (``no_sync`` before).
- Steps are counted from 1 in logs, metrics and checkpoint names (the number of updates done); the LR
  schedule is a pure function of the 0-based step (``gptlab.optim``).
- Resume is bit-exact on CPU: weights, optimizer, every RNG and every rank's loader position are restored,
  and nothing between checkpoints draws from the global RNG except dropout.

Fault injection for the tests (environment variables, never set in normal use): GPTLAB_TEST_KILL_AT_STEP=N
(SIGKILL after logging step N), GPTLAB_TEST_KILL_IN_SAVE=N (SIGKILL halfway through saving checkpoint N),
GPTLAB_TEST_NAN_AT_STEP=N with GPTLAB_TEST_NAN_RANK=R (a NaN loss on rank R at step N).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import signal
import subprocess
import sys
import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from gptlab import dist as gdist
from gptlab.checkpoint import (
    capture_rng_state, latest_checkpoint, load_model_state, read_meta,
    load_training_state, prune_checkpoints, restore_rng_state, save_checkpoint,
)
from gptlab.config import TRAIN_FLAGS, ConfigError, ModelConfig, TrainConfig, from_dict, resolve_train_config, to_dict
from gptlab.errors import GptlabError
from gptlab.metrics import MetricsLogger, flops_per_token, format_step, mfu, peak_flops, read_metrics, truncate_metrics
from gptlab.model import GPT
from gptlab.optim import build_optimizer, lr_factor, set_lr
from gptlab.runtime import autocast, resolve_dtype


class TrainingDiverged(GptlabError):
    """A non-finite loss or gradient norm: the run stopped before applying that update."""


class ResumeError(GptlabError):
    """``--resume`` cannot continue this run dir; the message says why and what to do."""


# --------------------------------------------------------------------------- small pieces


class Prefetcher:
    """Wraps a loader so the next batch can be fetched (and its host-to-device copy started) while the
    current one computes, and remembers the loader state *before* that fetch, so a checkpoint
    resumes at the first batch not yet trained on."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self._next: tuple[torch.Tensor, torch.Tensor] | None = None
        self._state_before_next: dict[str, Any] | None = None

    def prefetch(self) -> None:
        if self._next is None:
            self._state_before_next = json.loads(json.dumps(self.loader.state_dict()))
            self._next = self.loader.next_batch()

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.prefetch()
        batch, self._next = self._next, None
        assert batch is not None
        return batch

    def state_dict(self) -> dict[str, Any]:
        if self._next is not None:
            assert self._state_before_next is not None
            return self._state_before_next
        return json.loads(json.dumps(self.loader.state_dict()))


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


def git_sha() -> str | None:
    """The commit of the gptlab source tree, when it is a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str]:
    from gptlab import __version__

    return {"gptlab": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def _test_env_step(var: str) -> int:
    """Test-only fault injection (GPTLAB_TEST_*): the step it names, or 0."""
    v = os.environ.get(var)
    return int(v) if v else 0


# --------------------------------------------------------------------------- setup helpers


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
    """The manifest of ``data_dir``, preparing ``data.dataset`` there first when it has none (rank 0)."""
    from gptlab.data.shards import read_manifest

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


def _meta_model_section(meta_cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in meta_cfg.get("model", {}).items() if k not in ("dropout", "init")}


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


def truncate_samples(path: Path, step: int) -> None:
    """Drop sample blocks after ``step`` from samples.txt (a resumed run writes them again)."""
    if not path.is_file():
        return
    out, keep = [], True
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        if line.startswith("=== step "):
            try:
                keep = int(line.split()[2]) <= step
            except (IndexError, ValueError):
                keep = True
        if keep:
            out.append(line)
    path.write_text("".join(out), encoding="utf-8")


# --------------------------------------------------------------------------- the trainer


@dataclass
class Trainer:
    """State of one training run; :func:`train` drives it."""

    cfg: TrainConfig
    info: gdist.DistInfo
    device: torch.device
    dtype: torch.dtype
    run_dir: Path
    raw_model: GPT
    model: nn.Module  # what the loop calls: the raw model, maybe compiled, maybe DDP-wrapped
    optimizer: torch.optim.Optimizer
    scaler: Any
    train_data: Prefetcher
    val_loader: Any | None
    val_steps: int
    grad_accum: int
    tokenizer: Any | None
    tokenizer_spec: dict[str, Any]
    logger: MetricsLogger
    stop: StopFlag
    step: int = 0  # optimizer steps done
    best_val: float | None = None
    last_val: float | None = None
    last_val_step: int = -1
    last_ckpt_step: int = -1
    fsdp: bool = False
    dts: deque = field(default_factory=lambda: deque(maxlen=20))
    hellaswag_examples: list | None = None
    hellaswag_off: bool = False
    sampling_off: bool = False

    @property
    def amp(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.dtype)

    # ----------------------------------------------------------------- one optimizer step
    def train_step(self, stop_now: bool) -> dict[str, Any]:
        """Forward/backward over ``grad_accum`` micro-batches, clip, check, update. Returns the log record
        (and ``stop``: whether any rank asked to stop)."""
        cfg, step0 = self.cfg, self.step  # 0-based index of this update
        factor = lr_factor(step0, cfg.optim, cfg.schedule.max_steps)
        set_lr(self.optimizer, factor)
        nan_at = _test_env_step("GPTLAB_TEST_NAN_AT_STEP")
        nan_rank = _test_env_step("GPTLAB_TEST_NAN_RANK")
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float32)
        for micro in range(self.grad_accum):
            last = micro == self.grad_accum - 1
            x, y = self.train_data.next()
            with self._sync_context(last):
                with self.amp:
                    _, loss = self.model(x, y)
                # Mean over the whole batch: each of the grad_accum micro-losses counts 1/grad_accum.
                loss = loss / self.grad_accum
                if nan_at == step0 + 1 and nan_rank == self.info.rank:
                    loss = loss * float("nan")
                loss_sum += loss.detach().float()
                self.train_data.prefetch()  # overlaps the next batch's copy with this backward
                self.scaler.scale(loss).backward()
        # One collective carries the loss (for logging) and the stop request of every rank.
        flags = torch.stack([loss_sum, torch.tensor(float(stop_now), device=self.device)])
        gdist.all_reduce_sum(flags)
        loss_val = flags[0].item() / self.info.world_size
        stop = flags[1].item() > 0
        self.scaler.unscale_(self.optimizer)
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
            norm = norm.full_tensor()
        norm_val = float(norm.item())
        step_num = step0 + 1
        if not math.isfinite(loss_val) or (not math.isfinite(norm_val) and not self.scaler.is_enabled()):
            what = "loss" if not math.isfinite(loss_val) else "gradient norm"
            last = f"step {self.last_ckpt_step}" if self.last_ckpt_step > 0 else "none"
            raise TrainingDiverged(
                f"step {step_num}: {what} is {loss_val if what == 'loss' else norm_val} (loss {loss_val}, grad norm "
                f"{norm_val}); stopped before the optimizer step. Last good checkpoint: {last} in "
                f"{self.run_dir / 'checkpoints'}. Try a lower optim.lr, a longer optim.warmup_steps, "
                f"or optim.grad_clip=1.0")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - t0
        self.step = step_num
        return {"kind": "train", "step": step_num, "loss": loss_val, "lr": self.cfg.optim.lr * factor,
                "grad_norm": norm_val, "dt_ms": 1000 * dt, "tokens_per_s": cfg.batch.batch_tokens / dt,
                "tokens": step_num * cfg.batch.batch_tokens, "stop": stop}

    def _sync_context(self, last: bool) -> contextlib.AbstractContextManager:
        """Gradient all-reduce only on the last micro-step (DDP ``no_sync`` / FSDP2 ``set_requires_gradient_sync``)."""
        if not self.info.distributed:
            return contextlib.nullcontext()
        if self.fsdp:
            self.raw_model.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if last else self.model.no_sync()

    # ----------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean val loss over the first ``val_steps`` batches (the loader restarts each time, so every
        evaluation sees the same tokens), averaged over ranks."""
        assert self.val_loader is not None
        self.raw_model.eval()
        self.val_loader.reset()
        total = torch.zeros((), device=self.device, dtype=torch.float32)
        for _ in range(self.val_steps):
            x, y = self.val_loader.next_batch()
            with self.amp:
                _, loss = self.raw_model(x, y)
            total += loss.float()
        self.raw_model.train()
        return gdist.all_reduce_mean(total / self.val_steps).item()

    def sample(self) -> list[str]:
        """Texts continuing ``eval.sample_prompt`` from the uncompiled model, with a generator seeded by the
        step (the global RNG, which dropout uses, is left untouched)."""
        if self.sampling_off or self.tokenizer is None:
            return []
        try:
            from gptlab.generate import generate
        except ImportError as e:
            gdist.print0(f"warning: sampling is off (gptlab.generate unavailable: {e})")
            self.sampling_off = True
            return []
        ev = self.cfg.eval
        try:
            ids = self.tokenizer.encode(ev.sample_prompt)
        except Exception as e:  # e.g. a character the char vocabulary lacks
            gdist.print0(f"warning: sampling is off: cannot encode eval.sample_prompt ({e})")
            self.sampling_off = True
            return []
        if not ids:
            ids = [self.tokenizer.eot_id or 0]
        ids = ids[-self.raw_model.config.block_size + 1:]
        max_new = min(ev.sample_tokens, self.raw_model.config.block_size - len(ids))
        idx = torch.tensor([ids] * ev.num_samples, dtype=torch.long, device=self.device)
        self.raw_model.eval()
        try:
            with self.amp, warnings.catch_warnings():
                # FSDP2 warns that the sliced logits are a view; sampling never runs backward.
                warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
                out = generate(self.raw_model, idx, max_new, temperature=ev.sample_temperature,
                               top_k=ev.sample_top_k or None, seed=self.cfg.system.seed + self.step,
                               use_kv_cache=not self.fsdp)
        finally:
            self.raw_model.train()
        return [self.tokenizer.decode(row.tolist()) for row in out]

    def hellaswag(self) -> dict[str, Any] | None:
        """HellaSwag accuracy (gptlab.evals.hellaswag), or None with a warning when it is unavailable."""
        if self.hellaswag_off or self.tokenizer is None:
            return None
        ev = self.cfg.eval
        try:
            from gptlab.evals.hellaswag import evaluate_hellaswag, load_hellaswag

            if self.hellaswag_examples is None:
                self.hellaswag_examples = load_hellaswag(ev.hellaswag_input or None, split="val")
            res = evaluate_hellaswag(self.raw_model, self.hellaswag_examples, self.tokenizer, device=self.device,
                                     dtype=self.dtype, limit=ev.hellaswag_limit or None)
        except (ImportError, GptlabError, OSError) as e:
            gdist.print0(f"warning: HellaSwag evaluation is off: {e}")
            self.hellaswag_off = True
            return None
        finally:
            self.raw_model.train()
        return {"acc": float(res["acc"]), "acc_norm": float(res["acc_norm"]), "n": int(res["n"])}

    # ----------------------------------------------------------------- checkpoint
    def save(self) -> None:
        """Checkpoint on rank 0 with every rank's loader and RNG state (all ranks must call this)."""
        loader_states = gdist.all_gather_object(self.train_data.state_dict())
        rng_states = gdist.all_gather_object(capture_rng_state())
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            model_state = get_model_state_dict(self.raw_model, options=opts)
            optim_state = get_optimizer_state_dict(self.raw_model, self.optimizer, options=opts)
        else:
            model_state = self.raw_model.state_dict()
            optim_state = self.optimizer.state_dict()
        if self.info.is_main:
            meta = {
                "tokens_seen": self.step * self.cfg.batch.batch_tokens,
                "world_size": self.info.world_size,
                "lr_factor_next": lr_factor(self.step, self.cfg.optim, self.cfg.schedule.max_steps),
                "val_loss": self.last_val if self.last_val_step == self.step else None,
                "best_val_loss": self.best_val,
                "config": to_dict(self.cfg),
                "model_config": to_dict(self.raw_model.config),
                "tokenizer": self.tokenizer_spec,
                "loaders": loader_states,
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "fsdp": self.fsdp,
                "versions": versions(),
                "git_sha": git_sha(),
            }
            path = save_checkpoint(self.run_dir, self.step, model_state=model_state,
                                   tied=self.raw_model.config.tie_embeddings, optimizer_state=optim_state,
                                   rng_states=rng_states, meta=meta)
            prune_checkpoints(self.run_dir, self.cfg.checkpoint.keep_last, self.cfg.checkpoint.keep_best)
            gdist.print0(f"checkpoint: {path}")
        self.last_ckpt_step = self.step
        gdist.barrier()


def _wrap(raw: GPT, cfg: TrainConfig, info: gdist.DistInfo, device: torch.device) -> tuple[nn.Module, bool]:
    """Compile / DDP / FSDP2 around the raw model. Returns (model the loop calls, fsdp on?)."""
    fsdp = cfg.system.fsdp and info.distributed
    if fsdp:
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # pragma: no cover - torch < 2.6
            from torch.distributed._composable.fsdp import fully_shard
        # Shard every block, then the root (embeddings, final norm, tied head); FSDP2 all-gathers a
        # block's parameters just before its forward and frees them after.
        for block in raw.transformer.h:
            fully_shard(block)
        fully_shard(raw)
    model: nn.Module = raw
    if cfg.system.compile:
        model = torch.compile(model)
    if info.distributed and not fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model, fsdp


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run training as ``cfg`` says; returns a summary dict. Raises :class:`TrainingDiverged` on NaN/Inf."""
    info, device = gdist.init_distributed(cfg.system.device)
    try:
        return _train(cfg, info, device)
    finally:
        gdist.destroy()


def _train(cfg: TrainConfig, info: gdist.DistInfo, device: torch.device) -> dict[str, Any]:
    t_start = time.time()
    if cfg.system.threads:
        torch.set_num_threads(cfg.system.threads)
    dtype = resolve_dtype(cfg.system.dtype, device)
    if device.type == "cuda" and cfg.system.tf32:
        # fp32 matmuls outside autocast run on TF32 tensor cores (10-bit mantissa inputs, fp32 accumulate).
        matmul = torch.backends.cuda.matmul
        if hasattr(matmul, "fp32_precision"):  # torch >= 2.9 API; allow_tf32 is its deprecated alias
            matmul.fp32_precision = "tf32"
            torch.backends.cudnn.conv.fp32_precision = "tf32"
        else:  # pragma: no cover - older torch
            matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
    grad_accum = cfg.grad_accum_steps(info.world_size)

    # ---- data and run dir
    data_dir = resolve_data_dir(cfg)
    manifest = on_main(prepare_data, cfg, data_dir)
    run_dir = Path(cfg.out_dir or Path("runs") / cfg.name).expanduser()
    tok_spec = manifest["tokenizer"]
    vocab_size = int(manifest["vocab_size"])
    if split_tokens(manifest, "train") < cfg.batch.micro_batch * cfg.seq_len + 1:
        raise GptlabError(f"{data_dir}: the train split has {split_tokens(manifest, 'train')} tokens, fewer than one "
                          f"micro-batch ({cfg.batch.micro_batch} x {cfg.seq_len}); use more data or smaller batches")

    # ---- resume decision (rank 0 looks, everyone follows)
    ckpt_s = on_main(lambda: str(c) if (c := decide_resume(cfg, run_dir)) else None)
    ckpt = Path(ckpt_s) if ckpt_s else None
    state = load_training_state(ckpt) if ckpt else None
    if state is not None:
        check_resume_compatible(cfg, state["meta"], info.world_size, ckpt)

    # ---- model, optimizer
    raw, init_tok, origin = build_model(cfg, vocab_size, ckpt if state is not None else None)
    if init_tok is not None and init_tok.spec().get("type") != tok_spec.get("type"):
        raise ConfigError(f"model.init={cfg.model.init!r} uses the {init_tok.spec().get('type')} tokenizer but "
                          f"{data_dir} was prepared with {tok_spec.get('type')}: prepare it with --tokenizer "
                          f"{init_tok.spec().get('type')}")
    if cfg.seq_len > raw.config.block_size:
        raise ConfigError(f"batch.seq_len={cfg.seq_len} exceeds the model's context ({raw.config.block_size})")
    raw.to(device)
    raw.train()
    # Dropout draws from the global generator; ranks get different streams, as nanoGPT's seed offset.
    torch.manual_seed(cfg.system.seed + info.rank)
    random.seed(cfg.system.seed + info.rank)
    np.random.seed((cfg.system.seed + info.rank) % 2**32)
    model, fsdp = _wrap(raw, cfg, info, device)
    optimizer, groups_summary = build_optimizer(raw, cfg.optim, device)
    scaler = torch.amp.GradScaler(device.type, enabled=(dtype == torch.float16 and device.type == "cuda"))

    # ---- data loaders
    from gptlab.data.loader import TokenLoader

    loader = TokenLoader(data_dir, "train", cfg.batch.micro_batch, cfg.seq_len, rank=info.rank,
                         world_size=info.world_size, shuffle=cfg.data.shuffle, seed=cfg.data.seed, device=device)
    val_loader, val_steps = None, 0
    val_total = split_tokens(manifest, "val")
    per_eval_batch = cfg.batch.micro_batch * cfg.seq_len * info.world_size
    if cfg.eval.eval_every:
        from gptlab.data.loader import LoaderError

        try:
            val_loader = TokenLoader(data_dir, "val", cfg.batch.micro_batch, cfg.seq_len, rank=info.rank,
                                     world_size=info.world_size, shuffle=False, seed=0, device=device)
        except LoaderError as e:
            gdist.print0(f"warning: validation is off: the val split ({val_total:,} tokens) is unusable: {e}")
        else:
            avail = val_loader.batches_per_epoch  # one pass at most: no token is counted twice
            want = cfg.eval.eval_tokens // per_eval_batch if cfg.eval.eval_tokens else avail
            val_steps = max(1, min(want, avail))

    # ---- tokenizer for samples / HellaSwag
    from gptlab.tokenizer import from_spec

    tokenizer = init_tok or from_spec(tok_spec)

    # ---- restore training state
    start_step = 0
    best_val = None
    if state is not None:
        meta = state["meta"]
        start_step = int(meta["step"])
        best_val = meta.get("best_val_loss")
        if fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(raw, optimizer, optim_state_dict=state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
            optimizer.load_state_dict(state["optimizer"])
            for g, h in zip(optimizer.param_groups, hyper):  # this run's settings (e.g. a new lr) win
                g.update(h)
        loader.load_state_dict(meta["loaders"][info.rank])
        restore_rng_state(state["rng"][info.rank])
        if meta.get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(meta["scaler"])

    # ---- run dir files (rank 0)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.resume == "never" and state is None:
            for f in ("metrics.jsonl", "samples.txt"):
                (run_dir / f).unlink(missing_ok=True)
            import shutil

            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        truncate_metrics(run_dir / "metrics.jsonl", start_step)
        truncate_samples(run_dir / "samples.txt", start_step)
        resolved = to_dict(cfg)
        resolved["model"].update({k: v for k, v in to_dict(raw.config).items()})
        resolved["model"]["init"] = cfg.model.init
        resolved["data"]["dir"] = str(data_dir)
        resolved["out_dir"] = str(run_dir)
        (run_dir / "config.json").write_text(json.dumps(resolved, indent=2) + "\n", encoding="utf-8")
        (run_dir / "tokenizer.json").write_text(json.dumps(tok_spec, indent=2) + "\n", encoding="utf-8")
    logger = MetricsLogger(run_dir, enabled=info.is_main, wandb=cfg.logging.wandb,
                           wandb_project=cfg.logging.wandb_project, wandb_run_name=cfg.logging.wandb_run_name,
                           tensorboard=cfg.logging.tensorboard, config=to_dict(cfg))

    # ---- start-up log
    n_params = raw.num_params()
    gdist.print0(
        f"gptlab train: run dir {run_dir} | data {data_dir}\n"
        f"device {device} | dtype {str(dtype).replace('torch.', '')} | compile {'on' if cfg.system.compile else 'off'} | "
        f"world size {info.world_size}{' (FSDP2)' if fsdp else ' (DDP)' if info.distributed else ''}\n"
        f"model: {n_params:,} parameters ({origin}); {raw.config.n_layer} layers, {raw.config.n_head} heads, "
        f"{raw.config.n_embd} wide, context {raw.config.block_size}, vocab {raw.config.vocab_size} "
        f"(padded {raw.config.padded_vocab_size})\n"
        f"batch: {cfg.batch.batch_tokens:,} tokens/step = {cfg.batch.micro_batch} seq x {cfg.seq_len} tokens x "
        f"{info.world_size} ranks x {grad_accum} grad-accum steps | val {val_steps} batches/eval\n"
        f"{groups_summary}\n"
        f"versions: {', '.join(f'{k} {v}' for k, v in versions().items())} | git {git_sha() or 'n/a'}"
        + (f"\nresumed from {ckpt} at step {start_step}" if ckpt else ""))

    stop = StopFlag()
    trainer = Trainer(cfg=cfg, info=info, device=device, dtype=dtype, run_dir=run_dir, raw_model=raw, model=model,
                      optimizer=optimizer, scaler=scaler, train_data=Prefetcher(loader), val_loader=val_loader,
                      val_steps=val_steps, grad_accum=grad_accum, tokenizer=tokenizer, tokenizer_spec=tok_spec,
                      logger=logger, stop=stop, step=start_step, best_val=best_val, fsdp=fsdp,
                      last_ckpt_step=start_step if ckpt else -1)
    try:
        stop.install()
        summary = run_loop(trainer, t_start)
    finally:
        stop.uninstall()
        logger.close()
    summary["run_dir"] = str(run_dir)
    return summary


def _due(step: int, every: int, last: bool) -> bool:
    return bool(every) and (step % every == 0 or last)


def run_loop(tr: Trainer, t_start: float) -> dict[str, Any]:
    """The training loop proper: step, log, evaluate, sample, checkpoint, until max_steps or a stop."""
    cfg, info = tr.cfg, tr.info
    max_steps = cfg.schedule.max_steps
    peak = peak_flops(torch.cuda.get_device_name(tr.device)) if tr.device.type == "cuda" else None
    fpt = flops_per_token(tr.raw_model.config, cfg.seq_len, tr.raw_model.num_params())
    kill_at = _test_env_step("GPTLAB_TEST_KILL_AT_STEP")
    time_limit_s = cfg.system.time_limit * 60
    stopped = None
    from tqdm.auto import tqdm

    bar = tqdm(total=max_steps, initial=tr.step, file=sys.stderr, dynamic_ncols=True, unit="step",
               disable=(not info.is_main or not cfg.logging.progress) or None, leave=False)
    rec: dict[str, Any] = {}
    try:
        while tr.step < max_steps:
            want_stop = tr.stop.reason is not None or (time_limit_s > 0 and time.time() - t_start > time_limit_s)
            rec = tr.train_step(want_stop)
            step = tr.step
            if step > 1:  # the first step includes compilation / warm-up
                tr.dts.append(rec["dt_ms"] / 1000)
            avg = sum(tr.dts) / len(tr.dts) if tr.dts else rec["dt_ms"] / 1000
            rec["mfu"] = mfu(rec["tokens_per_s"], fpt, peak, info.world_size)
            rec["eta_s"] = avg * (max_steps - step)
            stop_req = rec.pop("stop")
            tr.logger.log({k: v for k, v in rec.items() if v is not None and k != "eta_s"})
            bar.update(1)
            if info.is_main and (step % cfg.logging.log_every == 0 or step == max_steps or step == 1):
                bar.write(format_step(rec, max_steps), file=sys.stderr)
            if kill_at and step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)  # test hook: a crash between log and checkpoint
            last = step == max_steps
            if stop_req:
                # A stop (signal, time limit) skips evaluations that are not due: schedulers give a short
                # grace period, and the checkpoint below is what must make it to disk.
                stopped = tr.stop.reason or "time_limit"
            if tr.val_loader is not None and _due(step, cfg.eval.eval_every, last):
                tr.last_val = tr.evaluate()
                tr.last_val_step = step
                tr.best_val = tr.last_val if tr.best_val is None else min(tr.best_val, tr.last_val)
                tr.logger.log({"kind": "val", "step": step, "val_loss": tr.last_val})
                if info.is_main:
                    bar.write(f"step {step}: val loss {tr.last_val:.4f}", file=sys.stderr)
            if _due(step, cfg.eval.hellaswag_every, last):
                hs = tr.hellaswag()
                if hs is not None:
                    tr.logger.log({"kind": "hellaswag", "step": step, **hs})
                    if info.is_main:
                        bar.write(f"step {step}: hellaswag acc_norm {hs['acc_norm']:.4f} (n={hs['n']})",
                                  file=sys.stderr)
            if _due(step, cfg.eval.sample_every, last) and (info.is_main or tr.fsdp):
                texts = tr.sample()
                if texts and info.is_main:
                    with (tr.run_dir / "samples.txt").open("a", encoding="utf-8") as f:
                        for i, t in enumerate(texts):
                            f.write(f"=== step {step} sample {i} ===\n{t}\n")
                    for i, t in enumerate(texts):
                        tr.logger.log({"kind": "sample", "step": step, "index": i, "text": t})
                    bar.write(f"step {step}: sample: {texts[0]!r}", file=sys.stderr)
            if _due(step, cfg.checkpoint.every, False) or last or stop_req:
                tr.save()
            if stop_req:
                break
    finally:
        bar.close()
    summary = {"steps": tr.step, "max_steps": max_steps, "final_loss": rec.get("loss"), "val_loss": tr.last_val,
               "best_val_loss": tr.best_val, "tokens": tr.step * cfg.batch.batch_tokens,
               "stopped": stopped, "elapsed_s": time.time() - t_start,
               "ms_per_step": 1000 * sum(tr.dts) / len(tr.dts) if tr.dts else None}
    if stopped:
        gdist.print0(f"stopped ({stopped}) after step {tr.step}; resume with --resume auto")
    return summary
