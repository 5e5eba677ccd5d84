"""What :func:`gptlab.train.build` does once before the loop: precision, data, the resume decision and
its rules, the model's initial weights, the run dir's files, the start-up banner, signal handling.

Every function here runs once per run; nothing here is called from inside the training loop.
"""

from __future__ import annotations

import json
import platform
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
from gptlab.trainer.signals import StopFlag  # noqa: F401  (re-exported)


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
        from gptlab.checkpoint import CheckpointError
        from gptlab.fsio import DiskError, LockError

        known = (ResumeError, ConfigError, LockError, CheckpointError, DiskError)
        cls = {c.__name__: c for c in known}.get(error[0], GptlabError)
        raise cls(error[1])
    return result


def is_chat_data(cfg: TrainConfig) -> bool:
    """Whether ``data.dataset`` is conversations (prepared with the chat template, trained with a loss mask)."""
    from gptlab.data.sources import DATASETS

    info = DATASETS.get(cfg.data.dataset)
    return info is not None and info.layout == "chat"


def chat_base_tokenizer(cfg: TrainConfig) -> Any:
    """The tokenizer chat data is rendered with: ``data.tokenizer``, else ``model.init``'s, else GPT-2's."""
    from gptlab.data.prepare import resolve_tokenizer

    if cfg.data.tokenizer or not cfg.model.init:
        return resolve_tokenizer(cfg.data.tokenizer or None)
    from gptlab.loading import read_source

    tok = read_source(cfg.model.init).tokenizer
    if tok is None:
        raise ConfigError(f"model.init={cfg.model.init!r} comes without a tokenizer; set data.tokenizer for the "
                          f"chat data (gpt2 or a tokenizer directory)")
    return tok


def resolve_data_dir(cfg: TrainConfig) -> Path:
    if cfg.data.dir:
        return Path(cfg.data.dir).expanduser()
    from gptlab.data.sources import default_data_dir

    if is_chat_data(cfg):
        # Rendered conversations depend on the tokenizer and the row length, generated ones also on their
        # count and seed: one directory for each, so --data.task_examples N never reuses another count's data.
        from gptlab.tokenizer import fingerprint

        fp = fingerprint(chat_base_tokenizer(cfg))[:10]
        task = (f"-{cfg.data.task}-n{cfg.data.task_examples}-s{cfg.data.seed}"
                if cfg.data.task and not cfg.data.input else "")
        return default_data_dir(f"{cfg.data.dataset}{task}-{fp}-T{cfg.seq_len}")
    return default_data_dir(cfg.data.dataset)


def prepare_data(cfg: TrainConfig, data_dir: Path) -> dict[str, Any]:
    """The manifest of ``data_dir``, preparing ``data.dataset`` there first when it has none (rank 0).

    Chat data is rendered with the base model's tokenizer into rows of ``batch.seq_len``; with no
    ``data.input`` and a ``data.task``, the task's conversations are generated first (``DIR.conversations.jsonl``
    beside the data directory, kept as the record of what was trained on).

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
        from gptlab.data.prepare import prepare_chat, prepare_dataset

        if is_chat_data(cfg):
            source: Any = cfg.data.input or None
            if source is None and cfg.data.task:
                from gptlab.chat import write_conversations
                from gptlab.evals.chat import task_conversations

                # Beside the data directory, not in it: prepare only builds into a directory of its own.
                data_dir.parent.mkdir(parents=True, exist_ok=True)
                source = data_dir.with_name(data_dir.name + ".conversations.jsonl")
                n = write_conversations(source, task_conversations(cfg.data.task_examples, cfg.data.seed,
                                                                   task=cfg.data.task))
                gdist.print0(f"data: generated {n:,} {cfg.data.task!r} conversations in {source}")
            gdist.print0(f"data: {data_dir} has no manifest.json; preparing {cfg.data.dataset!r} in rows of "
                         f"{cfg.seq_len} tokens" + (f" from {source}" if source else ""))
            prepare_chat(cfg.data.dataset, input=source, out=data_dir, tokenizer=chat_base_tokenizer(cfg),
                         seq_len=cfg.seq_len, val_fraction=cfg.data.val_fraction, progress=True)
            return read_manifest(data_dir)
        gdist.print0(f"data: {data_dir} has no manifest.json; preparing {cfg.data.dataset!r}"
                     + (f" from {cfg.data.input}" if cfg.data.input else ""))
        prepare_dataset(cfg.data.dataset, input=cfg.data.input or None, out=data_dir,
                        field=cfg.data.field, tokenizer=cfg.data.tokenizer or None,
                        val_fraction=cfg.data.val_fraction, progress=True)
    return read_manifest(data_dir)


def split_tokens(manifest: dict[str, Any], split: str) -> int:
    return sum(int(s["tokens"]) for s in manifest["shards"] if s["split"] == split)


def build_model(cfg: TrainConfig, vocab_size: int, resume: Path | None, tok_spec: dict[str, Any] | None = None
                ) -> tuple[GPT, Any | None, str]:
    """The raw model (weights from the checkpoint being resumed, ``model.init``, or a seeded init),
    the init source's tokenizer (if any) and a description of where the weights came from.

    Chat fine-tuning: when the data's tokenizer (``tok_spec``) is ``model.init``'s with the chat tokens
    appended, those ids become real tokens of the model (:func:`gptlab.chat.extend_vocab`; for GPT-2
    they are rows the padded vocabulary already has).

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
        if model.config.vocab_size < vocab_size and init_tok is not None and tok_spec is not None:
            from gptlab.chat import extend_vocab, is_chat_twin

            if is_chat_twin(init_tok.spec(), tok_spec):
                added = vocab_size - model.config.vocab_size
                model = extend_vocab(model, vocab_size, pad_multiple=cfg.model.pad_vocab_multiple)
                return model, init_tok, f"init from {cfg.model.init}, {added} chat tokens added"
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


RUN_FILES = ("config.json", "tokenizer.json", "metrics.jsonl", "samples.txt")


def is_run_dir(d: Path) -> bool:
    """A directory ``train --out`` may use: empty, or holding a gptlab run (its config, metrics or checkpoints)."""
    if not any(d.iterdir()):
        return True
    if (d / "metrics.jsonl").is_file() or list((d / "checkpoints").glob("step_*")):
        return True
    try:
        cfg = json.loads((d / "config.json").read_text(encoding="utf-8"))
        return isinstance(cfg, dict) and {"model", "optim", "batch"} <= set(cfg) and "model_type" not in cfg
    except (OSError, ValueError):
        return False


def open_run_dir(cfg: TrainConfig) -> tuple[Path, Any]:
    """Rank 0: the checked ``--out`` (not ``/``, home, or someone else's files) and its lock, held by this run."""
    from gptlab.fsio import DirLock, guard_out_dir

    run_dir = guard_out_dir(cfg.out_dir or Path("runs") / cfg.name, "--out", is_run_dir, "run")
    return run_dir, DirLock(run_dir, "run directory").acquire()


def decide_resume(cfg: TrainConfig, run_dir: Path) -> Path | None:
    """The checkpoint to resume from (None: start at step 0), following ``cfg.resume``: the newest
    checkpoint that verifies (``auto``; a damaged newer one is skipped with a warning), the one of step
    ``N`` (``resume = "N"``), none (``never``); with no flag, a run dir that has progress is refused."""
    from gptlab.checkpoint import load_newest, verify_checkpoint

    train_records = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind") == "train"]
    last_logged = max((int(r["step"]) for r in train_records), default=0)
    if cfg.resume == "never":
        return None
    if cfg.resume == "auto" or cfg.resume.isdigit():
        step = int(cfg.resume) if cfg.resume.isdigit() else None
        found = load_newest(run_dir, verify_checkpoint, step=step, warn=lambda m: gdist.print0(f"warning: {m}"))
        if found is not None:
            return found[0]
        lost = f"; metrics.jsonl's records up to step {last_logged} are dropped" if last_logged else ""
        gdist.print0(f"resume: no complete checkpoint in {run_dir}; starting fresh from step 0{lost}")
        return None
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None or last_logged:
        raise ResumeError(f"{run_dir}: already holds a run (step {last_logged or ckpt.name}); pass --resume auto "
                          f"to continue it, --resume never to start over there, or another --out")
    return None


def clear_run(run_dir: Path) -> None:
    """``--resume never``: remove what gptlab wrote in ``run_dir`` (metrics, samples, checkpoints), nothing else."""
    import shutil

    for f in ("metrics.jsonl", "samples.txt"):
        (run_dir / f).unlink(missing_ok=True)
    root = run_dir / "checkpoints"
    if root.is_dir():
        for d in root.iterdir():
            if d.is_dir() and (d.name.startswith("step_") or d.name.startswith((".tmp-", ".old-", ".del-"))):
                shutil.rmtree(d, ignore_errors=True)
        if not any(root.iterdir()):
            root.rmdir()


def check_data_pairing(cfg: TrainConfig, manifest: dict[str, Any], data_dir: Path, init_tok: Any | None,
                       resume_meta: dict[str, Any] | None) -> None:
    """The model's tokenizer (``model.init``'s, or the resumed run's) must be the data's: same fingerprint."""
    from gptlab.tokenizer import fingerprint

    data_fp = manifest.get("tokenizer_fingerprint") or fingerprint(manifest["tokenizer"])
    kind = manifest["tokenizer"].get("type")
    # The whole tokenizer must match, not just its kind: two trained BPEs (or char tables) give ids
    # different meanings.
    if init_tok is not None and fingerprint(init_tok) != data_fp:
        theirs = init_tok.spec().get("type")
        how = "the same tokenizer directory" if theirs == "bpe" else theirs
        raise ConfigError(f"model.init={cfg.model.init!r} uses a {theirs} tokenizer (fingerprint "
                          f"{fingerprint(init_tok)[:12]}) but {data_dir} was prepared with a different {kind} one "
                          f"({data_fp[:12]}; fingerprints differ: the ids would mean other tokens); prepare the "
                          f"data with --tokenizer {how}")
    spec = (resume_meta or {}).get("tokenizer")
    if isinstance(spec, dict) and fingerprint(spec) != data_fp:
        raise ResumeError(f"{data_dir}: prepared with a different {kind} tokenizer than the run being resumed "
                          f"(fingerprints differ); resume with the run's data, or start a new --out")


def schedule_note(cfg: TrainConfig, meta: dict[str, Any]) -> str | None:
    """A warning when the resumed run's ``max_steps`` differs: the lr schedule (warmup/decay) changes."""
    from gptlab.optim import lr_factor

    old = meta.get("config", {}).get("schedule", {}).get("max_steps")
    new, step = cfg.schedule.max_steps, int(meta.get("step", 0))
    if old is None or old == new:
        return None
    a, b = (cfg.optim.lr * lr_factor(step, cfg.optim, m) for m in (old, new))
    return (f"warning: resuming with max_steps {new} where the run had {old}: the learning-rate schedule "
            f"changes (lr at step {step + 1}: {a:.3g} -> {b:.3g}); use --max-steps {old} to keep it")


def write_run_dir(cfg: TrainConfig, run_dir: Path, start_step: int, resumed: bool, model_config: ModelConfig,
                  data_dir: Path, tok_spec: dict[str, Any], protect: Path | None = None) -> None:
    """Rank 0: make the run dir; start over (``--resume never``) or cut metrics and samples written after
    the resumed step; write the resolved ``config.json`` and ``tokenizer.json``."""
    from gptlab.evals.samples import truncate_samples
    from gptlab.metrics import truncate_metrics

    from gptlab.checkpoint import prune_checkpoints

    run_dir.mkdir(parents=True, exist_ok=True)
    if not resumed:
        clear_run(run_dir)  # --resume never, or auto with nothing to resume: only gptlab's own files go
    # Leftovers of a killed save or prune, and a checkpoint beyond keep_last from a kill before pruning.
    prune_checkpoints(run_dir, cfg.checkpoint.keep_last, cfg.checkpoint.keep_best, protect=protect)
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
