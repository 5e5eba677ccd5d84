"""Training curves of one or more runs: the loss (train + val) and every registered eval's curves, with
GPT-2 / GPT-3 baselines.

Reads each run dir's ``metrics.jsonl`` (``{"kind": "train"|"val"|"hellaswag"|..., "step", ...}``) and
``config.json``. What is drawn comes from the eval registry (:mod:`gptlab.evals.registry`): each eval's
``curves`` name the record fields, so a new eval's records are plotted without a change here. The first
panel is the ``--metric``: for ``loss`` the raw train loss faintly, an EMA-smoothed copy on top, and the
validation loss with markers, plus a line for GPT-2 124M's val loss when the run's dataset is one where it
is known; for ``bpb`` validation bits per byte (``val_bpb``), the one number comparable across
tokenizers. Every other curve gets a panel of its own (HellaSwag ``acc_norm`` always, with GPT-2 124M /
GPT-3 125M lines; others when a run logged them). matplotlib is imported lazily with the Agg backend, so
plotting works on headless machines.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from gptlab.errors import GptlabError
from gptlab.evals.registry import Curve, Eval, curve, registered

# Val loss of OpenAI's GPT-2 124M checkpoint, per dataset family (prefix of the dataset name):
# FineWeb-Edu from build-nanogpt's training chart, OpenWebText from nanoGPT's README baseline table.
LOSS_BASELINES: dict[str, tuple[float, str]] = {
    "fineweb_edu": (3.2924, "GPT-2 124M val loss (FineWeb-Edu)"),
    "openwebtext": (3.12, "GPT-2 124M val loss (OpenWebText)"),
}
LOSS = "loss"  # the metric drawn beside the trainer's own train loss (records of kind "train")
TRAIN_LOSS = Curve("loss", "loss", "Loss", metric=LOSS)


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
    series: dict[str, Series]  # by record kind: "train" and each plotted eval's name
    dataset: str | None = None
    batch_tokens: int | None = None
    skipped: int = 0  # garbled or incomplete lines

    def get(self, kind: str) -> Series:
        return self.series.get(kind) or Series()

    @property
    def empty(self) -> bool:
        return not any(s.steps for s in self.series.values())


def _or(words: Sequence[str]) -> str:
    return f"{', '.join(words[:-1])} or {words[-1]}" if len(words) > 1 else "".join(words)


def plotted_evals() -> list[type[Eval]]:
    """The registered evals that declare curves, in registry order."""
    return [cls for cls in registered() if cls.curves]


def kinds() -> list[str]:
    """Every record kind a plot may draw: the train loss and each plotted eval."""
    return ["train", *(cls.name for cls in plotted_evals())]


def metrics() -> list[str]:
    """The ``--metric`` choices: each metric a registered eval's curve declares."""
    return list(dict.fromkeys(c.metric for cls in plotted_evals() for c in cls.curves if c.metric))


def metric_help() -> str:
    """The ``--metric`` choices with what each draws, e.g. ``loss (train + val, nats/token) or bpb (...)``."""
    helps: dict[str, str] = {}
    for c in (c for cls in plotted_evals() for c in cls.curves if c.metric):
        helps.setdefault(c.metric, c.help)
    return _or([f"{m} ({helps[m]})" if helps[m] else m for m in metrics()])


def _curves(metric: str) -> dict[str, Curve]:
    """The curve of each record kind drawn in a plot of ``metric``, in registry order."""
    out = {"train": TRAIN_LOSS} if metric == LOSS else {}
    for cls in plotted_evals():
        if (c := curve(cls, metric)) is not None:
            out[cls.name] = c
    return out


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


def load_run(run_dir: str | os.PathLike, metric: str = LOSS) -> Run:
    """Parse a run dir (or its ``metrics.jsonl``); bad lines are counted in ``Run.skipped``, not fatal.

    Each kind's series is the field of its curve for ``metric`` (``metric="bpb"``: the val series is
    ``val_bpb`` and there is no train series, train loss being per token).
    """
    p = Path(run_dir)
    metrics_file = p if p.is_file() else p / "metrics.jsonl"
    root = metrics_file.parent
    if not p.exists():
        raise PlotError(f"{p}: run directory not found")
    if not metrics_file.is_file():
        raise PlotError(f"{metrics_file}: no metrics.jsonl (is {root} a gptlab run directory?)")
    config = _read_json(root / "config.json")
    batch = config.get("batch") if isinstance(config.get("batch"), dict) else {}
    bt = batch.get("batch_tokens")
    curves = _curves(metric)
    by_kind: dict[str, dict[int, tuple[float, float | None]]] = {k: {} for k in curves}
    skipped = 0
    with metrics_file.open(encoding="utf-8", errors="replace") as f:
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
            c = curves.get(rec["kind"])
            if c is None:  # "sample", kinds without curves, other metrics: not plotted, not an error
                continue
            if c.optional and rec.get(c.field) is None:
                continue  # e.g. a validation without bits per byte (no tokenizer to count bytes)
            step = rec.get("step")
            value = _finite(rec.get(c.field))
            if isinstance(step, bool) or not isinstance(step, int) or value is None:
                skipped += 1
                continue
            by_kind[rec["kind"]][step] = (value, _finite(rec.get("tokens")))
    series = {}
    for kind, points in by_kind.items():
        s = Series()
        for step in sorted(points):
            s.steps.append(step)
            s.values.append(points[step][0])
            s.tokens.append(points[step][1])
        series[kind] = s
    return Run(name=root.resolve().name, path=root, series=series, dataset=run_dataset(config),
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


STATS = {"last": lambda v: v[-1], "min": min, "max": max}


def plot_runs(run_dirs: Sequence[str | os.PathLike], out: str | os.PathLike, *, x: str = "step", log: bool = False,
              smooth: float = 0.9, title: str | None = None, dpi: int = 100, metric: str = LOSS) -> dict[str, Any]:
    """Draw the figure for ``run_dirs`` into ``out`` (format from its suffix); return a summary.

    One panel for ``metric``, then one per own-panel curve of the registered evals (those with an
    ``empty`` note always, the others when a run logged them); 6 x 4.5 inches a panel.
    """
    if Path(out).is_dir():
        raise PlotError(f"--out {out}: is a directory; give an image file, e.g. --out {Path(out) / 'loss.png'}")
    if x not in ("step", "tokens"):
        raise PlotError(f"--x {x}: expected step or tokens")
    if metric not in metrics():
        raise PlotError(f"--metric {metric}: expected {' or '.join(metrics())}")
    if not 0.0 <= smooth < 1.0:
        raise PlotError(f"--smooth {smooth}: must be in [0, 1) (0 = no smoothing)")
    runs = [load_run(d, metric) for d in run_dirs]
    curves = _curves(metric)
    first = {k: c for k, c in curves.items() if k != "train" and c.metric == metric}
    panels = {k: c for k, c in curves.items() if c.metric is None}

    def logged(kind: str) -> bool:
        return any(r.get(kind).steps for r in runs)

    files = ", ".join(str(r.path / "metrics.jsonl") for r in runs)
    if metric != LOSS and not any(logged(k) for k in first):
        c = next(iter(first.values()))
        raise PlotError(f"no {c.field} records in {files}{c.missing}; plot --metric {LOSS} instead")
    for r in runs:
        if r.skipped:
            print(f"gptlab plot: warning: {r.path / 'metrics.jsonl'}: skipped {r.skipped} garbled or incomplete "
                  "line(s)", file=sys.stderr)
        elif r.empty:
            print(f"gptlab plot: warning: {r.path / 'metrics.jsonl'}: no {'/'.join(kinds())} records",
                  file=sys.stderr)
    if all(r.empty for r in runs):
        raise PlotError(f"no {_or(kinds())} records in {files} (has the run logged a step yet?)")
    names = [r.name for r in runs]
    if len(set(names)) < len(names):  # two runs both called e.g. "quickstart": show their parents
        names = [f"{r.path.resolve().parent.name}/{r.name}" for r in runs]
    shown = {k: c for k, c in panels.items() if c.empty is not None or logged(k)}

    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(1, 1 + len(shown), figsize=(6 * (1 + len(shown)), 4.5), dpi=dpi, squeeze=False)
    ax_loss, *ax_panels = axes[0]
    ax_of = dict(zip(shown, ax_panels))
    xlabel = "step" if x == "step" else "tokens"
    baselines: dict[float, str] = {}
    for i, (run, name) in enumerate(zip(runs, names)):
        c = colors[i % len(colors)]
        train = run.get("train")
        if train.steps:
            xs = _xs(run, train, x)
            if smooth > 0:
                ax_loss.plot(xs, train.values, color=c, alpha=0.25, linewidth=0.8)
                ax_loss.plot(xs, ema(train.values, smooth), color=c, linewidth=1.5, label=f"{name} train")
            else:
                ax_loss.plot(xs, train.values, color=c, linewidth=1.2, label=f"{name} train")
        for kind in first:
            if (s := run.get(kind)).steps:
                ax_loss.plot(_xs(run, s, x), s.values, color=c, linestyle="--", marker="o", markersize=3,
                             linewidth=1.2, label=f"{name} {kind}")
        for kind, ax in ax_of.items():
            if (s := run.get(kind)).steps:
                ax.plot(_xs(run, s, x), s.values, color=c, marker="o", markersize=3, linewidth=1.2, label=name)
        base = loss_baseline(run.dataset) if metric == LOSS else None
        if base is not None:
            baselines[base[0]] = base[1]
    for value, label in baselines.items():
        ax_loss.axhline(value, color="tab:red", linestyle=":", linewidth=1.2, label=f"{label} {value:.4g}")
    if log:
        ax_loss.set_yscale("log")
    head = next(iter(first.values()))
    ax_loss.set(xlabel=xlabel, ylabel=head.ylabel, title=head.title)
    ax_loss.grid(alpha=0.3)
    if ax_loss.lines:
        ax_loss.legend(fontsize=8)

    for kind, ax in ax_of.items():
        c = shown[kind]
        if logged(kind):
            if c.chance is not None:
                ax.axhline(c.chance, color="gray", linestyle=":", linewidth=1.0, label=f"random {c.chance:.4g}")
            for value, label, color in c.baselines:
                ax.axhline(value, color=color, linestyle=":", linewidth=1.2, label=f"{label} {value:.4g}")
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, c.empty, ha="center", va="center", transform=ax.transAxes, color="gray")
        ax.set(xlabel=xlabel, ylabel=c.ylabel, title=c.title)
        ax.grid(alpha=0.3)
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

    evals = plotted_evals()

    def run_summary(r: Run, name: str) -> dict[str, Any]:
        train = r.get("train")
        d: dict[str, Any] = {"name": name, "dir": str(r.path), "dataset": r.dataset, "train_points": len(train.steps)}
        d.update({f"{cls.name}_points": len(r.get(cls.name).steps) for cls in evals})
        d.update(skipped_lines=r.skipped, last_train_loss=train.values[-1] if train.values else None)
        for cls in evals:
            values = r.get(cls.name).values
            d.update({key: STATS[stat](values) if values else None for key, stat in cls.plot_summary.items()})
        return d

    return {"out": str(out), "x": x, "metric": metric, "loss_baselines": sorted(baselines),
            **{f"{kind}_baselines": [v for v, _, _ in c.baselines] if logged(kind) else []
               for kind, c in panels.items()},
            "runs": [run_summary(r, name) for r, name in zip(runs, names)]}
