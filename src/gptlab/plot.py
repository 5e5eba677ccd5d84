"""Training curves of one or more runs: loss (train + val) and HellaSwag, with GPT-2 / GPT-3 baselines.

Reads each run dir's ``metrics.jsonl`` (``{"kind": "train"|"val"|"hellaswag", "step", ...}``) and
``config.json``. The loss panel draws the raw train loss faintly, an EMA-smoothed copy on top, and the
validation loss with markers; the HellaSwag panel draws ``acc_norm``. Horizontal lines mark OpenAI's
checkpoints: HellaSwag GPT-2 124M / GPT-3 125M always, a val-loss line only when the run's dataset is
one whose GPT-2 124M val loss is known. With ``metric="bpb"`` the first panel is validation bits per
byte (``val_bpb``) instead, the one number comparable across tokenizers. matplotlib is imported lazily with the Agg backend, so plotting
works on headless machines.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from gptlab.errors import GptlabError
from gptlab.evals import GPT2_HELLASWAG_ACC_NORM, GPT3_HELLASWAG_ACC_NORM

# Val loss of OpenAI's GPT-2 124M checkpoint, per dataset family (prefix of the dataset name):
# FineWeb-Edu from build-nanogpt's training chart, OpenWebText from nanoGPT's README baseline table.
LOSS_BASELINES: dict[str, tuple[float, str]] = {
    "fineweb_edu": (3.2924, "GPT-2 124M val loss (FineWeb-Edu)"),
    "openwebtext": (3.12, "GPT-2 124M val loss (OpenWebText)"),
}
HELLASWAG_BASELINES: list[tuple[float, str, str]] = [
    (GPT2_HELLASWAG_ACC_NORM["gpt2"], "GPT-2 124M", "tab:red"),
    (GPT3_HELLASWAG_ACC_NORM["gpt3-125m"], "GPT-3 125M", "tab:green"),
]
KINDS = ("train", "val", "hellaswag")


class PlotError(GptlabError, ValueError):
    """Nothing to plot, or a run dir that cannot be read."""


@dataclass
class Series:
    """One metric of one run, sorted by step (a repeated step keeps its last record)."""

    steps: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    tokens: list[float | None] = field(default_factory=list)


@dataclass
class Run:
    name: str
    path: Path
    train: Series
    val: Series
    hellaswag: Series
    dataset: str | None = None
    batch_tokens: int | None = None
    skipped: int = 0  # garbled or incomplete lines

    @property
    def empty(self) -> bool:
        return not (self.train.steps or self.val.steps or self.hellaswag.steps)


def _finite(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return d if isinstance(d, dict) else {}


def run_dataset(config: dict[str, Any]) -> str | None:
    """The dataset a run trained on: its data dir's manifest name, else ``data.dataset`` when no dir was given."""
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    d = data.get("dir")
    if d:
        name = _read_json(Path(d) / "manifest.json").get("dataset")
        return name if isinstance(name, str) else None
    name = data.get("dataset")
    return name if isinstance(name, str) and name else None


def loss_baseline(dataset: str | None) -> tuple[float, str] | None:
    """GPT-2 124M's val loss on ``dataset``'s family, if known."""
    if not dataset:
        return None
    for prefix, base in LOSS_BASELINES.items():
        if dataset.startswith(prefix):
            return base
    return None


METRICS = ("loss", "bpb")


def load_run(run_dir: str | os.PathLike, metric: str = "loss") -> Run:
    """Parse a run dir (or its ``metrics.jsonl``); bad lines are counted in ``Run.skipped``, not fatal.

    ``metric="bpb"``: the val series is ``val_bpb`` and there is no train series (train loss is per token).
    """
    p = Path(run_dir)
    metrics = p if p.is_file() else p / "metrics.jsonl"
    root = metrics.parent
    if not p.exists():
        raise PlotError(f"{p}: run directory not found")
    if not metrics.is_file():
        raise PlotError(f"{metrics}: no metrics.jsonl (is {root} a gptlab run directory?)")
    config = _read_json(root / "config.json")
    batch = config.get("batch") if isinstance(config.get("batch"), dict) else {}
    bt = batch.get("batch_tokens")
    by_kind: dict[str, dict[int, tuple[float, float | None]]] = {k: {} for k in KINDS}
    skipped = 0
    with metrics.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                skipped += 1
                continue
            if not isinstance(rec, dict) or not isinstance(rec.get("kind"), str):
                skipped += 1
                continue
            if rec["kind"] not in KINDS:  # "sample" and future kinds: not plotted, not an error
                continue
            kind = rec["kind"]
            if metric == "bpb" and kind == "train":
                continue
            if metric == "bpb" and kind == "val" and rec.get("val_bpb") is None:
                continue  # a validation without bits per byte (no tokenizer to count bytes): nothing to draw
            step = rec.get("step")
            key = {"train": "loss", "val": "val_bpb" if metric == "bpb" else "val_loss", "hellaswag": "acc_norm"}[kind]
            value = _finite(rec.get(key))
            if isinstance(step, bool) or not isinstance(step, int) or value is None:
                skipped += 1
                continue
            by_kind[kind][step] = (value, _finite(rec.get("tokens")))
    series = {}
    for kind, points in by_kind.items():
        s = Series()
        for step in sorted(points):
            s.steps.append(step)
            s.values.append(points[step][0])
            s.tokens.append(points[step][1])
        series[kind] = s
    return Run(name=root.resolve().name, path=root, train=series["train"], val=series["val"],
               hellaswag=series["hellaswag"], dataset=run_dataset(config),
               batch_tokens=int(bt) if isinstance(bt, int) and bt > 0 else None, skipped=skipped)


def ema(values: Sequence[float], smooth: float) -> list[float]:
    """Bias-corrected exponential moving average (TensorBoard-style): early points are not pulled to 0."""
    if not 0.0 <= smooth < 1.0:
        raise PlotError(f"--smooth {smooth}: must be in [0, 1) (0 = no smoothing)")
    out, acc = [], 0.0
    for i, v in enumerate(values, 1):
        acc = smooth * acc + (1.0 - smooth) * v
        out.append(acc / (1.0 - smooth**i))
    return out


def _xs(run: Run, s: Series, x: str) -> list[float]:
    if x == "step":
        return [float(t) for t in s.steps]
    # Tokens seen after each step: logged per record when the trainer provides it, else steps x batch.
    if all(t is not None for t in s.tokens):
        return [float(t) for t in s.tokens]  # type: ignore[arg-type]
    if run.batch_tokens is None:
        raise PlotError(f"{run.path}: --x tokens needs 'tokens' in metrics.jsonl or batch.batch_tokens in "
                        "config.json; use --x step")
    return [float(t * run.batch_tokens) for t in s.steps]


def plot_runs(run_dirs: Sequence[str | os.PathLike], out: str | os.PathLike, *, x: str = "step", log: bool = False,
              smooth: float = 0.9, title: str | None = None, dpi: int = 100, metric: str = "loss") -> dict[str, Any]:
    """Draw the two-panel figure for ``run_dirs`` into ``out`` (format from its suffix); return a summary."""
    if Path(out).is_dir():
        raise PlotError(f"--out {out}: is a directory; give an image file, e.g. --out {Path(out) / 'loss.png'}")
    if x not in ("step", "tokens"):
        raise PlotError(f"--x {x}: expected step or tokens")
    if metric not in METRICS:
        raise PlotError(f"--metric {metric}: expected {' or '.join(METRICS)}")
    if not 0.0 <= smooth < 1.0:
        raise PlotError(f"--smooth {smooth}: must be in [0, 1) (0 = no smoothing)")
    runs = [load_run(d, metric) for d in run_dirs]
    if metric == "bpb" and not any(r.val.steps for r in runs):
        raise PlotError(f"no val_bpb records in {', '.join(str(r.path / 'metrics.jsonl') for r in runs)} (validation "
                        "off, or a run logged before bits per byte were recorded); plot --metric loss instead")
    for r in runs:
        if r.skipped:
            print(f"gptlab plot: warning: {r.path / 'metrics.jsonl'}: skipped {r.skipped} garbled or incomplete "
                  "line(s)", file=sys.stderr)
        elif r.empty:
            print(f"gptlab plot: warning: {r.path / 'metrics.jsonl'}: no train/val/hellaswag records", file=sys.stderr)
    if all(r.empty for r in runs):
        raise PlotError(f"no train, val or hellaswag records in {', '.join(str(r.path / 'metrics.jsonl') for r in runs)}"
                        " (has the run logged a step yet?)")
    names = [r.name for r in runs]
    if len(set(names)) < len(names):  # two runs both called e.g. "quickstart": show their parents
        names = [f"{r.path.resolve().parent.name}/{r.name}" for r in runs]

    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, (ax_loss, ax_hs) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=dpi)
    xlabel = "step" if x == "step" else "tokens"
    baselines: dict[float, str] = {}
    for i, (run, name) in enumerate(zip(runs, names)):
        c = colors[i % len(colors)]
        if run.train.steps:
            xs = _xs(run, run.train, x)
            if smooth > 0:
                ax_loss.plot(xs, run.train.values, color=c, alpha=0.25, linewidth=0.8)
                ax_loss.plot(xs, ema(run.train.values, smooth), color=c, linewidth=1.5, label=f"{name} train")
            else:
                ax_loss.plot(xs, run.train.values, color=c, linewidth=1.2, label=f"{name} train")
        if run.val.steps:
            ax_loss.plot(_xs(run, run.val, x), run.val.values, color=c, linestyle="--", marker="o", markersize=3,
                         linewidth=1.2, label=f"{name} val")
        if run.hellaswag.steps:
            ax_hs.plot(_xs(run, run.hellaswag, x), run.hellaswag.values, color=c, marker="o", markersize=3,
                       linewidth=1.2, label=name)
        base = loss_baseline(run.dataset) if metric == "loss" else None
        if base is not None:
            baselines[base[0]] = base[1]
    for value, label in baselines.items():
        ax_loss.axhline(value, color="tab:red", linestyle=":", linewidth=1.2, label=f"{label} {value:.4g}")
    if log:
        ax_loss.set_yscale("log")
    if metric == "bpb":
        ax_loss.set(xlabel=xlabel, ylabel="val bits per byte", title="Validation bits per byte")
    else:
        ax_loss.set(xlabel=xlabel, ylabel="loss", title="Loss")
    ax_loss.grid(alpha=0.3)
    if ax_loss.lines:
        ax_loss.legend(fontsize=8)

    has_hs = any(r.hellaswag.steps for r in runs)
    if has_hs:
        ax_hs.axhline(0.25, color="gray", linestyle=":", linewidth=1.0, label="random 0.25")  # 4 endings
        for value, label, color in HELLASWAG_BASELINES:
            ax_hs.axhline(value, color=color, linestyle=":", linewidth=1.2, label=f"{label} {value:.4g}")
        ax_hs.legend(fontsize=8)
    else:
        ax_hs.text(0.5, 0.5, "no HellaSwag evaluations logged\n(they need a GPT-2-tokenizer model\nand eval.hellaswag_every > 0)",
                   ha="center", va="center", transform=ax_hs.transAxes, color="gray")
    ax_hs.set(xlabel=xlabel, ylabel="acc_norm", title="HellaSwag (completion style)")
    ax_hs.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fmt = out.suffix.lstrip(".").lower() or "png"
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        fig.savefig(tmp, format=fmt)
        os.replace(tmp, out)
    except ValueError as e:  # unknown format
        raise PlotError(f"--out {out}: {e}") from None
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)

    def last(s: Series) -> float | None:
        return s.values[-1] if s.values else None

    return {"out": str(out), "x": x, "metric": metric, "loss_baselines": sorted(baselines), "hellaswag_baselines":
            [v for v, _, _ in HELLASWAG_BASELINES] if has_hs else [], "runs": [
        {"name": name, "dir": str(r.path), "dataset": r.dataset, "train_points": len(r.train.steps),
         "val_points": len(r.val.steps), "hellaswag_points": len(r.hellaswag.steps), "skipped_lines": r.skipped,
         "last_train_loss": last(r.train), "last_val_loss": last(r.val),
         "min_val_loss": min(r.val.values) if r.val.values else None,
         "max_acc_norm": max(r.hellaswag.values) if r.hellaswag.values else None}
        for r, name in zip(runs, names)]}
