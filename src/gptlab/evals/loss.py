"""Validation loss of any model (gptlab run, Hugging Face dir, Hub name, ...) on a prepared dataset, or on
llm.c / build-nanogpt shards without a manifest (a directory or glob; see :func:`gptlab.data.shards.open_manifest`).

The windows are exactly the sequences :class:`gptlab.data.loader.TokenLoader` reads from the split,
in order, so this number and the trainer's ``val_loss`` look at the same text: the split's shards are
taken in manifest order, and shard ``i`` with ``n_i`` tokens holds ``(n_i - 1) // T`` windows, window
``s`` being its tokens ``[s*T, s*T + T + 1)`` (inputs are the first T, targets the last T; no window
straddles two shards, a shard's last ``(n_i - 1) % T`` tokens are never scored). ``tokens=N`` scores
the first ``N // T`` windows, i.e. ``N`` rounded down to a multiple of T target tokens. The result is
the mean cross-entropy (nats per token) over all those targets, accumulated in float64.

Bits per byte (``bpb``) makes losses of different tokenizers comparable: the summed loss in nats over
``ln 2`` over the UTF-8 bytes the target tokens stand for (:func:`gptlab.tokenizer.token_byte_lengths`,
the dataset's tokenizer). Special tokens (``<|endoftext|>``) stand for no bytes and are left out of
both sums, as nanochat does, so a tokenizer that marks document ends is not charged for them.

On a chat dataset (``gptlab prepare chat``) the windows are its packed rows and only targets whose loss
mask is 1 (assistant replies) count, as in training; the others are ``IGNORE_INDEX`` (-1) targets.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gptlab.errors import GptlabError
from gptlab.evals.registry import no_grad

if TYPE_CHECKING:  # torch is imported inside the functions: gptlab eval --help builds this eval's flags
    import numpy as np
    import torch

# build-nanogpt's validation budget: 20 steps x 64 sequences x 1024 tokens x 8 GPUs.
DEFAULT_EVAL_TOKENS = 10_485_760


class EvalLossError(GptlabError, ValueError):
    """The dataset and the model do not fit together, or the request is larger than the split."""


def check_tokenizer(manifest: dict[str, Any], model_vocab: int, tokenizer: Any | None, where: str) -> None:
    """The dataset's tokens must mean the same to the model: same vocabulary size and, when the model's
    tokenizer is known, the same tokenizer spec."""
    from gptlab.tokenizer import fingerprint

    spec = manifest.get("tokenizer")
    kind = spec.get("type") if isinstance(spec, dict) else spec
    data_vocab = int(manifest["vocab_size"])
    data_fp = manifest.get("tokenizer_fingerprint") or (fingerprint(spec) if isinstance(spec, dict) else None)
    if tokenizer is not None and data_fp is not None and fingerprint(tokenizer) != data_fp:
        theirs = tokenizer.spec().get("type")
        raise EvalLossError(f"{where}: the dataset was tokenized with a {kind} tokenizer (vocab {data_vocab}) but "
                            f"the model uses a different {theirs} tokenizer; prepare the data with the model's "
                            f"tokenizer (gptlab prepare NAME --tokenizer {theirs}) or evaluate a matching model")
    if data_vocab != model_vocab:
        raise EvalLossError(f"{where}: the dataset's vocabulary has {data_vocab} tokens ({kind} tokenizer) but the "
                            f"model has {model_vocab}; they were not made with the same tokenizer")


def dataset_tokenizer(manifest: dict[str, Any], data_dir: str | os.PathLike, tokenizer: Any | None = None) -> Any | None:
    """The tokenizer that made ``data_dir``'s tokens: ``tokenizer`` when its spec matches, else the manifest's
    spec (a trained BPE's ranks are in the dataset dir); None when it cannot be built."""
    from gptlab.tokenizer import from_spec

    spec = manifest.get("tokenizer")
    if tokenizer is not None and (spec is None or tokenizer.spec() == spec):
        return tokenizer
    if not isinstance(spec, dict):
        return None
    try:
        return from_spec(spec, search=[data_dir])
    except GptlabError:
        return None


def byte_lengths_tensor(tokenizer: Any | None, device: torch.device | str) -> torch.Tensor | None:
    """Bytes per token id as an int64 tensor on ``device`` (None without a tokenizer)."""
    if tokenizer is None:
        return None
    import torch

    from gptlab.tokenizer import token_byte_lengths

    return torch.from_numpy(token_byte_lengths(tokenizer)).to(device)


def bpb_sums(per_token_nats: torch.Tensor, targets: torch.Tensor, nbytes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(nats of byte-bearing targets, their bytes)`` in float64, for bits per byte = nats / ln 2 / bytes."""
    t = targets.reshape(-1)
    nb = nbytes[t.clamp(min=0)] * (t != -1)  # masked chat targets (-1) count no bytes
    nats = per_token_nats.reshape(-1).double()
    return (nats * (nb > 0)).sum(), nb.sum().double()


def _windows(data_dir: Path, split: str, manifest: dict[str, Any], T: int
             ) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """(shard tokens, targets, number of windows) per shard of ``split`` in manifest order; the targets are
    the tokens, or for chat data the tokens with every loss-mask-0 position set to -1 (ignored)."""
    import numpy as np

    from gptlab.data.shards import read_mask, read_shard

    out = []
    for s in manifest["shards"]:
        if s["split"] != split:
            continue
        path = Path(s["path"]) if s.get("path") else data_dir / s["file"]
        arr = read_shard(path)
        tgt = arr
        if "mask" in s:
            mask = np.asarray(read_mask(data_dir / s["mask"], arr.size))
            tgt = np.where(mask == 1, np.asarray(arr, dtype=np.int64), np.int64(-1))
        out.append((arr, tgt, max(len(arr) - 1, 0) // T))
    return out


@no_grad
def evaluate_loss(model: torch.nn.Module, data_dir: str | os.PathLike, *, split: str = "val",
                  val: str | None = None,
                  tokens: int | None = None, seq_len: int | None = None, batch_size: int = 8,
                  device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                  tokenizer: Any | None = None, progress: bool = False) -> dict[str, Any]:
    """Mean loss of ``model`` over the first ``tokens`` targets of ``split`` (windows: module docstring).

    ``tokens`` None means the whole split, capped at :data:`DEFAULT_EVAL_TOKENS`; ``seq_len`` defaults to
    the model's context. Under torch.distributed, window ``i`` is scored by rank ``i % world_size`` and
    the sums are all-reduced, so every rank returns the global result (it is the same number as one
    process up to float summation order). ``dtype`` None is float32.
    """
    import numpy as np
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from gptlab.data.shards import open_manifest, verify_cached
    from gptlab.runtime import autocast, unwrap_model

    t0 = time.perf_counter()
    data_dir = Path(data_dir)
    device = torch.device(device)
    dtype = dtype or torch.float32
    manifest = open_manifest(data_dir, val)
    cfg = unwrap_model(model).config
    check_tokenizer(manifest, cfg.vocab_size, tokenizer, str(data_dir))
    verify_cached(data_dir, manifest)  # shard hashes and token range, once per dataset
    chat_T = int((manifest.get("chat") or {}).get("seq_len") or 0)
    T = int(seq_len or chat_T or cfg.block_size)
    if chat_T and T != chat_T:
        raise EvalLossError(f"seq_len {T}: {data_dir} holds chat rows of {chat_T} tokens; use --seq-len {chat_T}")
    if not 1 <= T <= cfg.block_size:
        raise EvalLossError(f"seq_len {T}: must be between 1 and the model's context ({cfg.block_size})")
    if batch_size < 1:
        raise EvalLossError(f"batch_size {batch_size}: must be >= 1")
    shards = _windows(data_dir, split, manifest, T)
    if not shards:
        have = sorted({s["split"] for s in manifest["shards"]})
        raise EvalLossError(f"{data_dir}: no {split!r} split in manifest.json (splits: {', '.join(have) or 'none'})")
    available = sum(n for _, _, n in shards)
    if tokens is None:
        n_windows = min(available, DEFAULT_EVAL_TOKENS // T)
    else:
        if tokens < T:
            raise EvalLossError(f"--tokens {tokens}: must be at least one window of seq_len {T}")
        n_windows = tokens // T
        if n_windows > available:
            raise EvalLossError(f"--tokens {tokens}: the {split} split of {data_dir} has only {available * T:,} "
                                f"scorable tokens ({available} windows of {T}); ask for fewer")
    if n_windows == 0:
        raise EvalLossError(f"{data_dir}: the {split} split has no window of {T + 1} tokens; lower --seq-len")

    import torch.distributed as dist

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    # Global window i -> (shard, offset): walk the shards in order.
    index = []
    for si, (_, _, n) in enumerate(shards):
        index += [(si, s * T) for s in range(n)]
        if len(index) >= n_windows:
            break
    mine = index[:n_windows][rank::world]
    per_rank = -(-n_windows // world)  # ceil: rank 0's share
    n_batches = -(-per_rank // batch_size)  # the same on every rank (FSDP all-gathers inside forward)

    was_training = model.training
    model.eval()
    nbytes = byte_lengths_tensor(dataset_tokenizer(manifest, data_dir, tokenizer), device)
    # (sum of losses, number of targets, nats of byte-bearing targets, their bytes)
    total = torch.zeros(4, dtype=torch.float64, device=device)
    try:
        bar = tqdm(total=n_batches, desc=f"loss {split}", unit="batch", file=sys.stderr,
                   disable=not progress or rank != 0)
        for b in range(n_batches):
            chunk = mine[b * batch_size:(b + 1) * batch_size]
            real = bool(chunk)
            if not real:  # this rank has run out: a dummy forward keeps collective counts equal
                chunk = index[:1]
            x = np.stack([shards[si][0][off: off + T] for si, off in chunk]).astype(np.int64)
            y = torch.from_numpy(np.stack([shards[si][1][off + 1: off + T + 1] for si, off in chunk])
                                 .astype(np.int64)).to(device)  # (B, T); -1: a masked chat target
            with autocast(device, dtype):
                logits, _ = model(torch.from_numpy(x).to(device))
            # Per target in fp32, as the model's own loss; summed in fp64.
            per = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none",
                                  ignore_index=-1)
            if real:
                total[0] += per.double().sum()
                total[1] += (y != -1).sum()
                if nbytes is not None:
                    nats, nb = bpb_sums(per, y, nbytes)
                    total[2] += nats
                    total[3] += nb
            bar.update(1)
        bar.close()
    finally:
        model.train(was_training)
    if world > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    loss_sum, count, nats, n_bytes = total.tolist()
    mean = loss_sum / count
    bpb = nats / math.log(2) / n_bytes if nbytes is not None and n_bytes > 0 else None
    return {"loss": mean, "bpb": bpb, "bytes": int(n_bytes) if nbytes is not None else None,
            "perplexity": math.exp(mean) if mean < 700 else float("inf"), "tokens": int(count),
            "windows": n_windows, "seq_len": T, "split": split, "data": str(data_dir),
            "dataset": manifest.get("dataset"), "seconds": round(time.perf_counter() - t0, 3)}


# --------------------------------------------------------------------------- during training


from gptlab.evals.registry import Curve, Eval, EvalContext, EvalOff, register  # noqa: E402


@register
class ValLoss(Eval):
    """The trainer's validation loss: the first ``eval.eval_tokens`` of the val split (the whole split at
    most: no token counted twice), read as the training loader reads (micro-batches of ``seq_len``,
    rank-strided), the same tokens at every evaluation; the mean over ranks."""

    name = "val"
    every_key = "eval_every"
    command = "loss"
    command_help = "mean validation loss (and bits per byte) over the first N tokens of a prepared dataset"
    curves = (Curve("val_loss", "loss", "Loss", metric="loss", help="train + val, nats/token"),
              Curve("val_bpb", "val bits per byte", "Validation bits per byte", metric="bpb",
                    help="val bits per byte, comparable across tokenizers", optional=True,
                    missing=" (validation off, or a run logged before bits per byte were recorded)"))
    plot_summary = {"last_val_loss": "last", "min_val_loss": "min"}

    def __init__(self, ctx: EvalContext) -> None:
        from gptlab.data.loader import LoaderError, TokenLoader
        from gptlab.data.shards import split_source

        cfg, info = ctx.cfg, ctx.info
        try:
            self.loader = TokenLoader(split_source(ctx.data_dir, "val", cfg.data.val or None), "val",
                                      cfg.batch.micro_batch, cfg.seq_len, rank=info.rank,
                                      world_size=info.world_size, shuffle=False, seed=0, device=ctx.device)
        except LoaderError as e:
            from gptlab.data.shards import open_manifest

            total = sum(int(s["tokens"]) for s in open_manifest(ctx.data_dir, cfg.data.val or None)["shards"]
                        if s["split"] == "val")
            raise EvalOff(f"validation is off: the val split ({total:,} tokens) is unusable: {e}") from None
        avail = self.loader.batches_per_epoch
        per_batch = cfg.batch.micro_batch * cfg.seq_len * info.world_size
        want = cfg.eval.eval_tokens // per_batch if cfg.eval.eval_tokens else avail
        self.steps = max(1, min(want, avail))
        # Bytes per token id of the data's tokenizer, for val_bpb (None when it cannot be built).
        from gptlab.data.shards import open_manifest

        tok = dataset_tokenizer(open_manifest(ctx.data_dir, cfg.data.val or None), ctx.data_dir, ctx.tokenizer)
        self.nbytes = byte_lengths_tensor(tok, ctx.device)

    @no_grad
    def run(self, model: torch.nn.Module, ctx: EvalContext) -> list[dict[str, Any]]:
        import torch
        import torch.nn.functional as F

        from gptlab import dist as gdist

        model.eval()
        self.loader.reset()
        total = torch.zeros((), device=ctx.device, dtype=torch.float32)
        bpb = torch.zeros(2, device=ctx.device, dtype=torch.float64)  # (nats of byte-bearing targets, bytes)
        for _ in range(self.steps):
            x, y = self.loader.next_batch()
            with ctx.amp():
                logits, loss = model(x, y)
            total += loss.float()
            if self.nbytes is not None:
                per = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none",
                                      ignore_index=-1)
                nats, nb = bpb_sums(per, y, self.nbytes)
                bpb[0] += nats
                bpb[1] += nb
        model.train()
        rec: dict[str, Any] = {"val_loss": gdist.all_reduce_mean(total / self.steps).item()}
        if self.nbytes is not None:
            nats, nb = gdist.all_reduce_sum(bpb).tolist()
            rec["val_bpb"] = nats / math.log(2) / nb if nb > 0 else None
        return [rec]

    def describe(self) -> str:
        return f"val {self.steps} batches/eval"

    def report(self, records: list[dict[str, Any]]) -> str:
        bpb = records[0].get("val_bpb")
        return f"val loss {records[0]['val_loss']:.4f}" + (f", {bpb:.4f} bits/byte" if bpb is not None else "")

    # ----------------------------------------------------------------- gptlab eval loss
    @classmethod
    def add_arguments(cls, p: argparse.ArgumentParser) -> None:
        from gptlab.commands import device_arg, init_arg, json_arg, quantize_arg

        init_arg(p)
        p.add_argument("--data", required=True, help="prepared dataset directory, or a directory or quoted glob of "
                                                      "llm.c / build-nanogpt shards (val: files named *_val_*)")
        p.add_argument("--val", default=None, metavar="GLOB", help="validation shards of a manifest-less --data")
        p.add_argument("--split", default="val")
        p.add_argument("--tokens", type=int, default=None, help="number of validation tokens (default: all, up to 10M)")
        p.add_argument("--seq-len", type=int, default=None, help="sequence length (default: the model's context)")
        p.add_argument("--batch-size", type=int, default=8)
        p.add_argument("--dtype", default="auto")
        quantize_arg(p)
        device_arg(p)
        json_arg(p)

    @classmethod
    def run_cli(cls, args: argparse.Namespace) -> dict[str, Any]:
        """``gptlab eval loss --init SRC --data DIR [--tokens N] [--seq-len T] [--json]``."""
        from gptlab.data.shards import open_manifest
        from gptlab.kernels import apply_cpu_kernels
        from gptlab.loading import load_model
        from gptlab.runtime import resolve_device, resolve_dtype

        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
        open_manifest(args.data, args.val)  # a bad --data fails before the (possibly slow) model load
        model, tokenizer = load_model(args.init, device=device)
        if args.quantize:
            from gptlab.quantize import quantize_model

            quantize_model(model, args.quantize)
        apply_cpu_kernels(model)  # after quantizing: quantized layers are not nn.Linear and stay
        res = evaluate_loss(model, args.data, split=args.split, val=args.val, tokens=args.tokens,
                            seq_len=args.seq_len, batch_size=args.batch_size, device=device, dtype=dtype,
                            tokenizer=tokenizer, progress=not args.json)
        return {"task": "loss", "init": args.init, **res, "device": str(device),
                "dtype": str(dtype).removeprefix("torch."), "quantize": args.quantize}

    @classmethod
    def cli_report(cls, res: dict[str, Any], args: argparse.Namespace) -> str:
        bpb = f", {res['bpb']:.4f} bits per byte" if res.get("bpb") is not None else ""
        return (f"{res['split']} loss {res['loss']:.4f}{bpb} (perplexity {res['perplexity']:.2f}) over "
                f"{res['tokens']:,} tokens ({res['windows']} windows of {res['seq_len']}) in {res['seconds']:.1f}s")
