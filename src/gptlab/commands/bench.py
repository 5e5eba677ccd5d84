"""``gptlab bench train|generate|prepare|loader``: throughput benchmarks, side by side with transformers."""

from __future__ import annotations

import argparse
from typing import Any

from gptlab.commands import SRC_HELP, add_parser, device_arg, emit, json_arg, quantize_arg


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks: train, generate, serve, prepare, loader")
    bsub = p.add_subparsers(dest="bench_task", metavar="WHAT", required=True)
    t = add_parser(bsub, "train", run_train, help="training step throughput, MFU, memory")
    t.add_argument("--model", default="gpt2", help="model preset")
    t.add_argument("--batch", type=int, default=8)
    t.add_argument("--seq", type=int, default=None, help="sequence length (default: the preset's context)")
    t.add_argument("--steps", type=int, default=10, help="timed steps")
    t.add_argument("--warmup", type=int, default=3)
    t.add_argument("--rounds", type=int, default=5, help="alternating A/B rounds the timed steps are split over")
    t.add_argument("--dtype", default="auto")
    t.add_argument("--compile", action="store_true")
    t.add_argument("--vs-hf", action="store_true", help="also time transformers' GPT2LMHeadModel, alternating A/B")
    t.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="model config overrides")
    t.add_argument("--compile-hf", action="store_true", help="with --vs-hf: torch.compile transformers' model too")
    t.add_argument("--vs-model", default=None, metavar="PRESET",
                   help="also time another gptlab model (preset or recipe, e.g. modern-shakespeare-char-cpu) at the "
                        "same batch and sequence, alternating; reports vs_step_ratio = its ms/step over --model's")
    t.add_argument("--vs-set", nargs="*", default=[], metavar="KEY=VALUE", help="--vs-model config overrides")
    t.add_argument("--vs-compile", choices=["yes", "no"], default=None,
                   help="compile the --vs-model or not (default: as --compile)")
    t.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default: torch's choice)")
    device_arg(t)
    json_arg(t)
    g = add_parser(bsub, "generate", run_generate, help="decode throughput with the KV cache")
    g.add_argument("--model", default="gpt2", help="model preset or " + SRC_HELP)
    g.add_argument("--batch", type=int, default=1)
    g.add_argument("--prompt-tokens", type=int, default=16)
    g.add_argument("--new-tokens", type=int, default=128)
    g.add_argument("--dtype", default="auto")
    quantize_arg(g)
    g.add_argument("--compile", action="store_true")
    g.add_argument("--vs-hf", action="store_true", help="also time transformers' generate")
    g.add_argument("--no-cache-baseline", action="store_true", help="also time the no-KV-cache loop")
    g.add_argument("--rounds", type=int, default=3, help="timed generations per contender, alternating")
    g.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="model config overrides (presets)")
    g.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default: torch's choice)")
    device_arg(g)
    json_arg(g)
    sv = add_parser(bsub, "serve", run_serve, help="load-test gptlab serve over HTTP (concurrent streaming clients)")
    sv.add_argument("--model", default="gpt2", help="model preset (random weights) or " + SRC_HELP)
    sv.add_argument("--clients", type=int, default=16, help="concurrent clients")
    sv.add_argument("--requests", type=int, default=32, help="requests in the concurrent run")
    sv.add_argument("--prompt-tokens", type=int, default=128)
    sv.add_argument("--max-tokens", type=int, default=128, help="new tokens per request (exactly: ignore_eos)")
    sv.add_argument("--one-client-requests", type=int, default=4,
                    help="requests in the one-client run (and the --vs-hf run)")
    sv.add_argument("--ramp-up", type=float, default=0.0,
                    help="seconds over which the clients' first requests are spread (0: all at once)")
    sv.add_argument("--url", default=None, help="load-test this running server instead of starting one")
    sv.add_argument("--api-key", default=None, help="Bearer key for --url")
    sv.add_argument("--vs-hf", action="store_true",
                    help="also serve the one-client requests one by one with transformers' generate")
    sv.add_argument("--max-batch", type=int, default=None, help="server rows per batch (default: --clients)")
    sv.add_argument("--dtype", default="float32")
    sv.add_argument("--compile", action="store_true")
    quantize_arg(sv)
    sv.add_argument("--seed", type=int, default=0)
    device_arg(sv)
    json_arg(sv)
    pr = add_parser(bsub, "prepare", run_prepare, help="tokenization throughput for 1..N workers")
    pr.add_argument("--input", help="text file to tokenize (default: a generated corpus)")
    pr.add_argument("--max-workers", type=int, default=0, help="default: all cores")
    pr.add_argument("--mb", type=float, default=20.0, help="megabytes of text to tokenize")
    pr.add_argument("--rounds", type=int, default=2, help="timed passes per worker count, alternating")
    json_arg(pr)
    lo = add_parser(bsub, "loader", run_loader, help="batches/s the token loader sustains")
    lo.add_argument("--data", help="prepared dataset directory (default: a generated one)")
    lo.add_argument("--batch", type=int, default=64)
    lo.add_argument("--seq", type=int, default=1024)
    lo.add_argument("--batches", type=int, default=200)
    lo.add_argument("--shuffle", action="store_true")
    lo.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default: torch's choice)")
    device_arg(lo)
    json_arg(lo)


def _set_threads(n: int) -> None:
    if n and n > 0:
        import torch

        torch.set_num_threads(n)


def _fmt_train(r: dict[str, Any]) -> list[str]:
    lines = [f"device: {r['device_name']} ({r['device']}), torch {r['torch_version']}, dtype {r['dtype']}, "
             f"threads {r['num_threads']}, load {r['loadavg']}",
             f"model {r['model']}: {r['n_params'] / 1e6:.2f}M params, batch {r['batch']} x seq {r['seq']}, "
             f"compile={r['compile']}",
             f"gptlab: {r['ms_per_step']:.2f} ms/step (mean {r['ms_per_step_mean']:.2f}), "
             f"{r['tokens_per_s']:,.0f} tokens/s, peak memory {r['peak_memory_mb']:.0f} MB"
             + (f", MFU {100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "")]
    if "hf_tokens_per_s" in r:
        lines.append(f"transformers: {r['hf_ms_per_step']:.2f} ms/step, {r['hf_tokens_per_s']:,.0f} tokens/s"
                     + (f", MFU {100 * r['hf_mfu']:.1f}%" if r.get("hf_mfu") is not None else ""))
        lines.append(f"speedup vs transformers: {r['speedup_vs_hf']:.2f}x")
    if "vs_ms_per_step" in r:
        lines.append(f"{r['vs_model']}: {r['vs_ms_per_step']:.2f} ms/step, {r['vs_tokens_per_s']:,.0f} tokens/s "
                     f"-> {r['vs_step_ratio']:.2f}x {r['model']}'s step time")
    return lines


def run_train(args: argparse.Namespace) -> int:
    """``gptlab bench train``."""
    _set_threads(getattr(args, "threads", 0))
    from gptlab.bench import bench_train

    r = bench_train(args.model, batch=args.batch, seq=args.seq, steps=args.steps, warmup=args.warmup,
                    rounds=getattr(args, "rounds", 5), dtype=args.dtype, compile=args.compile,
                    compile_hf=getattr(args, "compile_hf", False), vs_hf=args.vs_hf, overrides=args.set,
                    vs_model=args.vs_model, vs_overrides=args.vs_set,
                    vs_compile=None if args.vs_compile is None else args.vs_compile == "yes", device=args.device, quiet=args.json)
    emit(r, args.json, _fmt_train(r))
    return 0


def _fmt_generate(r: dict[str, Any]) -> list[str]:
    lines = [f"device: {r['device_name']} ({r['device']}), torch {r['torch_version']}, dtype {r['dtype']}, "
             f"threads {r['num_threads']}, load {r['loadavg']}",
             f"model {r['model']} ({r['weights']}{', ' + r['quantize'] if r.get('quantize') else ''}): "
             f"{r['n_params'] / 1e6:.2f}M params, batch {r['batch']}, "
             f"prompt {r['prompt_tokens']} + {r['new_tokens']} new tokens",
             f"gptlab (KV cache): {r['tokens_per_s']:,.1f} tokens/s ({r['ms_per_token']:.2f} ms/token)"
             + (f", {100 * r['memory_bandwidth_utilization']:.1f}% of HBM bandwidth"
                if r.get("memory_bandwidth_utilization") is not None else "")]
    if "hf_tokens_per_s" in r:
        lines.append(f"transformers generate: {r['hf_tokens_per_s']:,.1f} tokens/s -> "
                     f"{r['speedup_vs_hf']:.2f}x (greedy tokens equal: {100 * r['greedy_agreement_vs_hf']:.0f}%)")
    if "no_cache_tokens_per_s" in r:
        lines.append(f"no-cache loop: {r['no_cache_tokens_per_s']:,.1f} tokens/s -> {r['speedup_vs_no_cache']:.2f}x")
    return lines


def run_generate(args: argparse.Namespace) -> int:
    """``gptlab bench generate``."""
    _set_threads(getattr(args, "threads", 0))
    from gptlab.bench import bench_generate

    r = bench_generate(args.model, batch=args.batch, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                       rounds=getattr(args, "rounds", 3), dtype=args.dtype, compile=args.compile,
                       quantize=getattr(args, "quantize", None),
                       vs_hf=args.vs_hf, no_cache_baseline=args.no_cache_baseline,
                       overrides=getattr(args, "set", None), device=args.device, quiet=args.json)
    emit(r, args.json, _fmt_generate(r))
    return 0


def run_serve(args: argparse.Namespace) -> int:
    """``gptlab bench serve``."""
    from gptlab.bench import bench_serve

    r = bench_serve(args.model, clients=args.clients, requests=args.requests, prompt_tokens=args.prompt_tokens,
                    max_tokens=args.max_tokens, url=args.url, api_key=args.api_key, vs_hf=args.vs_hf,
                    one_client_requests=args.one_client_requests, ramp_up_s=args.ramp_up, dtype=args.dtype,
                    device=args.device, max_batch=args.max_batch, compile=args.compile, quantize=args.quantize,
                    seed=args.seed, quiet=args.json)

    def ms(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.0f} ms"

    lines = [f"device: {r['device_name']} ({r['device']}), torch {r['torch_version']}, dtype {r['dtype']}, "
             f"load {r['loadavg']}",
             f"{r['clients']} clients x {r['requests']} requests, prompt {r['prompt_tokens']} + {r['max_tokens']} "
             f"new tokens: {r['output_tokens_per_s']:,.1f} output tokens/s "
             f"({r['speedup_vs_one_client']:.2f}x one client alone: {r['one_client_tokens_per_s']:,.1f} tokens/s)",
             f"TTFT p50 {ms(r['ttft_p50_ms'])}, p99 {ms(r['ttft_p99_ms'])} (unloaded {ms(r['ttft_unloaded_ms'])}); "
             f"ITL p50 {ms(r['itl_p50_ms'])}, p99 {ms(r['itl_p99_ms'])}"]
    if r["hf_tokens_per_s"] is not None:
        lines.append(f"transformers generate, one request after another: {r['hf_tokens_per_s']:,.1f} tokens/s -> "
                     f"{r['speedup_vs_hf']:.2f}x")
    emit(r, args.json, lines)
    return 0


def _fmt_env(r: dict[str, Any]) -> str:
    return (f"device: {r['device_name']} ({r['device']}), torch {r['torch_version']}, threads {r['num_threads']}, "
            f"load {r['loadavg']}")


def run_prepare(args: argparse.Namespace) -> int:
    """``gptlab bench prepare``."""
    from gptlab.bench import bench_prepare

    r = bench_prepare(input=args.input, mb=args.mb, max_workers=args.max_workers,
                      rounds=getattr(args, "rounds", 2), quiet=args.json)
    lines = [_fmt_env(r), f"{r['source']}: {r['documents']:,} documents, {r['chars']:,} chars -> {r['tokens']:,} "
                          f"GPT-2 tokens"]
    lines += [f"{row['workers']:>3} workers: {row['tokens_per_s'] / 1e6:.2f}M tokens/s ({row['speedup']:.2f}x)"
              for row in r["per_workers"]]
    emit(r, args.json, lines)
    return 0


def run_loader(args: argparse.Namespace) -> int:
    """``gptlab bench loader``."""
    _set_threads(getattr(args, "threads", 0))
    from gptlab.bench import bench_loader

    r = bench_loader(data=args.data, batch=args.batch, seq=args.seq, batches=args.batches, shuffle=args.shuffle,
                     device=args.device, quiet=args.json)
    emit(r, args.json, [_fmt_env(r), f"{r['source']}: batch {r['batch']} x seq {r['seq']}"
                                      f"{' (shuffled)' if r['shuffle'] else ''}: {r['batches_per_s']:,.1f} batches/s, "
                                      f"{r['tokens_per_s'] / 1e6:,.1f}M tokens/s ({r['headroom_vs_gpu_step']:.0f}x "
                                      f"the {r['gpu_step_target_tokens_per_s']:,} tokens/s H100 step target)"])
    return 0
