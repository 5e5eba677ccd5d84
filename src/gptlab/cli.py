"""``gptlab`` command line: one verb per job, each in ``gptlab/commands/<verb>.py``.

Parsing stays light (no torch import), so ``--help`` is instant; a verb's module adds its arguments and
names its ``run(args) -> exit code``, which imports the heavy parts lazily.
Errors a user can fix (:class:`GptlabError`) print one line on stderr and exit 1.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from typing import Sequence

from gptlab import __version__
from gptlab.commands import VERBS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptlab", allow_abbrev=False,
                                     description="Reproduce GPT-2 from scratch, and go beyond it.")
    parser.add_argument("--version", action="version", version=f"gptlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for verb in VERBS:
        importlib.import_module(f"gptlab.commands.{verb}").register(sub)
    return parser


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
        with warnings.catch_warnings():
            if not os.environ.get("GPTLAB_DEBUG"):  # one clean line, not the warning's source location
                warnings.showwarning = lambda message, *a, **k: print(
                    f"gptlab {args.command}: warning: {message}", file=sys.stderr)
            return int(args._run(args) or 0)
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
