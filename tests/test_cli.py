"""The command line: one module per verb, instant --help (no torch), defaults shown, one-line errors."""

import subprocess
import sys

import pytest

from gptlab.cli import build_parser, main
from gptlab.commands import VERBS


def test_building_every_verb_parser_imports_no_torch():
    code = ("import sys, gptlab.cli; gptlab.cli.build_parser(); "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]; "
            "assert not bad, bad[:3]")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_has_help(verb, capsys):
    with pytest.raises(SystemExit) as e:
        main([verb, "--help"])
    assert e.value.code == 0
    assert "usage: gptlab " + verb in capsys.readouterr().out


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "train", "--help"])
    out = capsys.readouterr().out
    assert "(default: gpt2)" in out and "(default: 5)" in out


def test_every_leaf_parser_has_a_handler():
    import argparse

    def leaves(p):
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            yield p
        for s in subs:
            for child in s.choices.values():
                yield from leaves(child)

    for leaf in leaves(build_parser()):
        assert callable(leaf.get_default("_run")), leaf.prog
