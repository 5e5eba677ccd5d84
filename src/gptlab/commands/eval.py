"""``gptlab eval hellaswag|loss``: evaluate any model source."""

from __future__ import annotations

import argparse
import json
import sys

from gptlab.commands import SRC_HELP, add_parser, device_arg, json_arg, quantize_arg


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model (hellaswag, loss)")
    esub = p.add_subparsers(dest="eval_task", metavar="TASK", required=True)
    h = add_parser(esub, "hellaswag", run_hellaswag, help="HellaSwag accuracy (completion style, acc and acc_norm)")
    h.add_argument("--init", required=True, help=SRC_HELP)
    h.add_argument("--split", default="val", choices=["val", "train"])
    h.add_argument("--input", help="local HellaSwag .jsonl file (default: download and cache)")
    h.add_argument("--limit", type=int, default=None, help="evaluate the first N examples")
    h.add_argument("--batch-size", type=int, default=8, help="examples per forward pass")
    h.add_argument("--dtype", default="auto")
    h.add_argument("--compile", action="store_true")
    device_arg(h)
    json_arg(h)
    lo = add_parser(esub, "loss", run_loss,
                    help="mean validation loss (and bits per byte) over the first N tokens of a prepared dataset")
    lo.add_argument("--init", required=True, help=SRC_HELP)
    lo.add_argument("--data", required=True, help="prepared dataset directory, or a directory or quoted glob of "
                                                   "llm.c / build-nanogpt shards (val: files named *_val_*)")
    lo.add_argument("--val", default=None, metavar="GLOB", help="validation shards of a manifest-less --data")
    lo.add_argument("--split", default="val")
    lo.add_argument("--tokens", type=int, default=None, help="number of validation tokens (default: all, up to 10M)")
    lo.add_argument("--seq-len", type=int, default=None, help="sequence length (default: the model's context)")
    lo.add_argument("--batch-size", type=int, default=8)
    lo.add_argument("--dtype", default="auto")
    quantize_arg(lo)
    device_arg(lo)
    json_arg(lo)


def run_hellaswag(args: argparse.Namespace) -> int:
    """``gptlab eval hellaswag --init SRC [--input FILE.jsonl] [--limit N] [--json]``."""
    import torch

    from gptlab.errors import GptlabError
    from gptlab.evals import GPT2_HELLASWAG_ACC_NORM
    from gptlab.evals.hellaswag import HELLASWAG_SIZES, evaluate_hellaswag, load_hellaswag
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
    res = {"task": "hellaswag", "split": args.split if args.input is None else None, "input": args.input,
           "init": args.init, **res, "device": str(device), "dtype": str(dtype).removeprefix("torch.")}
    if args.json:
        print(json.dumps(res))
    else:
        ref = GPT2_HELLASWAG_ACC_NORM.get(str(args.init))
        extra = (f" (OpenAI reference acc_norm {ref:.4f})"
                 if ref is not None and res["n"] == HELLASWAG_SIZES["val"] else "")
        print(f"hellaswag n={res['n']}: acc {res['acc']:.4f} ({res['correct']}), acc_norm {res['acc_norm']:.4f} "
              f"({res['correct_norm']}){extra} in {res['seconds']:.1f}s", file=sys.stderr)
    return 0


def run_loss(args: argparse.Namespace) -> int:
    """``gptlab eval loss --init SRC --data DIR [--tokens N] [--seq-len T] [--json]``."""
    from gptlab.data.shards import open_manifest
    from gptlab.evals.loss import evaluate_loss
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
    res = evaluate_loss(model, args.data, split=args.split, val=args.val, tokens=args.tokens, seq_len=args.seq_len,
                        batch_size=args.batch_size, device=device, dtype=dtype, tokenizer=tokenizer,
                        progress=not args.json)
    res = {"task": "loss", "init": args.init, **res, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
           "quantize": args.quantize}
    if args.json:
        print(json.dumps(res))
    else:
        bpb = f", {res['bpb']:.4f} bits per byte" if res.get("bpb") is not None else ""
        print(f"{res['split']} loss {res['loss']:.4f}{bpb} (perplexity {res['perplexity']:.2f}) over {res['tokens']:,} "
              f"tokens ({res['windows']} windows of {res['seq_len']}) in {res['seconds']:.1f}s")
    return 0
