#!/usr/bin/env python
"""Tokenizer ablation on Tiny Shakespeare, compared in validation bits per byte.

At the ``shakespeare-char-cpu`` model budget (4 layers, 128 wide, context 64, 12 sequences per step) it
trains the same model on the same text tokenized four ways: characters, GPT-2's BPE, and byte-level
BPEs trained by ``gptlab tokenizer train`` on the training 90% of the text at each ``--vocab`` size. All
runs take the same number of optimizer steps with the same tokens per step (a shared, contended
machine makes wall-clock budgets meaningless); each is then scored by ``gptlab eval loss`` on the whole
val split (the last 10% of characters), whose ``bpb`` is comparable across tokenizers.

Every step is a ``gptlab`` subprocess; finished steps are reused, so an interrupted ablation continues.

    python scripts/tokenizer_ablation.py --input tinyshakespeare.txt [--steps 1000] [--vocab 1024 4096]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

BASE = "shakespeare-char-cpu"


def gptlab(*args: str, env: dict[str, str]) -> str:
    """Run ``gptlab ARGS`` and return its stdout (stderr passes through)."""
    out = subprocess.run([sys.executable, "-m", "gptlab", *args], env=env, check=True, stdout=subprocess.PIPE,
                         text=True)
    return out.stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", required=True, help="tinyshakespeare.txt")
    ap.add_argument("--out", default="runs/tokenizer-ablation")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--vocab", type=int, nargs="+", default=[1024, 4096], help="trained BPE vocabulary sizes")
    ap.add_argument("--only", nargs="*", help="run only these arms (char, gpt2, bpe-N)")
    ap.add_argument("--threads", default="2", help="OMP_NUM_THREADS for every subprocess")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": args.threads}
    text = Path(args.input).read_text(encoding="utf-8")
    train_txt = out / "train90.txt"  # the tokenizer never sees the val characters
    train_txt.write_text(text[:int(len(text) * 0.9)], encoding="utf-8")

    arms: dict[str, list[str]] = {"char": ["shakespeare_char"], "gpt2": ["shakespeare"]}
    for v in args.vocab:
        tok = out / f"tok-{v}"
        if not (tok / "gptlab_tokenizer.json").is_file():
            gptlab("tokenizer", "train", "--input", str(train_txt), "--vocab-size", str(v), "--out", str(tok),
                   "--json", "--overwrite", env=env)
        arms[f"bpe-{v}"] = ["shakespeare", "--tokenizer", str(tok)]
    rows = []
    for name, prep in arms.items():
        if args.only and name not in args.only:
            continue
        data, run = out / f"data-{name}", out / f"run-{name}"
        if not (data / "manifest.json").is_file():
            gptlab("prepare", *prep, "--input", args.input, "--out", str(data), "--json", env=env)
        result = run / "eval.json"
        if not result.is_file():
            gptlab("train", "--config", BASE, "--data", str(data), "--out", str(run), "--max-steps", str(args.steps),
                   f"--optim.decay_steps={args.steps}", "--eval-every", "0", "--eval.sample_every=0", "--checkpoint-every", "50",
                   "--resume", "auto", "--json", env=env)
            res = json.loads(gptlab("eval", "loss", "--init", str(run), "--data", str(data), "--json", env=env))
            result.write_text(json.dumps(res) + "\n")
        res = json.loads(result.read_text())
        manifest = json.loads((data / "manifest.json").read_text())
        rows.append({"arm": name, "vocab": manifest["vocab_size"], "val_loss": round(res["loss"], 4),
                     "val_bpb": round(res["bpb"], 4), "val_tokens": res["tokens"],
                     "bytes_per_token": round(res["bytes"] / res["tokens"], 3),
                     "train_bytes_seen": round(args.steps * 768 * res["bytes"] / res["tokens"])})
        print(json.dumps(rows[-1]), file=sys.stderr)
    print("| tokenizer | vocab | val loss (nats/token) | val bits/byte | bytes/token | text seen in training |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['arm']} | {r['vocab']:,} | {r['val_loss']:.3f} | **{r['val_bpb']:.3f}** | {r['bytes_per_token']:.2f} | "
              f"{r['train_bytes_seen'] / 1e6:.2f} MB |")
    (out / "results.json").write_text(json.dumps({"steps": args.steps, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
