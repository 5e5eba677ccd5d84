"""``gptlab train``: resolve the config (defaults < --config < flags < --section.key=value), then train."""

from __future__ import annotations

import argparse
import json
import sys

from gptlab.commands import SRC_HELP, add_parser, json_arg

def _recipe_names() -> list[str]:
    """The shipped recipes (gptlab/configs/*.toml), without importing torch."""
    from importlib import resources

    try:
        return sorted(p.name[:-5] for p in resources.files("gptlab").joinpath("configs").iterdir()
                      if p.name.endswith(".toml"))
    except (FileNotFoundError, NotADirectoryError):  # pragma: no cover - a broken install
        return []


def register(sub: argparse._SubParsersAction) -> None:
    p = add_parser(sub, "train", run, help="train or fine-tune a model (torchrun for many GPUs)",
                   description="Train from a recipe (configs/NAME.toml or a TOML file). Any config key can be "
                               "set with --section.key=value, e.g. --model.n_layer=6 --optim.lr=1e-3.")
    p.add_argument("--config", default=None, help=f"recipe name ({', '.join(_recipe_names())}) or a TOML file")
    p.add_argument("--data", help="prepared dataset directory (from gptlab prepare), or a directory or quoted glob "
                                  "of llm.c / modded-nanogpt .bin or build-nanogpt .npy shards (val: *_val_* "
                                  "names, or --data.val GLOB)")
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
    json_arg(p)


def run(args: argparse.Namespace) -> int:
    from gptlab import dist as gdist
    from gptlab.config import TRAIN_FLAGS, resolve_train_config
    from gptlab.train import train

    flags = {k: getattr(args, k, None) for k in TRAIN_FLAGS}
    cfg = resolve_train_config(args.config, flags, getattr(args, "overrides", []))
    summary = train(cfg)
    if gdist.env_info().is_main:
        print(json.dumps(summary) if args.json else
              f"done: {summary['steps']} steps, final loss {summary['final_loss']}, val loss {summary['val_loss']}"
              f", run dir {summary['run_dir']}", file=sys.stdout if args.json else sys.stderr)
    return 0
