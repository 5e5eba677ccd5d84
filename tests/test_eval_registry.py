"""A new eval is one class: registered, the trainer runs it, ``gptlab eval NAME`` runs it on a saved model and
``gptlab plot`` draws its records, with no change to the trainer, ``commands/eval.py`` or ``plot.py``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from gptlab.cli import main
from gptlab.evals import registry
from gptlab.metrics import read_metrics
from gptlab.train import train
from test_train import cfg_for

TEXT = "The lazy dog sat on the mat."  # within the tiny context (32 characters)


def fixed_text_loss(model: torch.nn.Module, tokenizer) -> float:
    """Mean next-token loss of ``model`` on :data:`TEXT` (the model's mode is kept)."""
    ids = torch.tensor([tokenizer.encode(TEXT)], device=next(model.parameters()).device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        _, loss = model(ids[:, :-1], ids[:, 1:])
    model.train(was_training)
    return float(loss)


@pytest.fixture
def fixed_text_eval():
    """Registers the eval for one test and removes it afterwards (other tests see the built-in registry)."""

    @registry.register
    class FixedTextLoss(registry.Eval):
        name = "fixed_text"
        command = "fixed-text"
        command_help = "mean loss on a fixed sentence"
        curves = (registry.Curve("loss", "nats/token", "Loss on a fixed sentence"),)
        plot_summary = {"last_fixed_text_loss": "last"}

        @classmethod
        def every(cls, cfg):  # instead of an every_key (an [eval] config field)
            return 3

        def run(self, model, ctx):
            return [{"loss": fixed_text_loss(model, ctx.tokenizer)}]

        def report(self, records):
            return f"fixed text loss {records[0]['loss']:.4f}"

        @classmethod
        def add_arguments(cls, parser):
            parser.add_argument("--init", required=True)
            parser.add_argument("--json", action="store_true")

        @classmethod
        def run_cli(cls, args):
            from gptlab.loading import load_model

            model, tokenizer = load_model(args.init, device="cpu")
            return {"task": "fixed_text", "init": args.init, "loss": fixed_text_loss(model, tokenizer)}

        @classmethod
        def cli_report(cls, result, args):
            return f"fixed text loss {result['loss']:.6f}"

    try:
        yield FixedTextLoss
    finally:
        registry._REGISTRY.pop(FixedTextLoss.name, None)


def test_a_new_eval_is_trained_evaluated_and_plotted(fixed_text_eval, data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    train(cfg_for(data_dir, out, "--batch.batch_tokens=128", "--batch.micro_batch=4", "--eval.eval_every=0",
                  "--checkpoint.every=0", max_steps=7))
    capsys.readouterr()
    # The trainer: every 3 steps and after the last, on that step's weights.
    recs = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "fixed_text"]
    assert [r["step"] for r in recs] == [3, 6, 7]
    assert recs[-1]["loss"] < recs[0]["loss"]  # training on the same words lowers it

    # gptlab eval fixed-text: the saved final weights give the last record's number.
    assert main(["eval", "fixed-text", "--init", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["task"] == "fixed_text" and res["loss"] == pytest.approx(recs[-1]["loss"], rel=1e-5)
    assert main(["eval", "fixed-text", "--init", str(out)]) == 0
    assert capsys.readouterr().out == f"fixed text loss {res['loss']:.6f}\n"
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "fixed-text" in capsys.readouterr().out

    # gptlab plot: a third panel with its series; the built-in panels are unchanged.
    png = tmp_path / "curves.png"
    assert main(["plot", str(out), "--out", str(png), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    run = summary["runs"][0]
    assert run["fixed_text_points"] == 3 and run["last_fixed_text_loss"] == pytest.approx(recs[-1]["loss"])
    assert run["train_points"] == 7 and run["hellaswag_points"] == 0 and summary["fixed_text_baselines"] == []
    from PIL import Image

    with Image.open(png) as im:
        assert im.size == (1800, 450)  # three 6 x 4.5 inch panels at 100 dpi


def test_the_registry_loads_without_torch():
    """``gptlab eval --help`` and ``gptlab plot --help`` build their parsers from every registered eval."""
    code = ("import sys, gptlab.evals.registry as r, gptlab.plot as p; r.registered(); p.metrics(); "
            "from gptlab.cli import main\n"
            "for verb in ('eval', 'plot'):\n"
            "    try: main([verb, '--help'])\n"
            "    except SystemExit: pass\n"
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]; assert not bad, bad[:3]")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert "hellaswag" in out and "loss" in out and "--metric {loss,bpb}" in out
