"""``gptlab tokenizer train|compare``: train a byte-level BPE on a corpus; compare tokenizers on a file."""

from __future__ import annotations

import argparse
import json
import sys

from gptlab.commands import add_parser, json_arg

DEFAULT_SPECIALS_HELP = ("<|endoftext|> and the chat tokens <|user_start|> <|user_end|> <|assistant_start|> "
                         "<|assistant_end|> <|system_start|> <|system_end|>")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer, or compare tokenizers")
    tsub = p.add_subparsers(dest="tokenizer_task", metavar="TASK", required=True)
    t = add_parser(tsub, "train", run_train, help="train a byte-level BPE on a corpus",
                   description="Learn a byte-level BPE (regex pre-split, then merges from the 256 bytes) and write "
                               "a self-describing directory: tiktoken ranks, gptlab_tokenizer.json and a Hugging "
                               "Face tokenizer.json. Use it with: gptlab prepare NAME --tokenizer DIR.")
    t.add_argument("--input", required=True,
                   help="text/jsonl/parquet file, directory or glob, or a dataset name (as gptlab prepare; "
                        "its val split is left out)")
    t.add_argument("--vocab-size", type=int, required=True,
                   help="total vocabulary: 256 bytes + merges + special tokens (above 65,536 the shards are uint32)")
    t.add_argument("--out", required=True, help="output directory")
    t.add_argument("--max-chars", type=int, default=1_000_000_000, help="read at most this many characters")
    t.add_argument("--doc-cap", type=int, default=10_000, help="use at most this many characters of each document")
    t.add_argument("--pattern", default="gpt4",
                   help="pre-tokenisation regex: gpt4 (GPT-4's, digits in 1-3s), gpt4-n2 (digits in 1-2s), gpt2, "
                        "or a regex")
    t.add_argument("--special", nargs="+", default=[], metavar="TOKEN",
                   help=f"extra special tokens, after the built-in {DEFAULT_SPECIALS_HELP}")
    t.add_argument("--trainer", default="rustbpe", choices=["rustbpe", "tokenizers"],
                   help="library that learns the merges (inference is always tiktoken)")
    t.add_argument("--field", default="text", help="jsonl/parquet: the field holding the text")
    t.add_argument("--overwrite", action="store_true", help="replace a tokenizer already in --out")
    json_arg(t)
    c = add_parser(tsub, "compare", run_compare, help="bytes per token and tokens/s of tokenizers on a text file")
    c.add_argument("--input", required=True, help="UTF-8 text file")
    c.add_argument("tokenizers", nargs="+", metavar="TOK", help="gpt2, char (built from --input), or a tokenizer directory")
    c.add_argument("--rounds", type=int, default=3, help="timing rounds (alternating between tokenizers; best counts)")
    json_arg(c)


def run_train(args: argparse.Namespace) -> int:
    from gptlab.tokenizer_train import train_tokenizer

    res = train_tokenizer(args.input, args.vocab_size, args.out, max_chars=args.max_chars, doc_cap=args.doc_cap,
                          pattern=args.pattern, specials=args.special, trainer=args.trainer, field=args.field,
                          overwrite=args.overwrite, progress=not args.json or sys.stderr.isatty())
    if args.json:
        print(json.dumps(res))
    else:
        comp = f"{res['compression']:.3f} bytes/token on held-out text" if res["compression"] else "no held-out text"
        print(f"trained {res['vocab_size']:,}-token BPE ({res['merges']:,} merges, {res['pattern']} pattern) -> "
              f"{res['out']}: {res['bytes'] / 1e6:.1f} MB in {res['seconds']:.1f} s "
              f"({res['bytes_per_s'] / 1e6:.2f} MB/s); {comp}")
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from gptlab.tokenizer_train import compare_tokenizers

    res = compare_tokenizers(args.input, args.tokenizers, rounds=args.rounds)
    if args.json:
        print(json.dumps(res))
        return 0
    width = max(len(r["tokenizer"]) for r in res["tokenizers"])
    print(f"{'tokenizer':<{width}}  {'vocab':>7}  {'tokens':>10}  {'bytes/token':>11}  {'tokens/s':>12}")
    for r in res["tokenizers"]:
        print(f"{r['tokenizer']:<{width}}  {r['vocab_size']:>7,}  {r['tokens']:>10,}  {r['bytes_per_token']:>11.3f}  "
              f"{r['tokens_per_s']:>12,.0f}")
    return 0
