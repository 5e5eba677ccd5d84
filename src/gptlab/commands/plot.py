"""``gptlab plot RUN_DIR [RUN_DIR ...] --out curves.png``: loss and HellaSwag curves of runs."""

from __future__ import annotations

import argparse
import json

from gptlab.commands import add_parser, json_arg


def register(sub: argparse._SubParsersAction) -> None:
    p = add_parser(sub, "plot", run, help="plot loss and HellaSwag curves of runs")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", required=True, help="output image (.png)")
    p.add_argument("--x", choices=["step", "tokens"], default="step")
    p.add_argument("--metric", choices=["loss", "bpb"], default="loss",
                   help="first panel: loss (train + val, nats/token) or bpb (val bits per byte, comparable "
                        "across tokenizers)")
    p.add_argument("--log", action="store_true", help="log-scale loss axis")
    p.add_argument("--smooth", type=float, default=0.9, help="EMA smoothing of train loss (0 = none)")
    p.add_argument("--title", default=None, help="figure title")
    json_arg(p)


def run(args: argparse.Namespace) -> int:
    from gptlab.plot import plot_runs

    summary = plot_runs(args.runs, args.out, x=args.x, log=args.log, smooth=args.smooth, title=args.title,
                         metric=args.metric)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"wrote {summary['out']} ({len(summary['runs'])} run(s))")
    return 0
