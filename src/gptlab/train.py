"""``gptlab train``: the training loop, on one process or many (torchrun: DDP, or FSDP2 with system.fsdp).

Reads top to bottom: :func:`build` does every set-up step once (precision, data, resume decision,
model, seeding, wrapping, optimizer, evals, restoring a checkpoint, run dir, banner) and returns a
:class:`Trainer`; :meth:`Trainer.fit` is the loop: one optimizer step (:meth:`Trainer.train_step`), log,
the evals that are due, a checkpoint when due. The pieces live beside it: ``gptlab/trainer/`` (set-up
helpers, the checkpoint state as parts), ``gptlab.dist.Parallel`` (single / DDP / FSDP2),
``gptlab.evals.registry`` (the evals), ``gptlab.hooks`` (where tests inject faults). This file keeps
only the order of things, so that the order can be read in one place.

Numerics worth knowing:
- The loss of each micro-step is divided by the number of micro-steps, so the accumulated gradient is the
  gradient of the mean loss over the whole batch (as one big batch would give).
- Under DDP gradients are all-reduced (averaged) only on the last micro-step (``no_sync`` before).
- Steps are counted from 1 in logs, metrics and checkpoint names (the number of updates done); the LR
  schedule is a pure function of the 0-based step (``gptlab.optim``).
- Resume is bit-exact on CPU: weights, optimizer, every RNG and every rank's loader position are restored,
  and nothing between checkpoints draws from the global RNG except dropout.
"""

from __future__ import annotations

import math
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from gptlab import dist as gdist
from gptlab import hooks
from gptlab.checkpoint import prune_checkpoints, read_meta
from gptlab.data.shards import verify_cached
from gptlab.config import ConfigError, TrainConfig, to_dict
from gptlab.errors import GptlabError
from gptlab.kernels import apply_cpu_kernels, training_probe
from gptlab.evals.registry import Eval, EvalContext, EvalOff, due, registered
from gptlab.metrics import MetricsLogger, flops_per_token, format_step, mfu, peak_flops
from gptlab.model import GPT
from gptlab.optim import build_optimizer, lr_factor, set_lr
from gptlab.runtime import autocast, resolve_dtype, seed_everything
from gptlab.trainer import setup as S
from gptlab.trainer.setup import ResumeError, StopFlag  # noqa: F401  (ResumeError: public, raised by build)
from gptlab.trainer.state import (
    CheckpointState, ModelPart, OptimizerPart, Prefetcher, Progress, RNGPart, RunInfo, ScalerPart,
)


class TrainingDiverged(GptlabError):
    """A non-finite loss or gradient norm: the run stopped before applying that update."""


@dataclass
class Trainer:
    """One training run, built by :func:`build`; :meth:`fit` runs it."""

    cfg: TrainConfig
    info: gdist.DistInfo
    parallel: gdist.Parallel
    device: torch.device
    dtype: torch.dtype
    run_dir: Path
    raw_model: GPT  # evaluation, sampling and checkpoints use it (sharded under FSDP2)
    model: nn.Module  # what the loop calls: the raw model, maybe compiled, maybe DDP-wrapped
    optimizer: torch.optim.Optimizer
    scaler: Any
    train_data: Prefetcher
    grad_accum: int
    evals: list[Eval]
    eval_ctx: EvalContext
    state: CheckpointState
    progress: Progress
    logger: MetricsLogger
    stop: StopFlag
    t_start: float
    dts: deque = field(default_factory=lambda: deque(maxlen=20))

    # ----------------------------------------------------------------- the loop
    def fit(self) -> dict[str, Any]:
        """Step, log, evaluate, checkpoint, until ``schedule.max_steps`` or a stop (signal, time limit)."""
        cfg, info, max_steps = self.cfg, self.info, self.cfg.schedule.max_steps
        peak = peak_flops(torch.cuda.get_device_name(self.device)) if self.device.type == "cuda" else None
        fpt = flops_per_token(self.raw_model.config, cfg.seq_len, self.raw_model.num_params())
        time_limit_s = cfg.system.time_limit * 60
        stopped, rec = None, {}
        from tqdm.auto import tqdm

        bar = tqdm(total=max_steps, initial=self.progress.step, file=sys.stderr, dynamic_ncols=True, unit="step",
                   disable=(not info.is_main or not cfg.logging.progress) or None, leave=False)
        self.stop.install()
        if self.stop.reason is not None:  # a signal during start-up: nothing trained, nothing to save
            bar.close()
            gdist.print0(f"stopped ({self.stop.reason}) during start-up, before step {self.progress.step + 1}; "
                         f"nothing to save")
            return {"steps": self.progress.step, "max_steps": max_steps, "final_loss": None, "val_loss": None,
                    "best_val_loss": self.progress.best_val, "tokens": self.progress.step * cfg.batch.batch_tokens,
                    "stopped": self.stop.reason, "elapsed_s": time.time() - self.t_start, "ms_per_step": None}
        try:
            while self.progress.step < max_steps:
                want_stop = self.stop.reason is not None or (0 < time_limit_s < time.time() - self.t_start)
                rec = self.train_step(want_stop)
                step, last, stop_req = self.progress.step, self.progress.step == max_steps, rec.pop("stop")
                if step > 1:  # the first step includes compilation / warm-up
                    self.dts.append(rec["dt_ms"] / 1000)
                avg = sum(self.dts) / len(self.dts) if self.dts else rec["dt_ms"] / 1000
                rec["mfu"] = mfu(rec["tokens_per_s"], fpt, peak, info.world_size)
                rec["eta_s"] = avg * (max_steps - step)
                self.logger.log({k: v for k, v in rec.items() if v is not None and k != "eta_s"})
                bar.update(1)
                if info.is_main and (step % cfg.logging.log_every == 0 or step == max_steps or step == 1):
                    bar.write(format_step(rec, max_steps), file=sys.stderr)
                hooks.fire("step_logged", step=step)
                if stop_req:
                    # A stop (signal, time limit) skips evaluations that are not due: schedulers give a
                    # short grace period, and the checkpoint below is what must make it to disk.
                    stopped = self.stop.reason or "time_limit"
                self.run_evals(step, last, bar)
                if due(step, cfg.checkpoint.every, False) or last or stop_req:
                    self.save()
                if stop_req:
                    break
        finally:
            bar.close()
            self.stop.uninstall()
        if stopped:
            gdist.print0(f"stopped ({stopped}) after step {self.progress.step}; resume with --resume auto")
        p = self.progress
        return {"steps": p.step, "max_steps": max_steps, "final_loss": rec.get("loss"), "val_loss": p.last_val,
                "best_val_loss": p.best_val, "tokens": p.step * cfg.batch.batch_tokens, "stopped": stopped,
                "elapsed_s": time.time() - self.t_start,
                "ms_per_step": 1000 * sum(self.dts) / len(self.dts) if self.dts else None}

    # ----------------------------------------------------------------- one optimizer step
    def train_step(self, stop_now: bool) -> dict[str, Any]:
        """Forward/backward over ``grad_accum`` micro-batches, clip, check, update. Returns the log record
        (and ``stop``: whether any rank asked to stop)."""
        cfg, step0 = self.cfg, self.progress.step  # 0-based index of this update
        factor = lr_factor(step0, cfg.optim, cfg.schedule.max_steps)
        set_lr(self.optimizer, factor)
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float32)
        for micro in range(self.grad_accum):
            x, y = self.train_data.next()
            with self.parallel.sync_gradients(self.model, self.raw_model, last=micro == self.grad_accum - 1):
                with autocast(self.device, self.dtype):
                    _, loss = self.model(x, y)
                # Mean over the whole batch: each of the grad_accum micro-losses counts 1/grad_accum.
                loss = hooks.apply("micro_loss", loss / self.grad_accum, step=step0 + 1, rank=self.info.rank)
                loss_sum += loss.detach().float()
                self.train_data.prefetch()  # overlaps the next batch's copy with this backward
                self.scaler.scale(loss).backward()
        # One collective carries the loss (for logging) and the stop request of every rank.
        flags = torch.stack([loss_sum, torch.tensor(float(stop_now), device=self.device)])
        gdist.all_reduce_sum(flags)
        loss_val, stop = flags[0].item() / self.info.world_size, flags[1].item() > 0
        self.scaler.unscale_(self.optimizer)
        norm = self.parallel.clip_grad_norm(self.model, cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf)
        step_num = step0 + 1
        if not math.isfinite(loss_val) or (not math.isfinite(norm) and not self.scaler.is_enabled()):
            what = "loss" if not math.isfinite(loss_val) else "gradient norm"
            good = f"step {self.progress.last_ckpt_step}" if self.progress.last_ckpt_step > 0 else "none"
            raise TrainingDiverged(
                f"step {step_num}: {what} is {loss_val if what == 'loss' else norm} (loss {loss_val}, grad norm "
                f"{norm}); stopped before the optimizer step. Last good checkpoint: {good} in "
                f"{self.run_dir / 'checkpoints'}. Try a lower optim.lr, a longer optim.warmup_steps, "
                f"or optim.grad_clip=1.0")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - t0
        self.progress.step = step_num
        return {"kind": "train", "step": step_num, "loss": loss_val, "lr": cfg.optim.lr * factor,
                "grad_norm": norm, "dt_ms": 1000 * dt, "tokens_per_s": cfg.batch.batch_tokens / dt,
                "tokens": step_num * cfg.batch.batch_tokens, "stop": stop}

    # ----------------------------------------------------------------- evals and checkpoints
    def run_evals(self, step: int, last: bool, bar: Any) -> None:
        """Every registered eval that is due after ``step``, in registry order; records go to the metrics."""
        for ev in list(self.evals):
            if not due(step, ev.every(self.cfg), last):
                continue
            if ev.main_only and not (self.info.is_main or self.parallel.sharded):
                continue
            self.eval_ctx.step = step
            try:
                records = ev.run(self.raw_model, self.eval_ctx)
            except EvalOff as e:
                gdist.print0(f"warning: {e}")
                self.evals.remove(ev)
                continue
            for r in records:
                self.logger.log({"kind": ev.name, "step": step, **r})
                if "val_loss" in r:
                    self.progress.observe_val(step, r["val_loss"])
            line = ev.report(records)
            if line and self.info.is_main:
                bar.write(f"step {step}: {line}", file=sys.stderr)

    def save(self) -> None:
        """Checkpoint (all ranks call this; rank 0 writes), then keep the last K (+ the best)."""
        path = self.state.save(self.run_dir, self.progress.step)
        if path is not None:
            prune_checkpoints(self.run_dir, self.cfg.checkpoint.keep_last, self.cfg.checkpoint.keep_best)
            gdist.print0(f"checkpoint: {path}")
        self.progress.last_ckpt_step = self.progress.step
        gdist.barrier()


# --------------------------------------------------------------------------- set-up, once


def build(cfg: TrainConfig, info: gdist.DistInfo, device: torch.device, stop: StopFlag | None = None,
          held: list | None = None) -> Trainer:
    """Everything before the first step, in order; returns the :class:`Trainer` ready to :meth:`~Trainer.fit`."""
    t_start = time.time()
    stop = stop or StopFlag()
    held = held if held is not None else []
    S.set_precision(cfg, device)
    dtype = resolve_dtype(cfg.system.dtype, device)
    grad_accum = cfg.grad_accum_steps(info.world_size)

    # ---- the run dir (rank 0 locks it for the whole run), data, the run to continue (rank 0 decides)
    def lock_run_dir() -> str:
        path, lock = S.open_run_dir(cfg)
        held.append(lock)  # released by train() when the run ends, however it ends
        return str(path)

    run_dir = Path(S.on_main(lock_run_dir))
    data_dir = S.resolve_data_dir(cfg)
    manifest = S.on_main(S.prepare_data, cfg, data_dir)
    hashed = S.on_main(verify_cached, data_dir, manifest)  # shard hashes + token range, once per dataset
    if hashed:
        gdist.print0(f"data: verified {hashed} shard(s) of {data_dir} (sha256, token range); remembered")
    tok_spec, vocab_size = manifest["tokenizer"], int(manifest["vocab_size"])
    if S.split_tokens(manifest, "train") < cfg.batch.micro_batch * cfg.seq_len + 1:
        raise GptlabError(f"{data_dir}: the train split has {S.split_tokens(manifest, 'train')} tokens, fewer than "
                          f"one micro-batch ({cfg.batch.micro_batch} x {cfg.seq_len}); use more data or smaller batches")
    ckpt_s = S.on_main(lambda: str(c) if (c := S.decide_resume(cfg, run_dir)) else None)
    ckpt = Path(ckpt_s) if ckpt_s else None
    resume_meta = read_meta(ckpt) if ckpt else None
    if resume_meta is not None:
        S.check_resume_compatible(cfg, resume_meta, info.world_size, ckpt)
        if note := S.schedule_note(cfg, resume_meta):
            gdist.print0(note)

    # ---- model (the checkpoint's weights, model.init's, or a seeded init), wrapped; optimizer
    raw, init_tok, origin = S.build_model(cfg, vocab_size, ckpt, tok_spec)
    from gptlab.chat import is_chat_twin
    from gptlab.tokenizer import fingerprint

    if init_tok is not None and fingerprint(init_tok) != fingerprint(tok_spec) and is_chat_twin(init_tok.spec(),
                                                                                               tok_spec):
        init_tok = None  # chat fine-tuning: the run's tokenizer is the data's, the base's plus the chat tokens
    S.check_data_pairing(cfg, manifest, data_dir, init_tok, resume_meta)
    if cfg.seq_len > raw.config.block_size:
        raise ConfigError(f"batch.seq_len={cfg.seq_len} exceeds the model's context ({raw.config.block_size})")
    raw.to(device)
    raw.train()
    # CPU fp32 only; in place, before wrapping: the parameters stay the same objects. Compiled steps trace
    # the layers as F.linear anyway, so only an eager step is worth probing.
    apply_cpu_kernels(raw, *(() if cfg.system.compile else training_probe(raw, cfg.batch.micro_batch, cfg.seq_len)))
    # Dropout draws from the global generator; ranks get different streams, as nanoGPT's seed offset.
    seed_everything(cfg.system.seed + info.rank)
    parallel = gdist.Parallel(info, fsdp=cfg.system.fsdp)
    model = parallel.wrap(raw, device, compile=cfg.system.compile)
    optimizer, groups_summary = build_optimizer(raw, cfg.optim, device)
    scaler = torch.amp.GradScaler(device.type, enabled=(dtype == torch.float16 and device.type == "cuda"))

    # ---- training data, evals
    from gptlab.data.loader import TokenLoader
    from gptlab.data.shards import split_source
    from gptlab.tokenizer import from_spec

    train_data = Prefetcher(TokenLoader(split_source(data_dir, "train", cfg.data.val or None), "train",
                                        cfg.batch.micro_batch, cfg.seq_len, rank=info.rank,
                                        world_size=info.world_size, shuffle=cfg.data.shuffle, seed=cfg.data.seed,
                                        device=device))
    eval_ctx = EvalContext(cfg=cfg, info=info, parallel=parallel, device=device, dtype=dtype, data_dir=data_dir,
                           run_dir=run_dir, tokenizer=init_tok or from_spec(tok_spec, search=[data_dir]))
    evals = []
    for cls in registered():
        if cls.every(cfg):
            try:
                evals.append(cls(eval_ctx))
            except EvalOff as e:
                gdist.print0(f"warning: {e}")

    # ---- the checkpoint as parts; restore them when resuming
    progress = Progress(cfg, info.world_size)
    sha = S.git_sha()
    run_info = {"config": to_dict(cfg), "model_config": to_dict(raw.config), "tokenizer": tok_spec,
                "fsdp": parallel.sharded, "versions": S.versions(), "git_sha": sha}
    state = CheckpointState({"model": ModelPart(raw, parallel), "optimizer": OptimizerPart(raw, optimizer, parallel),
                             "rng": RNGPart(), "loaders": train_data, "scaler": ScalerPart(scaler),
                             "progress": progress, "run": RunInfo(run_info)}, tied=raw.config.tie_embeddings)
    if ckpt is not None:
        state.load(ckpt, info.rank, skip=("model",))  # build_model made the model from ckpt's weights

    # ---- run dir, logger, banner
    if info.is_main:
        S.write_run_dir(cfg, run_dir, progress.step, ckpt is not None, raw.config, data_dir, tok_spec, protect=ckpt)
    logger = MetricsLogger(run_dir, enabled=info.is_main, wandb=cfg.logging.wandb,
                           wandb_project=cfg.logging.wandb_project, wandb_run_name=cfg.logging.wandb_run_name,
                           tensorboard=cfg.logging.tensorboard, config=to_dict(cfg))
    gdist.print0(S.banner(cfg, run_dir=run_dir, data_dir=data_dir, device=device, dtype=dtype,
                          world=parallel.describe(), model=raw, origin=origin, grad_accum=grad_accum,
                          world_size=info.world_size, evals=[d for e in evals if (d := e.describe())],
                          groups=groups_summary, sha=sha,
                          resumed=f"resumed from {ckpt} at step {progress.step}" if ckpt else None))
    return Trainer(cfg=cfg, info=info, parallel=parallel, device=device, dtype=dtype, run_dir=run_dir, raw_model=raw,
                   model=model, optimizer=optimizer, scaler=scaler, train_data=train_data, grad_accum=grad_accum,
                   evals=evals, eval_ctx=eval_ctx, state=state, progress=progress, logger=logger,
                   stop=stop, t_start=t_start)


def train(cfg: TrainConfig, stop: StopFlag | None = None) -> dict[str, Any]:
    """Run training as ``cfg`` says; returns a summary dict. Raises :class:`TrainingDiverged` on NaN/Inf.

    ``stop`` is a :class:`StopFlag` the caller installed earlier (``gptlab train`` does, before importing
    torch); a signal before the first step then ends the run cleanly with nothing to save.
    """
    stop = stop or StopFlag()
    stop.install()
    held: list = []  # rank 0's run-dir lock
    try:
        info, device = gdist.init_distributed(cfg.system.device)
        try:
            trainer = build(cfg, info, device, stop, held)
            try:
                summary = trainer.fit()
            finally:
                trainer.logger.close()
            return {**summary, "run_dir": str(trainer.run_dir)}
        finally:
            gdist.destroy()
    finally:
        for lock in held:
            lock.release()
        stop.uninstall()
