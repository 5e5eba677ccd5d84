#!/usr/bin/env python
"""Ablation of the modern architecture switches and Muon on Tiny Shakespeare (character level).

At the ``shakespeare-char-cpu`` budget (4 layers, 128 wide, context 64, 12 sequences per step) it trains
GPT-2 and each switch alone, then ``modern`` (all switches) and the ``modern-shakespeare-char-cpu`` recipe
(all switches + Muon), and reports for each:

- the validation loss after ``--steps`` iterations (2,000 by default), and
- the validation loss at equal wall-clock: a run of ``steps * ms(gpt2) / ms(config)`` iterations (its LR
  schedule fitted to that length), where ms/step comes from short timing runs of every config that are
  interleaved round-robin, so that all configs see the same (noisy, shared) machine.

Every run is ``gptlab train`` in a subprocess; results are read from each run's ``metrics.jsonl``.
Finished runs are reused, so an interrupted ablation continues where it stopped.

    python scripts/ablation.py --input data/tinyshakespeare.txt [--steps 2000] [--out runs/ablation] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BASE = "shakespeare-char-cpu"
MODERN = ["--model.pos_emb=rope", "--model.norm=rmsnorm", "--model.mlp=swiglu", "--model.qk_norm=true",
          "--model.tie_embeddings=false", "--model.zero_init_proj=true", "--model.bias=false"]

# name -> (recipe, extra overrides)
CONFIGS: dict[str, tuple[str, list[str]]] = {
    "gpt2": (BASE, []),
    "rope": (BASE, ["--model.pos_emb=rope"]),
    "rmsnorm": (BASE, ["--model.norm=rmsnorm"]),
    "swiglu": (BASE, ["--model.mlp=swiglu"]),
    "relu2": (BASE, ["--model.mlp=relu2"]),
    "qk_norm": (BASE, ["--model.qk_norm=true"]),
    "untied": (BASE, ["--model.tie_embeddings=false"]),
    "muon": (BASE, ["--optim.optimizer=muon"]),
    "modern": (BASE, MODERN),
    "modern+muon": ("modern-shakespeare-char-cpu", []),
}


def log(*a: Any) -> None:
    print(*a, file=sys.stderr, flush=True)


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def gptlab(*args: str, log_file: Path | None = None) -> None:
    """Run one ``gptlab`` command in a subprocess (the one installed beside this Python). Its stderr goes
    to ``log_file`` (not a pipe: a run must survive this script being interrupted)."""
    cmd = [sys.executable, "-m", "gptlab", *args]
    log_file = log_file or Path(os.devnull)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "w") as err:
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=err)
    if proc.returncode != 0:
        tail = log_file.read_text()[-3000:] if log_file != Path(os.devnull) else ""
        raise SystemExit(f"ablation: command failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")


def prepare(input_path: Path, data_dir: Path) -> None:
    if (data_dir / "manifest.json").exists():
        return
    if not input_path.exists():
        raise SystemExit(f"ablation: --input {input_path} not found (the Tiny Shakespeare text file)")
    gptlab("prepare", "shakespeare_char", "--input", str(input_path), "--out", str(data_dir),
           log_file=data_dir.parent / "prepare.log")


def train(name: str, run_dir: Path, data_dir: Path, steps: int, eval_every: int, threads: int, seed: int,
          extra: list[str]) -> dict[str, Any]:
    """One training run of ``steps`` iterations (reused when already finished, even by an earlier
    invocation that was interrupted before writing result.json); its result summary."""
    result_file = run_dir / "result.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    recipe, overrides = CONFIGS[name]
    finished = any(r.get("kind") == "val" and r.get("step") == steps for r in read_metrics(run_dir))
    if run_dir.exists() and not finished:  # an unfinished earlier attempt: start it over
        import shutil

        shutil.rmtree(run_dir)
    t0 = time.time()
    load0 = load_avg()
    if not finished:
        gptlab("train", "--config", recipe, "--data", str(data_dir), "--out", str(run_dir),
               "--max-steps", str(steps), "--eval-every", str(eval_every), "--checkpoint-every", "0",
               "--seed", str(seed), "--device", "cpu", f"--optim.decay_steps={steps}", "--eval.sample_every=0",
               f"--system.threads={threads}", "--logging.progress=false", f"--logging.log_every={max(steps, 1)}",
               "--checkpoint.keep_last=1", *overrides, *extra, log_file=run_dir.parent / f"{run_dir.name}.log")
    recs = read_metrics(run_dir)
    train_recs = [r for r in recs if r.get("kind") == "train"]
    vals = [r for r in recs if r.get("kind") == "val"]
    dts = [r["dt_ms"] for r in train_recs[1:]]
    res = {
        "name": name, "steps": steps, "val_loss": vals[-1]["val_loss"] if vals else None,
        "val_curve": [[r["step"], r["val_loss"]] for r in vals],
        "train_loss": train_recs[-1]["loss"] if train_recs else None,
        "median_ms_per_step": statistics.median(dts) if dts else None,
        "wall_s": round(time.time() - t0, 1), "load_before": load0, "load_after": load_avg(),
    }
    result_file.write_text(json.dumps(res, indent=1))
    return res


def timing(names: list[str], out: Path, data_dir: Path, steps: int, rounds: int, threads: int,
           extra: list[str]) -> dict[str, Any]:
    """ms/step of each config, measured in this process with the trainer's own pieces (recipe resolution,
    model, optimizer, loader, clipping), interleaved round-robin a few steps at a time so that every config
    sees the same (noisy, shared) machine. The first round is warm-up and is not counted."""
    cache = out / "timing.json"
    if cache.exists():
        cached = json.loads(cache.read_text())
        if all(n in cached for n in names):
            return cached
    import torch

    from gptlab.config import resolve_train_config
    from gptlab.data.loader import TokenLoader
    from gptlab.data.shards import read_manifest
    from gptlab.model import GPT
    from gptlab.optim import build_optimizer

    from gptlab.kernels import apply_cpu_kernels
    from gptlab.timing import alternate

    torch.set_num_threads(threads)
    vocab = read_manifest(data_dir)["vocab_size"]
    steps_of = {}
    for n in names:
        recipe, overrides = CONFIGS[n]
        cfg = resolve_train_config(recipe, {"system.device": "cpu"}, [*overrides, *extra])
        torch.manual_seed(0)
        model = apply_cpu_kernels(GPT(cfg.model.to_model_config(vocab)))  # as `gptlab train` runs it
        opt, _ = build_optimizer(model, cfg.optim, "cpu")
        loader = TokenLoader(data_dir, "train", cfg.batch.micro_batch, cfg.seq_len, shuffle=True, seed=0)

        def step(model=model, opt=opt, loader=loader, clip=cfg.optim.grad_clip) -> None:
            x, y = loader.next_batch()
            _, loss = model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip or float("inf"))
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss.item()

        steps_of[n] = step
    loads = [load_avg()[0]]

    def on_round(r: int, t: Any) -> None:
        loads.append(load_avg()[0])
        log(f"timing round {r + 1}/{rounds}: " + ", ".join(f"{n} {1000 * t.median(n):.0f}" for n in names)
            + f" ms/step (load {loads[-1]})")

    # A warm-up round, then `rounds` rounds of `steps` steps of every config in turn.
    t = alternate(steps_of, warmup=steps, rounds=rounds, calls=steps, on_round=on_round)
    dts = {n: [1000 * x for x in t.seconds[n]] for n in names}
    res: dict[str, Any] = {n: {"ms_per_step": statistics.median(v), "n": len(v)} for n, v in dts.items()}
    # Also each round's ratio to GPT-2 (same round, so the same load): a drift-free view of the cost.
    for n in names:
        per_round = [statistics.median(dts[n][i:i + steps]) / statistics.median(dts["gpt2"][i:i + steps])
                     for i in range(0, len(dts[n]), steps)]
        res[n]["ratio_to_gpt2_per_round"] = [round(x, 3) for x in per_round]
        res[n]["ratio_to_gpt2"] = round(statistics.median(per_round), 3)
    res["_load"] = {"min": min(loads), "max": max(loads), "mean": round(statistics.mean(loads), 2)}
    cache.write_text(json.dumps(res, indent=1))
    return res


def markdown(rows: list[dict[str, Any]], steps: int, timing_info: dict[str, Any]) -> str:
    lines = [f"| config | ms/step | val loss @ {steps} it | steps in GPT-2's {steps}-it time | val loss @ equal time |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        v = f"{r['val_loss']:.4f}" if r.get("val_loss") is not None else "-"
        e = f"{r['eq_val_loss']:.4f}" if r.get("eq_val_loss") is not None else "-"
        lines.append(f"| {r['name']} | {r['ms_per_step']:.1f} | {v} | {r['eq_steps']} | {e} |")
    ld = timing_info.get("_load", {})
    lines.append(f"\nTiming: in-process steps interleaved round-robin, 1-minute load average {ld.get('min')}-{ld.get('max')} "
                 f"(mean {ld.get('mean')}).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="tinyshakespeare.txt (the raw text)")
    p.add_argument("--out", default="runs/ablation", help="work directory (data, runs, results)")
    p.add_argument("--steps", type=int, default=2000, help="iterations of the fixed-step comparison")
    p.add_argument("--only", default="", help="comma-separated subset of: " + ", ".join(CONFIGS))
    p.add_argument("--timing-steps", type=int, default=4, help="steps per config per timing round")
    p.add_argument("--timing-rounds", type=int, default=5, help="round-robin timing rounds (after one warm-up)")
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads per run (1 is steadier on a shared machine)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--jobs", type=int, default=1, help="training runs at a time after the timing phase")
    p.add_argument("--timing-only", action="store_true", help="measure ms/step of every config and stop")
    p.add_argument("--no-equal-time", action="store_true", help="skip the equal-wall-clock runs")
    p.add_argument("--tolerance", type=float, default=0.03,
                   help="reuse the fixed-step run when the equal-time step count is within this fraction")
    p.add_argument("--extra", action="append", default=[], metavar="--section.key=value",
                   help="override passed to every run (repeatable); runs go to a separate --out")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    args = p.parse_args(argv)

    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(CONFIGS)
    bad = [n for n in names if n not in CONFIGS]
    if bad:
        p.error(f"--only: unknown config(s) {bad}; choose from {', '.join(CONFIGS)}")
    if "gpt2" not in names:
        names.insert(0, "gpt2")  # the wall-clock reference
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = out / "data"
    prepare(Path(args.input), data_dir)

    log(f"ablation: {len(names)} configs, load average {load_avg()}")
    tim = timing(names, out, data_dir, args.timing_steps, args.timing_rounds, args.threads, args.extra)
    if args.timing_only:
        print(json.dumps(tim)) if args.json else log(json.dumps(tim, indent=1))
        return 0
    budget_ms = args.steps * tim["gpt2"]["ms_per_step"]
    # Phase 1: every config at the fixed step count; phase 2: the extra equal-wall-clock runs. Runs may go
    # --jobs at a time: their speed does not enter the results (ms/step comes from the timing phase).
    from concurrent.futures import ThreadPoolExecutor

    rows = []
    for n in names:
        ms = tim[n]["ms_per_step"]
        rows.append({"name": n, "ms_per_step": round(ms, 2), "eq_steps": max(1, int(budget_ms / ms)),
                     "val_loss": None, "eq_val_loss": None})

    def fixed(row: dict[str, Any]) -> None:
        res = train(row["name"], out / "runs" / f"{row['name']}-{args.steps}", data_dir, args.steps,
                    args.eval_every, args.threads, args.seed, args.extra)
        row["val_loss"], row["run"] = res["val_loss"], res
        if abs(row["eq_steps"] - args.steps) <= args.tolerance * args.steps:
            row["eq_val_loss"] = res["val_loss"]
        log(f"{row['name']}: {row['ms_per_step']:.1f} ms/step, val {res['val_loss']} @ {args.steps} "
            f"(run took {res['wall_s']} s)")
        (out / "results.md").write_text(markdown(rows, args.steps, tim) + "\n")

    def equal_time(row: dict[str, Any]) -> None:
        eq = train(row["name"], out / "runs" / f"{row['name']}-{row['eq_steps']}", data_dir, row["eq_steps"],
                   args.eval_every, args.threads, args.seed, args.extra)
        row["eq_val_loss"], row["eq_run"] = eq["val_loss"], eq
        log(f"{row['name']}: val {eq['val_loss']} @ {row['eq_steps']} (equal time)")
        (out / "results.md").write_text(markdown(rows, args.steps, tim) + "\n")

    tasks = [(fixed, row) for row in rows]
    if not args.no_equal_time:
        tasks += [(equal_time, row) for row in rows if abs(row["eq_steps"] - args.steps) > args.tolerance * args.steps]
    # The headline comparison (GPT-2 vs the modern recipe) first, then Muon and modern alone, then the rest.
    first = ["gpt2", "modern+muon", "muon", "modern"]
    tasks.sort(key=lambda t: (first.index(t[1]["name"]) if t[1]["name"] in first else len(first),
                              t[0] is equal_time))
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for f in [pool.submit(fn, row) for fn, row in tasks]:
            f.result()
    table = markdown(rows, args.steps, tim)
    summary = {"steps": args.steps, "budget_s": round(budget_ms / 1000, 1), "threads": args.threads,
               "timing": tim, "rows": rows, "extra": args.extra, "table": table}
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    (out / "results.md").write_text(table + "\n")
    log(table)
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
