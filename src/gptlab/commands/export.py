"""``gptlab export --init SRC --out PATH [--format hf|llmc] [--overwrite] [--json]``: write a Hugging Face
model directory, or llm.c's model file."""

from __future__ import annotations

import argparse
import json
import sys

from gptlab.commands import add_parser, init_arg, json_arg


def register(sub: argparse._SubParsersAction) -> None:
    p = add_parser(sub, "export", run, help="export a model to Hugging Face or llm.c format",
                   description="--format hf: a directory that transformers' AutoModelForCausalLM and AutoTokenizer "
                               "load. --format llmc: llm.c's GPT-2 model file (gpt2_124M.bin layout) that its C/CUDA "
                               "trainer and inference code load.")
    init_arg(p)
    p.add_argument("--out", required=True, help="output directory (hf) or file (llmc), written atomically")
    p.add_argument("--format", default="hf", choices=["hf", "llmc"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="llmc only: float32 (llm.c version 3) or bfloat16 (version 5)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    json_arg(p)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gptlab.errors import GptlabError
    from gptlab.fsio import same_or_inside
    from gptlab.loading import load_model

    if Path(args.init).expanduser().exists() and same_or_inside(args.init, args.out):
        raise GptlabError(f"--out {args.out}: is or contains the --init source {args.init}; replacing it would "
                          f"destroy what is being exported; choose another --out")
    model, tokenizer = load_model(args.init, device="cpu")
    if args.format == "llmc":
        from gptlab.convert.llmc import write_model

        summary = write_model(model, args.out, dtype=args.dtype, overwrite=args.overwrite)
        summary["architecture"] = f"llm.c GPT-2 v{summary['version']}"
    else:
        from gptlab.hf import export_hf

        summary = export_hf(model, tokenizer, args.out, overwrite=args.overwrite)
    if tokenizer is None and args.format == "hf":
        print(f"gptlab export: note: {args.init} has no tokenizer; only the weights were exported", file=sys.stderr)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"wrote {summary['architecture']} ({summary['params']:,} parameters) to {summary['out']}",
              file=sys.stderr)
    return 0
