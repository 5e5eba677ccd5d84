"""``gptlab prepare NAME [...]`` / ``gptlab prepare --verify DIR``: tokenize a corpus into token shards."""

from __future__ import annotations

import argparse
import json
import sys

from gptlab.commands import add_parser, json_arg

DATASETS_HELP = ("dataset: shakespeare_char, shakespeare, tinystories, openwebtext, fineweb_edu_10b, "
                 "fineweb_edu_100b, fineweb_10b, pydocs, text, jsonl; chat (conversations, --input FILE.jsonl) "
                 "and smoltalk are rendered with the chat template into masked rows")


def register(sub: argparse._SubParsersAction) -> None:
    p = add_parser(sub, "prepare", run, help="tokenize a corpus into verified token shards",
                   description="Tokenize a named corpus (or local files) into llm.c-format .bin shards "
                               "with a manifest.json, or re-check a prepared directory with --verify.")
    p.add_argument("name", nargs="?", help=DATASETS_HELP)
    p.add_argument("--input", help="local file, directory or glob to read instead of downloading")
    p.add_argument("--out", help="output directory (default: $GPTLAB_DATA_HOME/NAME, ~/.cache/gptlab/data/NAME)")
    p.add_argument("--workers", type=int, default=0, help="tokenizer workers (0: all cores)")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard")
    p.add_argument("--val-fraction", type=float, default=None, help="fraction of the corpus held out for validation")
    p.add_argument("--field", default="text", help="jsonl: the field holding the text")
    p.add_argument("--tokenizer", default=None,
                   help="gpt2, char, or a directory made by gptlab tokenizer train (default: the dataset's own); "
                        "chat data: also the base model's run dir")
    p.add_argument("--seq-len", type=int, default=None,
                   help="chat data: tokens per packed row (= the training batch.seq_len; default 1024)")
    p.add_argument("--max-docs", type=int, default=None, help="stop after this many documents")
    p.add_argument("--layout", default="gptlab", choices=["gptlab", "llmc"],
                   help="shakespeare only: llmc = llm.c's token stream and split (an <|endoftext|> before each "
                        "blank-line section, the first 32,768 tokens as val), byte for byte")
    p.add_argument("--verify", metavar="DIR", help="re-check a prepared dataset directory, or a directory or "
                                                   "quoted glob of llm.c / build-nanogpt shards, and exit")
    p.add_argument("--overwrite", action="store_true", help="replace an existing prepared dataset in --out")
    json_arg(p)


def _n(k: int, word: str) -> str:
    return f"{k} {word}{'' if k == 1 else 's'}"


def run(args: argparse.Namespace) -> int:
    from gptlab.data import shards as S
    from gptlab.data import sources
    from gptlab.data.prepare import PrepareError, prepare_dataset

    as_json = args.json
    if args.verify:
        if args.name:
            raise PrepareError(f"--verify checks an existing directory: drop the dataset name {args.name!r}")
        res = S.verify_dataset(args.verify)
        if as_json:
            print(json.dumps(res))
        else:
            parts = ", ".join(f"{sp} {v['tokens']:,} tokens ({_n(v['shards'], 'shard')})"
                              for sp, v in res["splits"].items())
            print(f"OK {res['dir']}: {parts}; checked {', '.join(res['checked'])}")
        return 0
    if not args.name:
        raise PrepareError(f"name a dataset ({', '.join(sources.DATASETS)}) or pass --verify DIR")
    res = prepare_dataset(args.name, input=args.input, out=args.out, workers=args.workers,
                          shard_tokens=args.shard_tokens, val_fraction=args.val_fraction, field=args.field,
                          tokenizer=args.tokenizer, max_docs=args.max_docs, overwrite=args.overwrite,
                          layout=args.layout, progress=not as_json or sys.stderr.isatty(), seq_len=args.seq_len)
    for w in res["warnings"]:
        print(f"gptlab prepare: warning: {w}", file=sys.stderr)
    if as_json:
        print(json.dumps(res))
    else:
        parts = ", ".join(f"{sp} {v['tokens']:,} tokens ({_n(len(v['shards']), 'shard')})"
                          for sp, v in res["splits"].items())
        print(f"prepared {res['dataset']} -> {res['out']}: {parts}; vocab {res['vocab_size']:,}; "
              f"{res['seconds']:.1f} s, {res['tokens_per_s'] / 1e6:.2f}M tokens/s")
    return 0
