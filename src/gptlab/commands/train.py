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


# Each flag is a shortcut for one config key: (flag, key, argparse options). An unset flag (None) leaves
# the recipe's value; --section.key=value overrides win over flags.
FLAGS: list[tuple[str, str, dict]] = [
    ("--data", "data.dir", dict(help="prepared dataset directory (from gptlab prepare), or a directory or quoted "
                                     "glob of llm.c / modded-nanogpt .bin or build-nanogpt .npy shards (val: "
                                     "*_val_* names, or --data.val GLOB)")),
    ("--out", "out_dir", dict(help="run directory (default: runs/<config name>)")),
    ("--max-steps", "schedule.max_steps", dict(type=int, help="optimizer steps to run")),
    ("--resume", "resume", dict(metavar="auto|never|STEP",
                                help="auto: continue from the newest checkpoint in --out that verifies (start fresh "
                                     "when there is none); STEP: from that step's checkpoint; never: start over "
                                     "there, removing only gptlab's files (default: refuse to touch a run dir that "
                                     "already has progress)")),
    ("--init", "model.init", dict(help="start from weights: " + SRC_HELP)),
    ("--micro-batch", "batch.micro_batch", dict(type=int, help="sequences per forward/backward on each rank")),
    ("--batch-tokens", "batch.batch_tokens", dict(type=int, help="tokens per optimizer step, all ranks and micro-steps")),
    ("--eval-every", "eval.eval_every", dict(type=int, help="validation every N steps (0: off)")),
    ("--checkpoint-every", "checkpoint.every", dict(type=int, help="checkpoint every N steps (0: only at the end)")),
    ("--time-limit", "system.time_limit", dict(type=float, help="stop cleanly (checkpoint, exit 0) after this many minutes")),
    ("--device", "system.device", dict(help="cpu, cuda, cuda:N, mps, or auto (default: the recipe's, auto)")),
    ("--seed", "system.seed", dict(type=int, help="random seed")),
]


def register(sub: argparse._SubParsersAction) -> None:
    p = add_parser(sub, "train", run, help="train or fine-tune a model (torchrun for many GPUs)",
                   description="Train from a recipe (configs/NAME.toml or a TOML file). Any config key can be "
                               "set with --section.key=value, e.g. --model.n_layer=6 --optim.lr=1e-3.")
    p.add_argument("--config", default=None, help=f"recipe name ({', '.join(_recipe_names())}) or a TOML file")
    for name, key, kw in FLAGS:
        metavar = kw.get("metavar", None if "choices" in kw else name[2:].upper().replace("-", "_"))
        p.add_argument(name, dest=key, default=None, **{**kw, "metavar": metavar, "help": f"{kw['help']} [{key}]"})
    json_arg(p)


def run(args: argparse.Namespace) -> int:
    # Before anything heavy is imported: a SIGTERM / Ctrl-C during start-up then stops the run cleanly.
    from gptlab.trainer.signals import StopFlag

    stop = StopFlag()
    stop.install()
    from gptlab import dist as gdist
    from gptlab.config import resolve_train_config
    from gptlab.errors import GptlabError
    from gptlab.train import train

    flags = {key: getattr(args, key, None) for _, key, _ in FLAGS}
    cfg = resolve_train_config(args.config, flags, getattr(args, "overrides", []))
    try:
        summary = train(cfg, stop=stop)
    except GptlabError as e:
        if "--input " not in str(e):
            raise
        # The automatic prepare's errors name prepare's flag; in train the same setting is data.input.
        raise GptlabError(str(e).replace("--input ", "--data.input=")) from None
    if gdist.env_info().is_main:
        print(json.dumps(summary) if args.json else
              f"done: {summary['steps']} steps, final loss {summary['final_loss']}, val loss {summary['val_loss']}"
              f", run dir {summary['run_dir']}", file=sys.stdout if args.json else sys.stderr)
    return 0
