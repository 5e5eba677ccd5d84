"""``gptlab plot RUN_DIR [RUN_DIR ...] --out curves.png``: loss and HellaSwag curves of runs, and the curves
of every other registered eval."""

from __future__ import annotations

import argparse
import json

from gptlab.commands import add_parser, json_arg


def register(sub: argparse._SubParsersAction) -> None:
    from gptlab.plot import LOSS, metric_help, metrics  # the evals' curves (gptlab.evals.registry); no torch

    p = add_parser(sub, "plot", run, help="plot loss and HellaSwag curves of runs")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", required=True, help="output image (.png)")
    p.add_argument("--x", choices=["step", "tokens"], default="step")
    p.add_argument("--metric", choices=metrics(), default=LOSS, help=f"first panel: {metric_help()}")
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
