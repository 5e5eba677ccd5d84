"""``gptlab export --init SRC --out DIR [--overwrite] [--json]``: write a Hugging Face model directory."""

from __future__ import annotations

import argparse
import json
import sys

from gptlab.commands import SRC_HELP, add_parser, json_arg


def register(sub: argparse._SubParsersAction) -> None:
    p = add_parser(sub, "export", run, help="export a model to Hugging Face format",
                   description="Write a directory that transformers' AutoModelForCausalLM and AutoTokenizer load.")
    p.add_argument("--init", required=True, help=SRC_HELP)
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--format", default="hf", choices=["hf"])
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    json_arg(p)


def run(args: argparse.Namespace) -> int:
    from gptlab.hf import export_hf
    from gptlab.loading import load_model

    model, tokenizer = load_model(args.init, device="cpu")
    summary = export_hf(model, tokenizer, args.out, overwrite=args.overwrite)
    if tokenizer is None:
        print(f"gptlab export: note: {args.init} has no tokenizer; only the weights were exported", file=sys.stderr)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"wrote {summary['architecture']} ({summary['params']:,} parameters) to {summary['out']}",
              file=sys.stderr)
    return 0
