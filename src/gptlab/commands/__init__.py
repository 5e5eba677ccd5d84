"""One module per CLI verb: ``commands/<verb>.py`` holds the verb's arguments and its ``run(args) -> int``.

Each module defines ``register(sub)``, which adds its parser(s) and sets ``run`` as the handler through
``set_defaults(_run=...)``. Modules here import no torch at import time (only inside ``run``), so
``gptlab --help`` and ``gptlab VERB --help`` stay instant. A new verb is one new module plus one name in
:data:`VERBS`.
"""

from __future__ import annotations

import argparse

# The verbs in the order ``gptlab --help`` lists them; each is ``gptlab.commands.<name>``.
VERBS: tuple[str, ...] = ("prepare", "train", "sample", "chat", "eval", "export", "serve", "bench", "plot",
                         "tokenizer")

SRC_HELP = ("model source: a Hub name (gpt2, gpt2-medium, gpt2-large, gpt2-xl), a Hugging Face "
            "model directory, a gptlab run / checkpoint directory, a nanoGPT run dir or ckpt.pt, a build-nanogpt "
            "log dir or model_NNNNN.pt, or an llm.c model .bin")


class HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default in ``--help``, except where there is none to show (None/False)."""

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and self._default_shown(action):
            action.help = self._get_help_string(action)  # argparse skips options without help text
        return super()._format_action(action)

    @staticmethod
    def _default_shown(action: argparse.Action) -> bool:
        return (action.default is not None and action.default is not False and action.default != argparse.SUPPRESS
                and action.default != [] and bool(action.option_strings) and action.nargs != 0)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = (action.help or "").strip()
        if "default" not in text and self._default_shown(action):
            # Blank or empty strings (a newline prompt) are shown quoted; everything else as is.
            fmt = "%(default)r" if isinstance(action.default, str) and not action.default.strip() else "%(default)s"
            text = f"{text} (default: {fmt})".strip()
        return text


def add_parser(sub: argparse._SubParsersAction, name: str, run, **kw) -> argparse.ArgumentParser:
    """A sub-parser with the shared formatter whose handler is ``run``."""
    p = sub.add_parser(name, formatter_class=HelpFormatter, **kw)
    p.set_defaults(_run=run)
    return p


def init_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--init", required=True, help=SRC_HELP)


def device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps, or auto (best available)")


def quantize_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="int8 weight-only quantization (per-output-channel scales): a quarter of the weight bytes "
                        "read per decoded token")


def json_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout (human text goes to stderr)")


def emit(result: dict, as_json: bool, lines: list[str]) -> None:
    """Print ``result`` as one JSON object with ``--json``, else the human-readable ``lines``."""
    import json

    print(json.dumps(result) if as_json else "\n".join(lines))
