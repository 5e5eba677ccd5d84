"""``gptlab eval TASK``: evaluate any model source; one sub-command per registered eval that has a ``command``
(``gptlab.evals.registry``: its flags, its standalone run and its line are the eval's own)."""

from __future__ import annotations

import argparse
import json
import sys

from gptlab.commands import add_parser


def register(sub: argparse._SubParsersAction) -> None:
    from gptlab.evals.registry import registered  # eval modules import no torch until they run

    evals = sorted((cls for cls in registered() if cls.command), key=lambda cls: cls.command)
    p = sub.add_parser("eval", help=f"evaluate a model ({', '.join(cls.command for cls in evals)})")
    esub = p.add_subparsers(dest="eval_task", metavar="TASK", required=True)
    for cls in evals:
        ep = add_parser(esub, cls.command, run, help=cls.command_help)
        ep.set_defaults(_eval=cls)
        cls.add_arguments(ep)


def run(args: argparse.Namespace) -> int:
    cls = args._eval
    res = cls.run_cli(args)
    if args.json:
        print(json.dumps(res))
    else:
        print(cls.cli_report(res, args), file=sys.stderr if cls.report_to_stderr else sys.stdout)
    return 0
