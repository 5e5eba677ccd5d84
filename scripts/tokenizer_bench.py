#!/usr/bin/env python
"""Tokenizer training throughput and compression, measured side by side in one process.

Trains the same vocabulary on the same documents with (a) ``gptlab`` (:func:`gptlab.tokenizer_train.train_bpe`,
rustbpe merges + conversion to tiktoken ranks), (b) ``rustbpe`` called directly, and (c) ``gptlab`` with
``--trainer tokenizers`` (Hugging Face), in alternating rounds so that all see the same (shared, noisy)
machine; reports MB/s of the best round of each. Then the compression (bytes per token) of the trained
tokenizer and of GPT-2's on the held-out last 10% of the text.

    python scripts/tokenizer_bench.py --input FILE [FILE ...] [--vocab 8192] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", nargs="+", required=True, help="text files (concatenated)")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import rustbpe

    from gptlab.data.sources import iter_text_pieces
    from gptlab.tokenizer import DEFAULT_SPECIALS, GPT4_PAT, GPT2Tokenizer
    from gptlab.tokenizer_train import bytes_per_token, train_bpe

    text = "".join(Path(p).read_text(encoding="utf-8", errors="replace") for p in args.input)
    cut = int(len(text) * 0.9)
    docs, held = list(iter_text_pieces(text[:cut])), text[cut:]
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    n_merges = args.vocab - 256 - len(DEFAULT_SPECIALS)

    def raw_rustbpe() -> None:
        t = rustbpe.Tokenizer()
        t.train_from_iterator(iter(docs), 256 + n_merges, pattern=GPT4_PAT)
        t.get_mergeable_ranks()

    arms = {
        "gptlab (rustbpe)": lambda: train_bpe(docs, args.vocab, trainer="rustbpe"),
        "rustbpe (direct)": raw_rustbpe,
        "gptlab --trainer tokenizers": lambda: train_bpe(docs, args.vocab, trainer="tokenizers"),
    }
    best = {k: float("inf") for k in arms}
    for _ in range(args.rounds):
        for name, fn in arms.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    tok = train_bpe(docs, args.vocab)
    res = {"bytes": n_bytes, "vocab": args.vocab, "rounds": args.rounds,
           "mb_per_s": {k: round(n_bytes / v / 1e6, 3) for k, v in best.items()},
           "seconds": {k: round(v, 3) for k, v in best.items()},
           "heldout_bytes": len(held.encode("utf-8")),
           "bytes_per_token": {"trained": round(bytes_per_token(tok, held), 4),
                               "gpt2": round(bytes_per_token(GPT2Tokenizer(), held), 4)}}
    if args.json:
        print(json.dumps(res))
    else:
        for k, v in res["mb_per_s"].items():
            print(f"{k:<30} {v:8.3f} MB/s ({res['seconds'][k]:.2f} s)")
        print(f"held-out bytes/token: trained {res['bytes_per_token']['trained']}, gpt2 {res['bytes_per_token']['gpt2']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
