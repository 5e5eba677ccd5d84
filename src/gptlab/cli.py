"""``gptlab`` command line: one verb per job (prepare, train, sample, eval, export, bench, plot).

Argument parsing lives here and stays light (no torch import), so ``--help`` is instant; each verb's
work is imported lazily from its module and called as ``run(args) -> exit code``.
Errors a user can fix (:class:`GptlabError`) print one line on stderr and exit 1.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Callable, Sequence

from gptlab import __version__

# verb -> "module:function" called with the parsed arguments
HANDLERS: dict[str, str] = {
    "prepare": "gptlab.data.prepare:cli_prepare",
    "train": "gptlab.train:cli_train",
    "sample": "gptlab.generate:cli_sample",
    "export": "gptlab.hf:cli_export",
    "eval.hellaswag": "gptlab.evals.hellaswag:cli_eval_hellaswag",
    "eval.loss": "gptlab.evals.loss:cli_eval_loss",
    "bench.train": "gptlab.bench:cli_bench_train",
    "bench.generate": "gptlab.bench:cli_bench_generate",
    "bench.prepare": "gptlab.bench:cli_bench_prepare",
    "bench.loader": "gptlab.bench:cli_bench_loader",
    "plot": "gptlab.plot:cli_plot",
}

SRC_HELP = ("model source: a Hub name (gpt2, gpt2-medium, gpt2-large, gpt2-xl), a Hugging Face "
            "model directory, or a gptlab run / checkpoint directory")


def _device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps, or auto (default: best available)")


def _json_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout (human text goes to stderr)")


def add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="tokenize a corpus into verified token shards",
                       description="Tokenize a named corpus (or local files) into llm.c-format .bin shards "
                                   "with a manifest.json, or re-check a prepared directory with --verify.")
    p.add_argument("name", nargs="?", help="dataset: shakespeare_char, shakespeare, tinystories, openwebtext, "
                                           "fineweb_edu_10b, fineweb_edu_100b, fineweb_10b, pydocs, text, jsonl")
    p.add_argument("--input", help="local file, directory or glob to read instead of downloading")
    p.add_argument("--out", help="output directory (default: $GPTLAB_DATA_HOME/NAME, ~/.cache/gptlab/data/NAME)")
    p.add_argument("--workers", type=int, default=0, help="tokenizer workers (default: all cores)")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard (default 100M)")
    p.add_argument("--val-fraction", type=float, default=None, help="fraction of the corpus held out for validation")
    p.add_argument("--field", default="text", help="jsonl: the field holding the text (default: text)")
    p.add_argument("--tokenizer", default=None, help="gpt2 or char (default: the dataset's own)")
    p.add_argument("--max-docs", type=int, default=None, help="stop after this many documents")
    p.add_argument("--verify", metavar="DIR", help="re-check a prepared dataset directory and exit")
    p.add_argument("--overwrite", action="store_true", help="replace an existing prepared dataset in --out")
    _json_arg(p)


def _recipe_names() -> list[str]:
    """The shipped recipes (gptlab/configs/*.toml), without importing torch."""
    from importlib import resources

    try:
        return sorted(p.name[:-5] for p in resources.files("gptlab").joinpath("configs").iterdir()
                      if p.name.endswith(".toml"))
    except (FileNotFoundError, NotADirectoryError):  # pragma: no cover - a broken install
        return []


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train or fine-tune a model (torchrun for many GPUs)",
                       description="Train from a recipe (configs/NAME.toml or a TOML file). Any config key can be "
                                   "set with --section.key=value, e.g. --model.n_layer=6 --optim.lr=1e-3.")
    p.add_argument("--config", default=None, help=f"recipe name ({', '.join(_recipe_names())}) or a TOML file")
    p.add_argument("--data", help="prepared dataset directory (from gptlab prepare)")
    p.add_argument("--out", help="run directory (default: runs/<config name>)")
    p.add_argument("--max-steps", type=int, help="optimizer steps to run")
    p.add_argument("--resume", choices=["auto", "never"], default=None,
                   help="auto: continue from the newest complete checkpoint in --out; never: start over there "
                        "(default: refuse to touch a run dir that already has progress)")
    p.add_argument("--init", help="start from weights: " + SRC_HELP)
    p.add_argument("--micro-batch", type=int, help="sequences per forward/backward on each rank")
    p.add_argument("--batch-tokens", type=int, help="tokens per optimizer step, all ranks and micro-steps")
    p.add_argument("--eval-every", type=int, help="validation every N steps (0: off)")
    p.add_argument("--checkpoint-every", type=int, help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--time-limit", type=float, help="stop cleanly (checkpoint, exit 0) after this many minutes")
    # No default here: an unset flag must not override the recipe's system.device.
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N, mps, or auto (default: the recipe's, auto)")
    p.add_argument("--seed", type=int, help="random seed")
    _json_arg(p)


def add_sample(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="generate text from a model",
                       description="Sample text with a KV cache. Temperature 0 is greedy decoding.")
    p.add_argument("--init", required=True, help=SRC_HELP)
    p.add_argument("--prompt", default="\n", help="prompt text, or FILE:path to read it from a file")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--no-kv-cache", action="store_true", help="recompute the whole context every step")
    p.add_argument("--stream", action="store_true", help="print text as it is produced (one sample at a time)")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the one-token decode step over a static-shape KV cache "
                        "(captured as a CUDA graph on GPU)")
    _device_arg(p)
    _json_arg(p)


def add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a model to Hugging Face format",
                       description="Write a directory that transformers' AutoModelForCausalLM and AutoTokenizer load.")
    p.add_argument("--init", required=True, help=SRC_HELP)
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--format", default="hf", choices=["hf"])
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    _json_arg(p)


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model (hellaswag, loss)")
    esub = p.add_subparsers(dest="eval_task", metavar="TASK", required=True)
    h = esub.add_parser("hellaswag", help="HellaSwag accuracy (completion style, acc and acc_norm)")
    h.add_argument("--init", required=True, help=SRC_HELP)
    h.add_argument("--split", default="val", choices=["val", "train"])
    h.add_argument("--input", help="local HellaSwag .jsonl file (default: download and cache)")
    h.add_argument("--limit", type=int, default=None, help="evaluate the first N examples")
    h.add_argument("--batch-size", type=int, default=8, help="examples per forward pass")
    h.add_argument("--dtype", default="auto")
    h.add_argument("--compile", action="store_true")
    _device_arg(h)
    _json_arg(h)
    lo = esub.add_parser("loss", help="mean validation loss over the first N tokens of a prepared dataset")
    lo.add_argument("--init", required=True, help=SRC_HELP)
    lo.add_argument("--data", required=True, help="prepared dataset directory")
    lo.add_argument("--split", default="val")
    lo.add_argument("--tokens", type=int, default=None, help="number of validation tokens (default: all, up to 10M)")
    lo.add_argument("--seq-len", type=int, default=None, help="sequence length (default: the model's context)")
    lo.add_argument("--batch-size", type=int, default=8)
    lo.add_argument("--dtype", default="auto")
    _device_arg(lo)
    _json_arg(lo)


def add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks: train, generate, prepare, loader")
    bsub = p.add_subparsers(dest="bench_task", metavar="WHAT", required=True)
    t = bsub.add_parser("train", help="training step throughput, MFU, memory")
    t.add_argument("--model", default="gpt2", help="model preset")
    t.add_argument("--batch", type=int, default=8)
    t.add_argument("--seq", type=int, default=None, help="sequence length (default: the preset's context)")
    t.add_argument("--steps", type=int, default=10, help="timed steps")
    t.add_argument("--warmup", type=int, default=3)
    t.add_argument("--rounds", type=int, default=5, help="alternating A/B rounds the timed steps are split over")
    t.add_argument("--dtype", default="auto")
    t.add_argument("--compile", action="store_true")
    t.add_argument("--vs-hf", action="store_true", help="also time transformers' GPT2LMHeadModel, alternating A/B")
    t.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="model config overrides")
    t.add_argument("--compile-hf", action="store_true", help="with --vs-hf: torch.compile transformers' model too")
    t.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default: torch's choice)")
    _device_arg(t)
    _json_arg(t)
    g = bsub.add_parser("generate", help="decode throughput with the KV cache")
    g.add_argument("--model", default="gpt2", help="model preset or " + SRC_HELP)
    g.add_argument("--batch", type=int, default=1)
    g.add_argument("--prompt-tokens", type=int, default=16)
    g.add_argument("--new-tokens", type=int, default=128)
    g.add_argument("--dtype", default="auto")
    g.add_argument("--compile", action="store_true")
    g.add_argument("--vs-hf", action="store_true", help="also time transformers' generate")
    g.add_argument("--no-cache-baseline", action="store_true", help="also time the no-KV-cache loop")
    g.add_argument("--rounds", type=int, default=3, help="timed generations per contender, alternating")
    g.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="model config overrides (presets)")
    g.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default: torch's choice)")
    _device_arg(g)
    _json_arg(g)
    pr = bsub.add_parser("prepare", help="tokenization throughput for 1..N workers")
    pr.add_argument("--input", help="text file to tokenize (default: a generated corpus)")
    pr.add_argument("--max-workers", type=int, default=0, help="default: all cores")
    pr.add_argument("--mb", type=float, default=20.0, help="megabytes of text to tokenize")
    pr.add_argument("--rounds", type=int, default=2, help="timed passes per worker count, alternating")
    _json_arg(pr)
    lo = bsub.add_parser("loader", help="batches/s the token loader sustains")
    lo.add_argument("--data", help="prepared dataset directory (default: a generated one)")
    lo.add_argument("--batch", type=int, default=64)
    lo.add_argument("--seq", type=int, default=1024)
    lo.add_argument("--batches", type=int, default=200)
    lo.add_argument("--shuffle", action="store_true")
    lo.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default: torch's choice)")
    _device_arg(lo)
    _json_arg(lo)


def add_plot(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="plot loss and HellaSwag curves of runs")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", required=True, help="output image (.png)")
    p.add_argument("--x", choices=["step", "tokens"], default="step")
    p.add_argument("--log", action="store_true", help="log-scale loss axis")
    p.add_argument("--smooth", type=float, default=0.9, help="EMA smoothing of train loss (0 = none)")
    p.add_argument("--title", default=None, help="figure title")
    _json_arg(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptlab", allow_abbrev=False, description="Reproduce GPT-2 from scratch, and go beyond it.")
    parser.add_argument("--version", action="version", version=f"gptlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (add_prepare, add_train, add_sample, add_eval, add_export, add_bench, add_plot):
        add(sub)
    return parser


def _handler(args: argparse.Namespace) -> Callable[[argparse.Namespace], int]:
    key = args.command
    if key == "eval":
        key = f"eval.{args.eval_task}"
    elif key == "bench":
        key = f"bench.{args.bench_task}"
    module, func = HANDLERS[key].split(":")
    return getattr(importlib.import_module(module), func)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gptlab`` console script and ``python -m gptlab``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "train":  # `--section.key value` means `--section.key=value`
        joined: list[str] = []
        for a in extra:
            if (joined and joined[-1].startswith("--") and "=" not in joined[-1] and "." in joined[-1]
                    and not a.startswith("--")):
                joined[-1] = f"{joined[-1]}={a}"
            else:
                joined.append(a)
        extra = joined
    # Only `train` takes free-form --section.key=value overrides; anywhere else they are typos.
    overrides = [a for a in extra if a.startswith("--") and "=" in a and "." in a.split("=", 1)[0]]
    unknown = [a for a in extra if a not in overrides]
    if unknown or (overrides and args.command != "train"):
        parser.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
    args.overrides = overrides
    from gptlab.errors import GptlabError

    try:
        return int(_handler(args)(args) or 0)
    except GptlabError as e:
        print(f"gptlab {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"gptlab {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug or an unforeseen environment problem: still one line unless debugging
        if os.environ.get("GPTLAB_DEBUG"):
            raise
        print(f"gptlab {args.command}: error: {type(e).__name__}: {e} (set GPTLAB_DEBUG=1 for a traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
