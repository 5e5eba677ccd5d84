"""Throughput benchmarks: training step, decoding, tokenization and the token loader.

Every number here is measured in one process. Comparisons against ``transformers`` alternate
A/B/A/B rounds so that a noisy, shared machine slows both sides alike, and report medians.

Every timing goes through :func:`gptlab.timing.alternate`; FLOPs per token and GPU peaks come from
:mod:`gptlab.metrics`, so a benchmark reports the same MFU the trainer does.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from gptlab.config import ModelConfig, MODEL_PRESETS, ConfigError, closest, parse_overrides
from gptlab.errors import GptlabError
from gptlab.kernels import apply_cpu_kernels, training_probe
from gptlab.metrics import FLOPS_FORMULA, flops_per_token, mfu, peak_bandwidth, peak_flops
from gptlab.model import GPT
from gptlab.runtime import autocast, compile_for_training, cpu_model, git_sha, resolve_device, resolve_dtype
from gptlab.timing import alternate, split_calls

# --------------------------------------------------------------------------- environment


def device_name(device: torch.device) -> str:
    """Human name of the device: the GPU name, or the CPU model."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def environment(device: torch.device) -> dict[str, Any]:
    """What a benchmark number depends on: device, library versions, threads, load, commit."""
    env: dict[str, Any] = {
        "device": str(device),
        "device_name": device_name(device),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "num_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "commit": git_sha(short=True),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        env["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        env["loadavg"] = None
    try:
        import transformers

        env["transformers_version"] = transformers.__version__
    except ImportError:
        env["transformers_version"] = None
    return env


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory per contender, as an ``around`` hook of :func:`alternate`: on CUDA the allocator's
    peak over the contender's warm-up and rounds; on CPU the process high-water mark when the contender
    first finished (a later contender's figure includes what earlier ones still hold)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.mb: dict[str, float] = {}
        self.kind = "cuda_max_memory_allocated" if device.type == "cuda" else "cpu_max_rss"

    def __call__(self, name: str, when: str) -> None:
        if self.device.type != "cuda":
            if when == "end":
                self.mb.setdefault(name, _max_rss_mb())
        elif when == "start":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.mb[name] = max(self.mb.get(name, 0.0), torch.cuda.max_memory_allocated(self.device) / 2**20)


def gpu_peak_flops(device: torch.device) -> float | None:
    return peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def _max_rss_mb() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def _say(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- models


def resolve_model_config(name: str, overrides: list[str] | dict[str, Any] | None = None) -> ModelConfig:
    """A model preset (gpt2, tiny, ...) or a training recipe / TOML file (its ``[model]`` section),
    then ``key=value`` overrides. A recipe's ``vocab_size = 0`` ("from the dataset") is read from the
    dataset: its prepared manifest, else the vocabulary its tokenizer fixes in advance."""
    sets = overrides if isinstance(overrides, dict) else _parse_sets(overrides or [])
    if name in MODEL_PRESETS:
        return ModelConfig.from_preset(name, **sets)
    from gptlab.config import from_dict, load_recipe

    try:
        recipe = load_recipe(name)
    except ConfigError:
        raise GptlabError(f"--model {name!r}: not a model preset{closest(name, MODEL_PRESETS)} "
                          f"({', '.join(MODEL_PRESETS)}) nor a recipe (gptlab train --config names) "
                          f"or .toml file") from None
    section = dict(recipe.get("model", {}))
    if not section.get("vocab_size") and not sets.get("vocab_size"):
        section["vocab_size"] = _dataset_vocab_size(recipe.get("data", {}), name)
    return from_dict(ModelConfig, {**section, **sets}, "model")


def _dataset_vocab_size(data: dict[str, Any], recipe: str) -> int:
    from gptlab.data.shards import read_manifest
    from gptlab.data.sources import DATASETS, default_data_dir
    from gptlab.tokenizer import GPT2_VOCAB_SIZE

    dataset = str(data.get("dataset", "fineweb_edu_10b"))
    where = Path(data["dir"]).expanduser() if data.get("dir") else (
        default_data_dir(dataset) if dataset in DATASETS else None)
    if where is not None and (where / "manifest.json").is_file():
        return int(read_manifest(where)["vocab_size"])
    info = DATASETS.get(dataset)
    tokenizer = data.get("tokenizer") or (info.tokenizer if info else "")
    if tokenizer == "gpt2":
        return GPT2_VOCAB_SIZE
    if info is not None and info.vocab_size and not data.get("tokenizer"):
        return info.vocab_size
    raise GptlabError(f"--model {recipe}: the recipe takes its vocabulary from dataset {dataset!r}, which is not "
                      f"prepared yet; run `gptlab prepare {dataset}` or pass --set vocab_size=N")


def _parse_sets(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in parse_overrides(items).items():
        key = key[len("model."):] if key.startswith("model.") else key
        if isinstance(value, dict):
            raise ConfigError(f"--set {key}: expected KEY=VALUE with a model key such as n_layer=4")
        out[key] = value
    return out


def hf_twin(model: GPT) -> tuple[torch.nn.Module, str]:
    """A transformers model computing the same function as ``model`` (:func:`gptlab.hf.to_hf_model`:
    GPT-2, Llama or Qwen3), and its architecture name.

    A bias-free GPT-2 (nanoGPT's ``bias=False`` recipes) becomes GPT2LMHeadModel with zero biases:
    the same function at step 0, but HF then trains those biases, so losses drift apart slowly.
    """
    from gptlab.hf import hf_architecture, to_hf_model

    try:
        arch = hf_architecture(model.config)
    except GptlabError as e:
        raise GptlabError(f"--vs-hf: {e}") from None
    hf = to_hf_model(model)
    if arch == "gpt2" and not model.config.bias:
        arch = "gpt2-zero-bias"
    return hf, arch


def _make_optimizer(model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    # The GPT-2 recipe's AdamW, fused (one pass per tensor list) on CUDA and CPU as the trainer runs it;
    # both contenders of --vs-hf get this same optimizer.
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95), eps=1e-8, fused=True)


# --------------------------------------------------------------------------- bench train


def bench_train(model: str = "gpt2", *, batch: int = 8, seq: int | None = None, steps: int = 10, warmup: int = 3,
                rounds: int = 5, dtype: str = "auto", compile: bool = False, compile_hf: bool = False,
                vs_hf: bool = False, overrides: list[str] | dict[str, Any] | None = None, device: str = "auto", seed: int = 0,
                vs_model: str | None = None, vs_overrides: list[str] | dict[str, Any] | None = None,
                vs_compile: bool | None = None, quiet: bool = False) -> dict[str, Any]:
    """Time optimizer steps (forward + backward + AdamW) of a gptlab model, optionally against
    transformers' GPT2LMHeadModel with the same weights, shapes, dtype and optimizer, and/or against
    another gptlab model (``vs_model``, e.g. the modern architecture) at the same batch and sequence.

    ``steps`` timed steps per model are split over ``rounds`` alternating rounds (A then B each round).
    ``compile`` compiles the gptlab model(s) as the trainer does, ``compile_hf`` transformers' one,
    ``vs_compile`` (None: as ``compile``) the ``vs_model``.
    """
    if batch < 1 or steps < 1 or warmup < 0 or rounds < 1:
        raise GptlabError("bench train: --batch and --steps must be >= 1, --warmup >= 0")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    cfg = resolve_model_config(model, overrides)
    T = seq or cfg.block_size
    if T > cfg.block_size:
        raise GptlabError(f"--seq {T} exceeds the model's context (block_size={cfg.block_size}); "
                          f"lower --seq or pass --set block_size={T}")
    vs_cfg = None
    if vs_model is not None:
        vs_sets = vs_overrides if isinstance(vs_overrides, dict) else _parse_sets(vs_overrides or [])
        vs_cfg = resolve_model_config(vs_model, {"vocab_size": cfg.vocab_size, **vs_sets})
        if T > vs_cfg.block_size:
            raise GptlabError(f"--seq {T} exceeds --vs-model {vs_model}'s context (block_size={vs_cfg.block_size})")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.device(dev):
        net = GPT(cfg)
    net.init_weights(torch.Generator(device=dev).manual_seed(seed) if dev.type == "cuda" else gen)
    # As `gptlab train` runs it (the transformers twin stays stock).
    apply_cpu_kernels(net, *(() if compile else training_probe(net, batch, T)))
    x = torch.randint(0, cfg.vocab_size, (batch, T + 1), generator=gen).to(dev)
    x, y = x[:, :-1].contiguous(), x[:, 1:].contiguous()

    steps_of: dict[str, Callable[[], torch.Tensor]] = {}
    losses: dict[str, list[torch.Tensor]] = {}

    def add(name: str, module: torch.nn.Module, step_loss: Callable[[torch.nn.Module], torch.Tensor],
            compiled: bool) -> None:
        opt = _make_optimizer(module, dev)
        fn = module
        if compiled:  # gptlab's model as the trainer compiles it; transformers' as a whole
            fn = compile_for_training(module, dev) if isinstance(module, GPT) else torch.compile(module)
        losses[name] = []

        def step() -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            with autocast(dev, dt):
                loss = step_loss(fn)
            loss.backward()
            opt.step()
            losses[name].append(loss.detach())
            return loss

        steps_of[name] = step

    if vs_hf:
        hf, hf_arch = hf_twin(net)  # copied before any step: both start from the same weights
        hf.train()
        # The same targets and loss for both: HF's own ``labels=`` path would score T-1 shifted positions.
        add("gptlab", net.train(), lambda m: m(x, y)[1], compile)
        add("hf", hf, lambda m: F.cross_entropy(m(input_ids=x).logits.float().view(-1, cfg.vocab_size),
                                                  y.view(-1)), compile_hf)
    else:
        add("gptlab", net.train(), lambda m: m(x, y)[1], compile)
    if vs_cfg is not None:
        with torch.device(dev):
            vs_net = GPT(vs_cfg)
        vs_net.init_weights(torch.Generator(device=dev).manual_seed(seed + 1))
        vs_compiled = compile if vs_compile is None else vs_compile
        apply_cpu_kernels(vs_net, *(() if vs_compiled else training_probe(vs_net, batch, T)))
        add("vs", vs_net.train(), lambda m: m(x, y)[1], compile if vs_compile is None else vs_compile)

    peak = PeakMemory(dev)
    # Warm-up (allocator, compile, optimizer state), then the timed steps split over alternating rounds.
    t = alternate(steps_of, warmup=warmup, calls=split_calls(steps, rounds), sync=lambda: _sync(dev),
                  around=peak, on_round=lambda r, t: _say(f"bench train: round {r + 1}/{rounds}: " + ", ".join(
                      f"{k} {1e3 * t.median(k):.1f} ms/step" for k in steps_of), quiet))

    tokens_per_step = batch * T
    fpt = flops_per_token(cfg, T, net.num_params())
    peak_tf = gpu_peak_flops(dev)
    out: dict[str, Any] = {
        "bench": "train", "model": model, "overrides": _parse_sets(overrides) if isinstance(overrides, list)
        else (overrides or {}), "config": json.loads(cfg.to_json()), "batch": batch, "seq": T, "steps": steps,
        "warmup": warmup, "rounds": rounds, "dtype": str(dt).replace("torch.", ""), "compile": compile,
        "n_params": net.num_params(), "n_params_non_embedding": net.num_params(non_embedding=True),
        "flops_per_token": fpt, "flops_formula": FLOPS_FORMULA, "tokens_per_step": tokens_per_step,
        "optimizer": "AdamW(fused)", **environment(dev),
    }
    s = t.summary("gptlab")
    out.update(ms_per_step=s["median_ms"], ms_per_step_mean=s["mean_ms"], ms_per_step_min=s["min_ms"],
               tokens_per_s=tokens_per_step / (s["median_ms"] / 1e3), warmup_s=t.warmup_s["gptlab"])
    out["mfu"] = mfu(out["tokens_per_s"], fpt, peak_tf)
    out["peak_tflops"] = peak_tf / 1e12 if peak_tf else None
    out["peak_memory_mb"] = peak.mb["gptlab"]
    out["peak_memory_kind"] = peak.kind
    out["loss_first"] = losses["gptlab"][0].item()
    out["loss_last"] = losses["gptlab"][-1].item()
    if vs_hf:
        hs = t.summary("hf")
        out.update(hf_ms_per_step=hs["median_ms"], hf_ms_per_step_mean=hs["mean_ms"],
                   hf_tokens_per_s=tokens_per_step / (hs["median_ms"] / 1e3), hf_warmup_s=t.warmup_s["hf"],
                   hf_peak_memory_mb=peak.mb["hf"], hf_loss_first=losses["hf"][0].item(),
                   hf_loss_last=losses["hf"][-1].item(), hf_architecture=hf_arch,
                   hf_attn_implementation=getattr(hf.config, "_attn_implementation", None),
                   hf_compile=compile_hf)
        out["hf_mfu"] = mfu(out["hf_tokens_per_s"], fpt, peak_tf)
        out["speedup_vs_hf"] = out["tokens_per_s"] / out["hf_tokens_per_s"]
    if vs_cfg is not None:
        vs = t.summary("vs")
        out.update(vs_model=vs_model, vs_compile=vs_compiled, vs_config=json.loads(vs_cfg.to_json()), vs_ms_per_step=vs["median_ms"],
                   vs_ms_per_step_mean=vs["mean_ms"], vs_tokens_per_s=tokens_per_step / (vs["median_ms"] / 1e3),
                   vs_n_params=vs_net.num_params(), vs_peak_memory_mb=peak.mb["vs"],
                   vs_loss_first=losses["vs"][0].item(), vs_loss_last=losses["vs"][-1].item(),
                   vs_step_ratio=vs["median_ms"] / s["median_ms"])
    return out


# --------------------------------------------------------------------------- bench generate


def _load_for_generate(model: str, overrides: Any, dev: torch.device, dt: torch.dtype, seed: int
                       ) -> tuple[GPT, str]:
    """A random-init preset/recipe, or trained weights through gptlab.loading (Hub name, HF dir, run dir)."""
    if not Path(model).exists():
        cfg = resolve_model_config(model, overrides)
        with torch.device(dev):
            net = GPT(cfg)
        net.init_weights(torch.Generator(device=dev).manual_seed(seed))
        return net.to(dt), "random-init"
    if overrides:
        raise GptlabError("--set applies to presets only, not to a trained model source")
    from gptlab.loading import load_model

    net, _tok = load_model(model, device=str(dev), dtype=dt)
    return net.to(dt), "weights"


def decode_bytes_per_step(net: GPT, batch: int, context: float) -> float:
    """Bytes one decode step reads from memory: every linear layer's weights once (int8 ones with their
    scales; a tied lm_head is the embedding table), norms, plus the K and V cache of ``context`` positions
    for every layer. Embedding lookups read one row each, ignored."""
    cfg = net.config
    seen: set[int] = set()
    weights = 0
    for module in net.modules():
        if isinstance(module, torch.nn.Embedding):
            continue
        for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            if id(t) in seen or t.dim() == 0 or not t.is_floating_point() and t.dtype != torch.int8:
                continue
            if module is net:  # rope tables: one row per step
                continue
            seen.add(id(t))
            weights += t.numel() * t.element_size()
    elt = net.transformer.wte.weight.element_size()  # the cache has the embeddings' dtype
    kv = 2 * cfg.n_layer * batch * cfg.kv_heads * cfg.head_dim * context * elt
    return weights + kv


def bench_generate(model: str = "gpt2", *, batch: int = 1, prompt_tokens: int = 16, new_tokens: int = 128,
                   rounds: int = 3, dtype: str = "auto", compile: bool = False, quantize: str | None = None,
                   vs_hf: bool = False, no_cache_baseline: bool = False,
                   overrides: list[str] | dict[str, Any] | None = None,
                   device: str = "auto", seed: int = 0, quiet: bool = False) -> dict[str, Any]:
    """Greedy decoding throughput of :class:`gptlab.engine.Engine` (KV cache, ``batch`` requests at once),
    optionally against transformers' ``generate`` on the same (unquantized) weights and against the
    engine's no-cache recomputation.

    Each round runs one full generation (prefill + ``new_tokens`` steps) per contender, in turn.
    """
    from gptlab.engine import Engine, SamplingParams

    if batch < 1 or prompt_tokens < 1 or new_tokens < 1 or rounds < 1:
        raise GptlabError("bench generate: --batch, --prompt-tokens, --new-tokens and --rounds must be >= 1")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    torch.manual_seed(seed)
    net, weights = _load_for_generate(model, overrides, dev, dt, seed)
    apply_cpu_kernels(net)
    net.eval()
    cfg = net.config
    if prompt_tokens + new_tokens > cfg.block_size:
        raise GptlabError(f"--prompt-tokens {prompt_tokens} + --new-tokens {new_tokens} exceed the context "
                          f"(block_size={cfg.block_size})")
    idx = torch.randint(0, cfg.vocab_size, (batch, prompt_tokens), generator=torch.Generator().manual_seed(seed))
    idx = idx.to(dev)
    N = new_tokens
    out_extra: dict[str, Any] = {}
    if vs_hf:  # the twin copies the weights before any quantization: transformers runs the original model
        hf, hf_arch = hf_twin(net)
        hf.eval()
        out_extra["hf_architecture"] = hf_arch
        mask = torch.ones_like(idx)
    n_params = net.num_params()  # before quantization: int8 weights are buffers, not parameters
    gnet = net
    if quantize:
        import copy

        from gptlab.quantize import quantize_model

        gnet = quantize_model(copy.deepcopy(net) if no_cache_baseline else net, quantize)
    engine = Engine(gnet, None, max_batch=batch, max_queue=batch, compile=compile)
    ref_engine = Engine(net, None, max_batch=batch, max_queue=batch, use_kv_cache=False) if no_cache_baseline else None
    prompts = idx.tolist()

    def run_engine(e: Engine, n: int) -> torch.Tensor:
        out = e.generate(prompts, SamplingParams(max_tokens=n, temperature=0.0, ignore_eot=True))
        return torch.cat([idx, torch.tensor([c.token_ids for c in out], device=dev)], dim=1)

    def contenders(n: int) -> dict[str, Callable[[], torch.Tensor]]:
        runs: dict[str, Callable[[], torch.Tensor]] = {"gptlab": lambda: run_engine(engine, n)}
        if vs_hf:
            runs["hf"] = lambda: hf.generate(input_ids=idx, attention_mask=mask, do_sample=False,
                                             min_new_tokens=n, max_new_tokens=n)
        if no_cache_baseline:
            runs["no_cache"] = lambda: run_engine(ref_engine, n)
        return runs

    runners = contenders(N)
    # Prefill + a few steps: allocator, lazy init. A compiled step is specialised to the cache length,
    # so its warm-up runs the full length: the timed rounds then replay what was compiled.
    warmups = contenders(min(N, 8))
    if compile:
        warmups["gptlab"] = runners["gptlab"]

    peak = PeakMemory(dev)
    _say(f"bench generate: warm-up (prefill + {min(N, 8) if not compile else N} tokens"
         f"{', compile' if compile else ''}) of {', '.join(runners)}", quiet)
    with torch.inference_mode():
        t = alternate(runners, warmup=1, warmup_fns=warmups, rounds=rounds, sync=lambda: _sync(dev), around=peak,
                      on_round=lambda r, t: _say(f"bench generate: round {r + 1}/{rounds}: " + ", ".join(
                          f"{k} {batch * N / t.median(k):,.1f} tokens/s" for k in runners), quiet))
    outputs = t.last

    out: dict[str, Any] = {
        "bench": "generate", "model": model, "weights": weights, "config": json.loads(cfg.to_json()),
        "batch": batch, "prompt_tokens": prompt_tokens, "new_tokens": N, "rounds": rounds,
        "dtype": str(dt).replace("torch.", ""), "compile": compile, "quantize": quantize,
        "n_params": n_params,
        "timing": "one Engine.generate() call: prefill of the prompts plus new_tokens decode steps, median over rounds",
        **out_extra, **environment(dev),
    }
    med = {k: t.median(k) for k in runners}
    out["seconds"] = med["gptlab"]
    out["tokens_per_s"] = batch * N / med["gptlab"]
    out["ms_per_token"] = 1e3 * med["gptlab"] / N
    out["peak_memory_mb"] = peak.mb["gptlab"]
    out["peak_memory_kind"] = peak.kind
    peak_bw = peak_bandwidth(torch.cuda.get_device_name(dev)) / 1e9 if dev.type == "cuda" else None
    bytes_step = decode_bytes_per_step(gnet, batch, prompt_tokens + N / 2)
    out["bytes_per_decode_step"] = bytes_step
    out["memory_bandwidth_gbps"] = bytes_step * (N / med["gptlab"]) / 1e9
    out["peak_memory_bandwidth_gbps"] = peak_bw
    out["memory_bandwidth_utilization"] = (out["memory_bandwidth_gbps"] / peak_bw) if peak_bw else None

    def agreement(other: str) -> float:
        a, b = outputs["gptlab"][:, prompt_tokens:], outputs[other][:, prompt_tokens:]
        if a.shape != b.shape:
            return 0.0
        return (a == b).float().mean().item()

    if vs_hf:
        out["hf_seconds"] = med["hf"]
        out["hf_tokens_per_s"] = batch * N / med["hf"]
        out["speedup_vs_hf"] = out["tokens_per_s"] / out["hf_tokens_per_s"]
        out["hf_peak_memory_mb"] = peak.mb["hf"]
        out["greedy_agreement_vs_hf"] = agreement("hf")
    if no_cache_baseline:
        out["no_cache_seconds"] = med["no_cache"]
        out["no_cache_tokens_per_s"] = batch * N / med["no_cache"]
        out["speedup_vs_no_cache"] = out["tokens_per_s"] / out["no_cache_tokens_per_s"]
        out["greedy_agreement_vs_no_cache"] = agreement("no_cache")
    return out


# --------------------------------------------------------------------------- bench prepare / loader

# A GPU step of GPT-2 124M at the H100 target consumes this many tokens/s; the loader should do 20x.
H100_TARGET_TOKENS_PER_S = 600_000


def synthetic_corpus(mb: float, seed: int = 0, doc_chars: int = 4000) -> list[str]:
    """About ``mb`` megabytes of English-like text as documents of about ``doc_chars`` characters:
    seeded random sentences over a few hundred words (BPE sees real words, spaces and punctuation)."""
    import random

    rng = random.Random(seed)
    stems = ("time year people way day man thing woman life child world school state family student group "
             "country problem hand part place case week company system program question work government number "
             "night point home water room mother area money story fact month lot right study book eye job word "
             "business issue side kind head house service friend father power hour game line end member law car "
             "city community name president team minute idea kid body information back parent face others level "
             "office door health person art war history party result change morning reason research girl guy "
             "moment air teacher force education").split()
    words = stems + [w + suffix for w in stems for suffix in ("s", "ed", "ing", "ly")] + \
        "the of and to a in is it you that he was for on are with as I his they be at one have this".split()
    punct = [".", ".", ".", ",", "?", "!", ";"]
    target = int(mb * 1e6)
    docs, size = [], 0
    while size < target:
        parts, n = [], 0
        while n < doc_chars:
            k = rng.randint(5, 18)
            sent = " ".join(rng.choice(words) for _ in range(k))
            sent = sent[0].upper() + sent[1:] + rng.choice(punct) + (" %d" % rng.randint(0, 2025) if k % 5 == 0 else "")
            parts.append(sent)
            n += len(sent) + 1
        doc = " ".join(parts)
        docs.append(doc)
        size += len(doc)
    return docs


def split_documents(text: str, doc_chars: int = 4000) -> list[str]:
    """Cut ``text`` at line ends into documents of about ``doc_chars`` characters (joined, they are ``text``),
    so a single big file spreads over workers as a many-document corpus does in prepare."""
    docs, cur, n = [], [], 0
    for line in text.splitlines(keepends=True):
        cur.append(line)
        n += len(line)
        if n >= doc_chars:
            docs.append("".join(cur))
            cur, n = [], 0
    if cur:
        docs.append("".join(cur))
    return docs


def bench_prepare(*, input: str | None = None, mb: float = 20.0, max_workers: int = 0, rounds: int = 2,
                  seed: int = 0, quiet: bool = False) -> dict[str, Any]:
    """GPT-2 tokenization throughput of prepare's parallel path (``tokenize_documents``) for
    1..``max_workers`` workers, alternating worker counts within each round; medians."""
    from gptlab.data.prepare import default_workers, tokenize_documents
    from gptlab.tokenizer import GPT2Tokenizer

    if mb <= 0 or rounds < 1 or max_workers < 0:
        raise GptlabError("bench prepare: --mb must be > 0, --rounds >= 1, --max-workers >= 0")
    if input:
        path = Path(input)
        if not path.is_file():
            raise GptlabError(f"--input {input}: no such file (give a UTF-8 text file)")
        text = path.read_text(encoding="utf-8", errors="replace")
        docs = split_documents(text)
        source = str(path)
    else:
        docs = synthetic_corpus(mb, seed)
        source = f"synthetic ({mb:g} MB, seed {seed})"
    chars = sum(len(d) for d in docs)
    n_max = max_workers or default_workers()
    tok = GPT2Tokenizer()
    list(tokenize_documents(docs[:50], tok, workers=1))  # load the BPE ranks outside the timers
    runs = {w: (lambda w=w: sum(len(t) for t in tokenize_documents(docs, tok, workers=w)))
            for w in range(1, n_max + 1)}
    t = alternate(runs, warmup=0, rounds=rounds, on_round=lambda r, t: _say(
        f"bench prepare: round {r + 1}/{rounds}: " + ", ".join(
            f"{w} workers {t.last[w] / t.median(w) / 1e6:.2f}M tokens/s" for w in runs), quiet))
    counts = t.last
    if len(set(counts.values())) != 1:  # pragma: no cover - a bug in prepare's parallel path
        raise GptlabError(f"bench prepare: token counts differ between worker counts: {counts}")
    tokens = counts[1]
    per = [{"workers": w, "seconds": t.median(w), "tokens_per_s": tokens / t.median(w)} for w in runs]
    base = per[0]["tokens_per_s"]
    for row in per:
        row["speedup"] = row["tokens_per_s"] / base
    best = max(per, key=lambda row: row["tokens_per_s"])
    return {"bench": "prepare", "source": source, "documents": len(docs), "chars": chars, "tokens": tokens,
            "tokenizer": "gpt2", "rounds": rounds, "max_workers": n_max, "per_workers": per,
            "tokens_per_s": best["tokens_per_s"], "best_workers": best["workers"],
            "scaling": per[-1]["tokens_per_s"] / base, "chars_per_token": chars / max(tokens, 1),
            **environment(torch.device("cpu"))}


def bench_loader(*, data: str | None = None, batch: int = 64, seq: int = 1024, batches: int = 200,
                 shuffle: bool = False, device: str = "auto", seed: int = 0, quiet: bool = False) -> dict[str, Any]:
    """Batches/s and tokens/s of :class:`gptlab.data.loader.TokenLoader` (train split) on a prepared
    directory, or on a generated dataset of random GPT-2 tokens large enough for every batch."""
    from gptlab.data.loader import TokenLoader
    from gptlab.data.shards import write_synthetic_dataset

    if batch < 1 or seq < 1 or batches < 1:
        raise GptlabError("bench loader: --batch, --seq and --batches must be >= 1")
    dev = resolve_device(device)
    with contextlib.ExitStack() as stack:
        if data:
            data_dir, source = data, data
        else:
            data_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="gptlab-bench-loader-"))
            tokens = (batches + 10) * batch * (seq + 1)
            write_synthetic_dataset(data_dir, train_tokens=tokens, shard_tokens=max(tokens // 4, seq + 1), seed=seed)
            source = f"synthetic ({tokens:,} random GPT-2 tokens in 4 shards)"
        loader = TokenLoader(data_dir, "train", batch, seq, shuffle=shuffle, seed=seed, device=dev)
        # Warm-up pages in the first shard and the pin-memory pools.
        t = alternate({"loader": loader.next_batch}, warmup=min(5, batches), calls=batches, sync=lambda: _sync(dev))
    total = sum(t.seconds["loader"])
    tokens_per_batch = batch * seq
    s = t.summary("loader")
    tps = tokens_per_batch * batches / total
    out = {"bench": "loader", "source": source, "batch": batch, "seq": seq, "batches": batches, "shuffle": shuffle,
           "seconds": total, "batches_per_s": batches / total, "tokens_per_s": tps,
           "ms_per_batch": s["median_ms"], "ms_per_batch_max": s["max_ms"],
           "gpu_step_target_tokens_per_s": H100_TARGET_TOKENS_PER_S,
           "headroom_vs_gpu_step": tps / H100_TARGET_TOKENS_PER_S, **environment(dev)}
    _say(f"bench loader: {out['batches_per_s']:,.1f} batches/s", quiet)
    return out


# --------------------------------------------------------------------------- bench serve


class _ServeProcess:
    """``gptlab serve`` in a subprocess on a free local port (what ``bench serve`` measures when no --url)."""

    def __init__(self, init: str, extra: list[str], log_dir: Path, timeout_s: float = 900.0) -> None:
        self.log_path = log_dir / "serve.log"
        self._log = open(self.log_path, "w")
        cmd = [sys.executable, "-m", "gptlab", "serve", "--init", init, "--port", "0", *extra]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        import re

        import httpx

        t0 = time.time()
        self.url = None
        while time.time() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise GptlabError(f"bench serve: the server exited with {self.proc.returncode}: {self._tail()}")
            if self.url is None:
                m = re.search(r"listening on (http://[\d.]+:\d+)", self.log_path.read_text(errors="replace"))
                self.url = m.group(1) if m else None
            elif httpx.get(self.url + "/health", timeout=10).status_code == 200:
                return
            time.sleep(0.2)
        self.stop()
        raise GptlabError(f"bench serve: the server was not ready within {timeout_s:.0f}s: {self._tail()}")

    def _tail(self) -> str:
        lines = self.log_path.read_text(errors="replace").strip().splitlines()
        return " | ".join(lines[-3:]) if lines else "(no output)"

    def stop(self) -> None:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def _save_random_run(net: GPT, run_dir: Path) -> None:
    """A run dir holding ``net`` (random-init preset), with a tokenizer that covers its vocabulary."""
    from gptlab.checkpoint import save_checkpoint
    from gptlab.config import to_dict
    from gptlab.tokenizer import GPT2_VOCAB_SIZE, CharTokenizer, GPT2Tokenizer

    V = net.config.vocab_size
    tok = GPT2Tokenizer() if V == GPT2_VOCAB_SIZE else CharTokenizer([chr(0x100 + i) for i in range(V)])
    save_checkpoint(run_dir, 0, model_state=net.state_dict(), tied=net.config.tie_embeddings, optimizer_state=None,
                    rng_states=[], meta={"model_config": to_dict(net.config), "tokenizer": tok.spec()})


async def _load_test(url: str, headers: dict[str, str], model: str, prompts: list[list[int]], max_tokens: int,
                     clients: int, ramp_up_s: float = 0.0) -> tuple[float, list[dict[str, Any]]]:
    """Send every prompt (streamed, greedy, exactly ``max_tokens`` new tokens) from ``clients`` concurrent
    clients, client i starting ``i * ramp_up_s / clients`` seconds late; returns the wall time and, per
    request, its start and the arrival time of each token."""
    import asyncio

    import httpx

    todo = list(enumerate(prompts))
    results: list[dict[str, Any]] = [{} for _ in prompts]

    async def client_loop(client: httpx.AsyncClient, delay: float) -> None:
        await asyncio.sleep(delay)
        while todo:
            i, ids = todo.pop(0)
            body = {"model": model, "prompt": ids, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                    "ignore_eos": True}
            t0 = time.perf_counter()
            times: list[float] = []
            async with client.stream("POST", url + "/v1/completions", json=body, headers=headers) as r:
                if r.status_code != 200:
                    raise GptlabError(f"bench serve: {url} answered {r.status_code}: {(await r.aread())[:300]!r}")
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        break
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        raise GptlabError(f"bench serve: generation failed: {chunk['error']['message']}")
                    if chunk.get("choices"):  # one chunk per generated token
                        times.append(time.perf_counter())
            results[i] = {"start": t0, "times": times}

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(client, i * ramp_up_s / clients) for i in range(clients)))
        wall = time.perf_counter() - t0
    return wall, results


def _latencies(results: list[dict[str, Any]]) -> tuple[list[float], list[float], int]:
    ttft = [r["times"][0] - r["start"] for r in results if r.get("times")]
    itl = [b - a for r in results for a, b in zip(r.get("times", []), r.get("times", [])[1:])]
    return ttft, itl, sum(len(r.get("times", [])) for r in results)


def _pct(values: list[float], q: float) -> float | None:
    import numpy as np

    return float(np.percentile(np.asarray(values), q)) * 1e3 if values else None


def bench_serve(model: str = "gpt2", *, clients: int = 16, requests: int = 32, prompt_tokens: int = 128,
                max_tokens: int = 128, url: str | None = None, api_key: str | None = None, vs_hf: bool = False,
                one_client_requests: int = 4, ramp_up_s: float = 0.0, dtype: str = "float32", device: str = "cpu",
                max_batch: int | None = None,
                compile: bool = False, quantize: str | None = None, seed: int = 0,
                quiet: bool = False) -> dict[str, Any]:
    """Load-test ``gptlab serve`` over HTTP, as vLLM's benchmark_serving does.

    Starts the server on a free local port over ``model`` (a preset is random-initialised and saved to a
    temporary run dir) or targets ``url``; sends ``requests`` random-token prompts of ``prompt_tokens`` from
    ``clients`` concurrent streaming clients, each greedy and exactly ``max_tokens`` long; then the first
    ``one_client_requests`` of them from one client alone; with ``vs_hf`` the same ones served one after
    another by transformers' ``generate`` on the same weights (after the server has stopped, so the two
    never share the CPU). Throughput counts output tokens over wall time. ``ramp_up_s`` staggers the
    clients' first requests (0: all at once, so every prefill of the first wave queues behind the others).
    """
    import asyncio

    import httpx

    if ramp_up_s < 0:
        raise GptlabError(f"--ramp-up {ramp_up_s}: must be >= 0 seconds")
    if min(clients, requests, prompt_tokens, max_tokens, one_client_requests) < 1:
        raise GptlabError("bench serve: --clients, --requests, --prompt-tokens, --max-tokens and "
                          "--one-client-requests must be >= 1")
    one_client_requests = min(one_client_requests, requests)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    out: dict[str, Any] = {"bench": "serve", "model": model, "clients": clients, "requests": requests,
                           "prompt_tokens": prompt_tokens, "max_tokens": max_tokens,
                           "one_client_requests": one_client_requests, "ramp_up_s": ramp_up_s,
                           "dtype": str(dt).replace("torch.", ""),
                           "compile": compile, "quantize": quantize, "url": url,
                           "timing": "streamed greedy requests over HTTP, ignore_eos: output tokens / wall time; "
                                     "TTFT = request sent -> first token chunk; ITL = gaps between token chunks",
                           **environment(dev)}
    net = None
    with contextlib.ExitStack() as stack:
        server = None
        if url is None or vs_hf:
            torch.manual_seed(seed)
            net, weights = _load_for_generate(model, None, torch.device("cpu"), torch.float32, seed)
            out["weights"] = weights
            out["n_params"] = net.num_params()
        if url is None:
            init = model
            if out.get("weights") == "random-init":
                tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gptlab-bench-serve-")))
                _save_random_run(net, tmp / "run")
                init = str(tmp / "run")
            extra = ["--device", str(dev), "--dtype", out["dtype"], "--max-batch", str(max_batch or clients),
                     "--max-queue", str(max(requests, 64)), "--name", "bench"]
            extra += ["--compile"] if compile else []
            extra += ["--quantize", quantize] if quantize else []
            _say(f"bench serve: starting gptlab serve over {model}", quiet)
            log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gptlab-bench-serve-log-")))
            server = _ServeProcess(init, extra, log_dir)
            stack.callback(server.stop)
            url = server.url
        info = httpx.get(url + "/v1/info", headers=headers, timeout=30)
        if info.status_code != 200:
            raise GptlabError(f"bench serve: {url}/v1/info answered {info.status_code}: {info.text[:200]}")
        info = info.json()
        name, vocab, ctx = info["model"], int(info["vocab_size"]), int(info["max_model_len"])
        if prompt_tokens + max_tokens > ctx:
            raise GptlabError(f"--prompt-tokens {prompt_tokens} + --max-tokens {max_tokens} exceed the model's "
                              f"context ({ctx})")
        gen = torch.Generator().manual_seed(seed)
        prompts = torch.randint(0, vocab, (requests, prompt_tokens), generator=gen).tolist()
        out["server"] = {k: info.get(k) for k in ("model", "device", "dtype", "max_batch", "max_model_len")}
        # Warm-up: allocator, first-call paths, and every batch size up to `clients` in the engine.
        asyncio.run(_load_test(url, headers, name, prompts[:clients], 4, clients))
        _say(f"bench serve: warm-up done; {clients} clients x {requests} requests", quiet)
        wall, res = asyncio.run(_load_test(url, headers, name, prompts, max_tokens, clients, ramp_up_s))
        ttft, itl, ntok = _latencies(res)
        out.update(seconds=wall, output_tokens=ntok, output_tokens_per_s=ntok / wall,
                   ttft_p50_ms=_pct(ttft, 50), ttft_p99_ms=_pct(ttft, 99), itl_p50_ms=_pct(itl, 50),
                   itl_p99_ms=_pct(itl, 99))
        _say(f"bench serve: {clients} clients: {out['output_tokens_per_s']:.1f} tokens/s", quiet)
        wall1, res1 = asyncio.run(_load_test(url, headers, name, prompts[:one_client_requests], max_tokens, 1))
        ttft1, itl1, ntok1 = _latencies(res1)
        out.update(one_client_seconds=wall1, one_client_tokens_per_s=ntok1 / wall1, ttft_unloaded_ms=_pct(ttft1, 50),
                   itl_unloaded_ms=_pct(itl1, 50))
        out["speedup_vs_one_client"] = out["output_tokens_per_s"] / out["one_client_tokens_per_s"]
        _say(f"bench serve: 1 client: {out['one_client_tokens_per_s']:.1f} tokens/s", quiet)
        if server is not None:
            server.stop()
    out["hf_tokens_per_s"] = out["speedup_vs_hf"] = None
    if vs_hf:
        hf, arch = hf_twin(net.to(dev, dt))
        hf.eval()
        out["hf_architecture"] = arch

        def hf_generate(ids: list[int], n: int) -> None:
            x = torch.tensor([ids], device=dev)
            hf.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False, min_new_tokens=n,
                        max_new_tokens=n, pad_token_id=0)

        with torch.inference_mode():
            hf_generate(prompts[0], 4)  # warm-up
            t0 = time.perf_counter()
            for ids in prompts[:one_client_requests]:
                hf_generate(ids, max_tokens)
                _sync(dev)
            hf_s = time.perf_counter() - t0
        out["hf_seconds"] = hf_s
        out["hf_tokens_per_s"] = one_client_requests * max_tokens / hf_s
        out["speedup_vs_hf"] = out["output_tokens_per_s"] / out["hf_tokens_per_s"]
        _say(f"bench serve: transformers one by one: {out['hf_tokens_per_s']:.1f} tokens/s", quiet)
    out["goals"] = {
        "speedup_vs_one_client>=8": out["speedup_vs_one_client"] >= 8,
        "speedup_vs_hf>=8": None if out["speedup_vs_hf"] is None else out["speedup_vs_hf"] >= 8,
        "ttft_p50<=3x_unloaded": (out["ttft_p50_ms"] <= 3 * out["ttft_unloaded_ms"]
                                  if out["ttft_p50_ms"] and out["ttft_unloaded_ms"] else None),
    }
    return out
