"""HellaSwag, scored completion-style as in the GPT-2 reproduction (build-nanogpt's ``hellaswag.py``).

Each example has a context and four candidate endings. Every candidate is the row
``tokens(ctx) + tokens(" " + ending)``; the model scores it by its cross-entropy on the *ending tokens
only* (each predicted from everything before it). ``acc`` picks the ending with the smallest summed
loss, ``acc_norm`` the smallest mean loss per ending token (the length-normalised number that GPT-2 /
GPT-3 reproductions quote). This differs from the multiple-choice prompt of EleutherAI's harness, so
the numbers are not interchangeable with the harness's.

Data: the original ``hellaswag_{split}.jsonl`` of https://github.com/rowanz/hellaswag (fields ``ind``,
``ctx``, ``ctx_a``, ``ctx_b``, ``label``, ``endings``, ``activity_label``, ``split``, ...), downloaded once
into ``$GPTLAB_DATA_HOME/hellaswag`` (default ``~/.cache/gptlab/data/hellaswag``) or read from a local file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from gptlab.errors import GptlabError
from gptlab.evals import GPT2_HELLASWAG_ACC, GPT2_HELLASWAG_ACC_NORM, GPT3_HELLASWAG_ACC_NORM  # noqa: F401
from gptlab.evals.registry import no_grad

if TYPE_CHECKING:  # torch is imported inside the functions: gptlab eval --help builds this eval's flags
    import torch

HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_{split}.jsonl"
# Example counts of the released splits; a download with another count is incomplete or wrong.
HELLASWAG_SIZES = {"train": 39_905, "val": 10_042}

NUM_ENDINGS = 4


class HellaSwagError(GptlabError, ValueError):
    """The HellaSwag data could not be found or read; the message says where to get it."""


# --------------------------------------------------------------------------- data


def hellaswag_cache_dir() -> Path:
    """Where downloaded HellaSwag files live: ``$GPTLAB_DATA_HOME/hellaswag`` (default ``~/.cache/gptlab/data``)."""
    try:
        from gptlab.data.sources import default_data_dir
    except ImportError:  # the data package is optional for this module
        base = Path(os.environ.get("GPTLAB_DATA_HOME") or Path.home() / ".cache" / "gptlab" / "data")
        return base.expanduser() / "hellaswag"
    return Path(default_data_dir("hellaswag"))


def _offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("GPTLAB_OFFLINE", "HF_HUB_OFFLINE"))


def _validate(ex: Any, where: str) -> dict:
    if not isinstance(ex, dict):
        raise HellaSwagError(f"{where}: expected a JSON object per line, got {type(ex).__name__}")
    for key in ("ctx", "endings", "label"):
        if key not in ex:
            raise HellaSwagError(f"{where}: missing field {key!r} (is this rowanz/hellaswag's jsonl format?)")
    endings = ex["endings"]
    if (not isinstance(endings, list) or len(endings) != NUM_ENDINGS
            or not all(isinstance(e, str) for e in endings)):
        raise HellaSwagError(f"{where}: 'endings' must be a list of {NUM_ENDINGS} strings")
    if not isinstance(ex["ctx"], str):
        raise HellaSwagError(f"{where}: 'ctx' must be a string")
    label = ex["label"]
    if isinstance(label, str) and label.isdigit():  # some re-exports store the label as text
        label = int(label)
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < NUM_ENDINGS:
        raise HellaSwagError(f"{where}: 'label' must be an integer 0-{NUM_ENDINGS - 1}, got {ex['label']!r}")
    ex["label"] = label
    return ex


def read_hellaswag_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read and check a HellaSwag jsonl file (blank lines ignored)."""
    p = Path(path)
    if not p.is_file():
        raise HellaSwagError(f"{p}: HellaSwag file not found")
    examples = []
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
            except json.JSONDecodeError as e:
                raise HellaSwagError(f"{p}:{lineno}: not valid JSON ({e.msg})") from None
            examples.append(_validate(ex, f"{p}:{lineno}"))
    if not examples:
        raise HellaSwagError(f"{p}: no examples in the file")
    return examples


def download_hellaswag(split: str = "val", *, dest: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Download ``hellaswag_{split}.jsonl`` into the cache (atomically) and return its path."""
    import urllib.request

    from tqdm import tqdm

    if split not in HELLASWAG_SIZES:
        raise HellaSwagError(f"HellaSwag split {split!r}: expected one of {', '.join(HELLASWAG_SIZES)}")
    url = HELLASWAG_URL.format(split=split)
    path = Path(dest) if dest is not None else hellaswag_cache_dir() / f"hellaswag_{split}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".part{os.getpid()}")
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"hellaswag_{split}.jsonl",
                      disable=not progress, file=sys.stderr) as bar:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
        n = len(read_hellaswag_jsonl(tmp))
        if n != HELLASWAG_SIZES[split]:
            raise HellaSwagError(f"{url}: got {n} examples, expected {HELLASWAG_SIZES[split]}; try again")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_hellaswag(input: str | os.PathLike | None = None, split: str = "val", *, progress: bool = True) -> list[dict]:
    """HellaSwag examples from ``input`` (a local jsonl) or the cached/downloaded ``split``.

    Offline (no network, or ``GPTLAB_OFFLINE=1`` / ``HF_HUB_OFFLINE=1``) without a cached copy this raises
    a one-line error saying where to get the file and to pass it with ``--input``.
    """
    if input is not None:
        return read_hellaswag_jsonl(input)
    if split not in HELLASWAG_SIZES:
        raise HellaSwagError(f"HellaSwag split {split!r}: expected one of {', '.join(HELLASWAG_SIZES)}")
    path = hellaswag_cache_dir() / f"hellaswag_{split}.jsonl"
    if path.is_file():
        return read_hellaswag_jsonl(path)
    url = HELLASWAG_URL.format(split=split)
    hint = f"download {url} and pass it with --input FILE.jsonl (or copy it to {path})"
    if _offline():
        raise HellaSwagError(f"HellaSwag {split} split is not cached at {path} and offline mode is on; {hint}")
    try:
        download_hellaswag(split, dest=path, progress=progress)
    except OSError as e:  # URLError, timeouts, DNS failures: all "no network"
        reason = getattr(e, "reason", None) or e
        raise HellaSwagError(f"could not download the HellaSwag {split} split ({reason}); {hint}") from None
    return read_hellaswag_jsonl(path)


# --------------------------------------------------------------------------- scoring


def render_example(example: dict, tokenizer: Any, max_len: int | None = None) -> tuple[list[list[int]], list[int], bool]:
    """Token rows of the four candidates and where each one's ending starts.

    Row ``i`` is ``encode(ctx) + encode(" " + endings[i])``. A row longer than ``max_len`` keeps its last
    ``max_len`` tokens (the context is cut from the left; the ending survives whole unless it alone is
    longer). Returns ``(rows, ending_starts, truncated)``; position 0 is never scored since nothing
    predicts it.
    """
    ctx = tokenizer.encode(example["ctx"])
    rows, starts, truncated = [], [], False
    for ending in example["endings"]:
        end = tokenizer.encode(" " + ending)
        row = ctx + end
        start = len(ctx)
        if max_len is not None and len(row) > max_len:
            cut = len(row) - max_len
            row, start, truncated = row[cut:], max(start - cut, 0), True
        rows.append(row)
        starts.append(start)
    return rows, starts, truncated


def collate(rendered: Sequence[tuple[list[list[int]], list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad the rows of several rendered examples: tokens and ending mask, both (4B, T)."""
    import torch

    rows = [r for rs, _ in rendered for r in rs]
    starts = [s for _, ss in rendered for s in ss]
    T = max(len(r) for r in rows)
    tokens = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, (row, start) in enumerate(zip(rows, starts)):
        tokens[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, start: len(row)] = True
    return tokens, mask


def ending_losses(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed fp32 cross-entropy over the masked tokens of each row, and how many there are.

    logits (R, T, V) predict tokens shifted by one: logits[:, t] scores tokens[:, t + 1].
    """
    import torch.nn.functional as F

    R, T, V = logits.shape
    losses = F.cross_entropy(logits[:, :-1].float().reshape(-1, V), tokens[:, 1:].reshape(-1),
                             reduction="none").view(R, T - 1)  # (R, T-1)
    m = mask[:, 1:].to(losses.dtype)  # padding and context carry weight 0
    return (losses * m).sum(1), m.sum(1)


def choose(loss_sum: torch.Tensor, n_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted ending per example from (B * 4,) row losses: (by sum, by mean per token), each (B,)."""
    s = loss_sum.view(-1, NUM_ENDINGS)
    mean = s / n_tokens.view(-1, NUM_ENDINGS).clamp(min=1)
    return s.argmin(1), mean.argmin(1)


def _dist_info() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@no_grad
def evaluate_hellaswag(model: torch.nn.Module, examples: Sequence[dict], tokenizer: Any, *,
                       device: torch.device | str, dtype: torch.dtype | None = None, batch_size: int = 8,
                       limit: int | None = None, progress: bool = False,
                       return_predictions: bool = False) -> dict[str, Any]:
    """acc / acc_norm of ``model`` on ``examples`` (completion style, see module docstring).

    ``batch_size`` examples (4 rows each) go through one forward pass under autocast(``dtype``); the loss
    is computed in fp32. ``model`` may be compiled or DDP-wrapped. Under torch.distributed each rank
    scores ``examples[rank::world_size]`` and the counts are all-reduced, so every rank returns the global
    result. ``return_predictions`` adds this rank's per-example ``pred`` / ``pred_norm`` / ``label`` lists.
    The model's train/eval mode is restored on return. ``dtype`` None is float32.
    """
    import torch
    from tqdm import tqdm

    from gptlab.runtime import autocast, unwrap_model

    if batch_size < 1:
        raise GptlabError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    dtype = dtype or torch.float32
    examples = list(examples[:limit] if limit is not None else examples)
    rank, world = _dist_info()
    mine = examples[rank::world]
    block_size = getattr(getattr(unwrap_model(model), "config", None), "block_size", None)

    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    preds: list[int] = []
    preds_norm: list[int] = []
    labels: list[int] = []
    row_loss: list[list[float]] = []
    row_tokens: list[list[int]] = []
    truncated = 0
    try:
        bar = tqdm(total=len(mine), desc="hellaswag", unit="ex", file=sys.stderr,
                   disable=not progress or rank != 0)
        # Every rank runs the same number of forward passes (a rank short of examples scores a dummy
        # batch and discards it): FSDP-sharded models all-gather weights inside forward, so a rank
        # that stopped early would hang the others.
        per_rank = -(-len(examples) // world)  # ceil: rank 0's share
        n_batches = -(-per_rank // batch_size)
        for b in range(n_batches):
            i = b * batch_size
            if i >= len(mine):
                tokens, _ = collate([render_example(ex, tokenizer, block_size)[:2] for ex in examples[:batch_size]])
                with autocast(device, dtype):
                    model(tokens.to(device))
                continue
            chunk = mine[i: i + batch_size]
            rendered = []
            for ex in chunk:
                rows, starts, cut = render_example(ex, tokenizer, block_size)
                truncated += cut
                rendered.append((rows, starts))
            tokens, mask = collate(rendered)
            tokens, mask = tokens.to(device), mask.to(device)
            with autocast(device, dtype):
                logits, _ = model(tokens)  # (4B, T, V)
            loss_sum, n_tok = ending_losses(logits, tokens, mask)
            p, pn = choose(loss_sum, n_tok)
            preds += p.tolist()
            preds_norm += pn.tolist()
            labels += [ex["label"] for ex in chunk]
            if return_predictions:
                row_loss += loss_sum.view(-1, NUM_ENDINGS).tolist()
                row_tokens += n_tok.view(-1, NUM_ENDINGS).long().tolist()
            bar.update(len(chunk))
        bar.close()
    finally:
        model.train(was_training)

    lab = torch.tensor(labels, dtype=torch.long)
    counts = torch.tensor([len(labels),
                           int((torch.tensor(preds, dtype=torch.long) == lab).sum()) if labels else 0,
                           int((torch.tensor(preds_norm, dtype=torch.long) == lab).sum()) if labels else 0,
                           truncated], dtype=torch.long, device=device)
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    n, correct, correct_norm, truncated = (int(c) for c in counts.tolist())
    if truncated and progress and rank == 0:
        print(f"hellaswag: {truncated} example(s) longer than the model's context ({block_size} tokens) "
              "were left-truncated", file=sys.stderr)
    out: dict[str, Any] = {
        "acc": correct / n if n else float("nan"),
        "acc_norm": correct_norm / n if n else float("nan"),
        "n": n,
        "correct": correct,
        "correct_norm": correct_norm,
        "truncated": truncated,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if return_predictions:
        out.update(pred=preds, pred_norm=preds_norm, label=labels, ending_loss=row_loss, ending_tokens=row_tokens)
    return out


# --------------------------------------------------------------------------- during training


from gptlab.evals.registry import Curve, Eval, EvalContext, EvalOff, register  # noqa: E402


@register
class HellaSwagEval(Eval):
    """HellaSwag accuracy of the current weights every ``eval.hellaswag_every`` steps (first
    ``eval.hellaswag_limit`` examples of ``eval.hellaswag_input`` or the downloaded val split)."""

    name = "hellaswag"
    every_key = "hellaswag_every"
    command = "hellaswag"
    command_help = "HellaSwag accuracy (completion style, acc and acc_norm)"
    report_to_stderr = True
    curves = (Curve("acc_norm", "acc_norm", "HellaSwag (completion style)", chance=0.25,  # 4 endings
                    baselines=((GPT2_HELLASWAG_ACC_NORM["gpt2"], "GPT-2 124M", "tab:red"),
                               (GPT3_HELLASWAG_ACC_NORM["gpt3-125m"], "GPT-3 125M", "tab:green")),
                    empty="no HellaSwag evaluations logged\n(they need a GPT-2-tokenizer model\n"
                          "and eval.hellaswag_every > 0)"),)
    plot_summary = {"max_acc_norm": "max"}

    def __init__(self, ctx: EvalContext) -> None:
        self.examples: list[dict] | None = None  # loaded at the first evaluation

    def run(self, model: torch.nn.Module, ctx: EvalContext) -> list[dict[str, Any]]:
        ev = ctx.cfg.eval
        if ctx.tokenizer is None:
            return []
        try:
            if self.examples is None:
                self.examples = load_hellaswag(ev.hellaswag_input or None, split="val")
            res = evaluate_hellaswag(model, self.examples, ctx.tokenizer, device=ctx.device, dtype=ctx.dtype,
                                     limit=ev.hellaswag_limit or None)
        except (GptlabError, OSError) as e:
            raise EvalOff(f"HellaSwag evaluation is off: {e}") from None
        finally:
            model.train()
        return [{"acc": float(res["acc"]), "acc_norm": float(res["acc_norm"]), "n": int(res["n"])}]

    def report(self, records: list[dict[str, Any]]) -> str:
        return f"hellaswag acc_norm {records[0]['acc_norm']:.4f} (n={records[0]['n']})"

    # ----------------------------------------------------------------- gptlab eval hellaswag
    @classmethod
    def add_arguments(cls, p: argparse.ArgumentParser) -> None:
        from gptlab.commands import device_arg, init_arg, json_arg

        init_arg(p)
        p.add_argument("--split", default="val", choices=["val", "train"])
        p.add_argument("--input", help="local HellaSwag .jsonl file (default: download and cache)")
        p.add_argument("--limit", type=int, default=None, help="evaluate the first N examples")
        p.add_argument("--batch-size", type=int, default=8, help="examples per forward pass")
        p.add_argument("--dtype", default="auto")
        p.add_argument("--compile", action="store_true")
        device_arg(p)
        json_arg(p)

    @classmethod
    def run_cli(cls, args: argparse.Namespace) -> dict[str, Any]:
        """``gptlab eval hellaswag --init SRC [--input FILE.jsonl] [--limit N] [--json]``."""
        import torch

        from gptlab.kernels import apply_cpu_kernels
        from gptlab.loading import load_model
        from gptlab.runtime import resolve_device, resolve_dtype

        if args.limit is not None and args.limit < 1:
            raise GptlabError(f"--limit {args.limit}: must be >= 1")
        if args.batch_size < 1:
            raise GptlabError(f"--batch-size {args.batch_size}: must be >= 1")
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
        examples = load_hellaswag(args.input, args.split, progress=not args.json)
        model, tokenizer = load_model(args.init, device=device)
        apply_cpu_kernels(model)
        model.eval()
        if tokenizer is None or getattr(tokenizer, "name", None) != "gpt2":
            kind = getattr(tokenizer, "name", "no")
            raise GptlabError(f"--init {args.init}: HellaSwag needs a GPT-2-tokenizer model, this one has a {kind} "
                              "tokenizer")
        if args.compile:
            model = torch.compile(model)
        res = evaluate_hellaswag(model, examples, tokenizer, device=device, dtype=dtype, batch_size=args.batch_size,
                                 limit=args.limit, progress=True)
        return {"task": "hellaswag", "split": args.split if args.input is None else None, "input": args.input,
                "init": args.init, **res, "device": str(device), "dtype": str(dtype).removeprefix("torch.")}

    @classmethod
    def cli_report(cls, res: dict[str, Any], args: argparse.Namespace) -> str:
        ref = GPT2_HELLASWAG_ACC_NORM.get(str(args.init))
        extra = (f" (OpenAI reference acc_norm {ref:.4f})"
                 if ref is not None and res["n"] == HELLASWAG_SIZES["val"] else "")
        return (f"hellaswag n={res['n']}: acc {res['acc']:.4f} ({res['correct']}), acc_norm {res['acc_norm']:.4f} "
                f"({res['correct_norm']}){extra} in {res['seconds']:.1f}s")
