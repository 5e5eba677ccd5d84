"""gptlab plot: a real PNG from small metrics files, tolerant parsing, clear errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from gptlab import plot
from gptlab.cli import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _make_run(root, name, *, steps=30, dataset="fineweb_edu_10b", hellaswag=True, batch_tokens=4096,
              extra_lines=()):
    """A run dir like the trainer writes: config.json (data dir with a manifest) and metrics.jsonl."""
    run = root / name
    run.mkdir(parents=True)
    data = root / f"data_{name}"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({"dataset": dataset, "vocab_size": 50257}))
    (run / "config.json").write_text(json.dumps({"model": {"n_layer": 2}, "data": {"dir": str(data),
                                                 "dataset": "ignored_when_dir_is_set"},
                                                 "batch": {"batch_tokens": batch_tokens}}))
    lines = []
    for s in range(1, steps + 1):
        lines.append(json.dumps({"kind": "train", "step": s, "loss": 10.0 * math.exp(-s / 10) + 3.0, "lr": 1e-3}))
        if s % 10 == 0:
            lines.append(json.dumps({"kind": "val", "step": s, "val_loss": 9.0 * math.exp(-s / 10) + 3.1}))
            if hellaswag:
                lines.append(json.dumps({"kind": "hellaswag", "step": s, "acc": 0.25, "acc_norm": 0.25 + s / 1000,
                                         "n": 100}))
            lines.append(json.dumps({"kind": "sample", "step": s, "text": "hello"}))
    lines += list(extra_lines)
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run


def _png_size(path):
    from PIL import Image

    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return im.format, im.size


def test_two_runs_make_a_valid_png(tmp_path):
    a = _make_run(tmp_path, "run_a")
    b = _make_run(tmp_path, "run_b", steps=20, dataset="shakespeare_char", hellaswag=False)
    out = tmp_path / "figs" / "curves.png"
    summary = plot.plot_runs([a, b], out, smooth=0.8)
    data = out.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert _png_size(out) == ("PNG", (1200, 450))  # figsize 12 x 4.5 inches at 100 dpi
    assert len(data) < 200_000
    ra, rb = summary["runs"]
    assert (ra["name"], ra["train_points"], ra["val_points"], ra["hellaswag_points"]) == ("run_a", 30, 3, 3)
    assert (rb["name"], rb["train_points"], rb["val_points"], rb["hellaswag_points"]) == ("run_b", 20, 2, 0)
    assert ra["dataset"] == "fineweb_edu_10b" and rb["dataset"] == "shakespeare_char"
    # Only run_a's dataset has a known GPT-2 val loss; HellaSwag lines are GPT-2 124M and GPT-3 125M.
    assert summary["loss_baselines"] == [3.2924]
    assert summary["hellaswag_baselines"] == [0.2955, 0.337]
    assert ra["min_val_loss"] == pytest.approx(9.0 * math.exp(-3) + 3.1)
    assert ra["max_acc_norm"] == pytest.approx(0.28)
    assert not list(out.parent.glob(".*tmp*"))  # written atomically, no temp file left


def test_tokens_axis_log_scale_and_other_formats(tmp_path):
    a = _make_run(tmp_path, "a")
    out = tmp_path / "c.png"
    plot.plot_runs([a], out, x="tokens", log=True, smooth=0.0)
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    svg = tmp_path / "c.svg"
    plot.plot_runs([a], svg)
    assert b"<svg" in svg.read_bytes()[:500]
    # No batch_tokens and no per-record tokens: --x tokens cannot be computed.
    cfg = json.loads((a / "config.json").read_text())
    del cfg["batch"]
    (a / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(plot.PlotError, match="--x tokens"):
        plot.plot_runs([a], out, x="tokens")


def test_tokens_axis_values():
    run = plot.Run(name="r", path=plot.Path("."), series={"train": plot.Series([1, 2, 5], [3.0, 2.0, 1.0], [None] * 3)},
                   batch_tokens=1000)
    assert plot._xs(run, run.get("train"), "tokens") == [1000.0, 2000.0, 5000.0]
    logged = plot.Series([1, 2], [3.0, 2.0], [512.0, 1024.0])  # the trainer's own count wins
    assert plot._xs(run, logged, "tokens") == [512.0, 1024.0]


def test_garbled_lines_are_skipped_with_a_count(tmp_path, capsys):
    bad = ['{"kind": "train", "step": 31, "loss": ', "not json at all", '["a", "list"]',
           '{"kind": "train", "step": "x", "loss": 1.0}', '{"kind": "val", "step": 40}',
           '{"kind": "train", "step": 32, "loss": NaN}', '{"step": 33, "loss": 1.0}']
    a = _make_run(tmp_path, "a", extra_lines=bad)
    run = plot.load_run(a)
    assert run.skipped == len(bad)
    assert len(run.get("train").steps) == 30 and run.get("train").steps == sorted(run.get("train").steps)
    summary = plot.plot_runs([a], tmp_path / "c.png")
    assert summary["runs"][0]["skipped_lines"] == len(bad)
    assert f"skipped {len(bad)} garbled" in capsys.readouterr().err


def test_repeated_steps_keep_the_last_record(tmp_path):
    a = _make_run(tmp_path, "a", steps=5, extra_lines=[json.dumps({"kind": "train", "step": 3, "loss": 99.0})])
    run = plot.load_run(a / "metrics.jsonl")  # a metrics file path works too
    assert run.get("train").steps == [1, 2, 3, 4, 5] and run.get("train").values[2] == 99.0


def test_ema_matches_weighted_average():
    rng = np.random.default_rng(0)
    xs = rng.normal(size=50).tolist()
    for a in (0.0, 0.5, 0.9):
        got = plot.ema(xs, a)
        for n in (1, 7, 50):
            w = (1 - a) * a ** np.arange(n - 1, -1, -1)  # weight of x_1 .. x_n
            assert got[n - 1] == pytest.approx(float(np.dot(w, xs[:n]) / w.sum()), rel=1e-9, abs=1e-12)
    assert plot.ema([2.0] * 5, 0.99) == pytest.approx([2.0] * 5)  # bias correction: no pull towards 0
    with pytest.raises(plot.PlotError, match="smooth"):
        plot.ema(xs, 1.0)


def test_loss_baseline_only_for_matching_datasets(tmp_path):
    assert plot.loss_baseline("fineweb_edu_10b")[0] == 3.2924
    assert plot.loss_baseline("fineweb_edu_100b")[0] == 3.2924
    assert plot.loss_baseline("openwebtext")[0] == 3.12
    for name in ("fineweb_10b", "shakespeare_char", "tinystories", None):
        assert plot.loss_baseline(name) is None
    # Without a data dir the config's dataset name is used; a dir without a manifest means unknown.
    assert plot.run_dataset({"data": {"dir": "", "dataset": "openwebtext"}}) == "openwebtext"
    assert plot.run_dataset({"data": {"dir": str(tmp_path / "nope"), "dataset": "openwebtext"}}) is None
    assert plot.run_dataset({}) is None


def test_errors(tmp_path):
    with pytest.raises(plot.PlotError, match="not found"):
        plot.load_run(tmp_path / "missing")
    (tmp_path / "norun").mkdir()
    with pytest.raises(plot.PlotError, match="no metrics.jsonl"):
        plot.load_run(tmp_path / "norun")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text('{"kind": "sample", "step": 1, "text": "x"}\n\n')
    with pytest.raises(plot.PlotError, match="no train, val or hellaswag records"):
        plot.plot_runs([empty], tmp_path / "x.png")
    a = _make_run(tmp_path, "a", steps=3)
    with pytest.raises(plot.PlotError, match="--out"):
        plot.plot_runs([a], tmp_path / "x.notaformat")
    with pytest.raises(plot.PlotError, match="--smooth"):
        plot.plot_runs([a], tmp_path / "x.png", smooth=-0.1)


def test_cli(tmp_path, capsys):
    a = _make_run(tmp_path, "a", steps=12)
    out = tmp_path / "curves.png"
    assert main(["plot", str(a), "--out", str(out), "--json", "--log", "--smooth", "0.5"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["out"] == str(out) and res["runs"][0]["train_points"] == 12
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    assert main(["plot", str(tmp_path / "nope"), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("gptlab plot: error:") and "not found" in err and "\n" not in err


def test_metric_bpb_plots_val_bits_per_byte(tmp_path, capsys):
    bpb = [json.dumps({"kind": "val", "step": s, "val_loss": 2.0, "val_bpb": 1.5 - s / 100}) for s in (5, 15, 25)]
    a = _make_run(tmp_path, "a", steps=30, extra_lines=bpb)
    b = _make_run(tmp_path, "b", steps=30)  # an older run: val records without val_bpb
    out = tmp_path / "bpb.png"
    assert main(["plot", str(a), str(b), "--out", str(out), "--metric", "bpb", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["metric"] == "bpb" and res["loss_baselines"] == []
    ra, rb = res["runs"]
    assert ra["train_points"] == 0 and ra["val_points"] == 3 and ra["min_val_loss"] == pytest.approx(1.25)
    assert rb["val_points"] == 0
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    assert main(["plot", str(b), "--out", str(out), "--metric", "bpb"]) == 1
    assert "no val_bpb records" in capsys.readouterr().err
