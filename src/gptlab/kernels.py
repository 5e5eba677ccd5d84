"""fp32 matrix products on CPU: oneDNN or ``F.linear`` (MKL), whichever is faster on this machine.

Why: PyTorch's CPU wheels send fp32 ``mm``/``linear`` to Intel MKL, which picks its AVX2 code path on
AMD processors even when they have AVX-512; oneDNN (also inside PyTorch) dispatches on the instruction
set itself. On AMD EPYC Zen 5 that was 2x the FLOP/s of the forward product; on Zen 4 it was no faster,
and a oneDNN call costs ~12 us more than MKL's before any arithmetic, which loses on small products.
No fixed rule holds on every CPU, so each product shape is timed once with both libraries, on first
use, like cuDNN's benchmark mode, and the faster one is kept (:func:`choose`). The choices are cached
per CPU model, torch version and thread count in ``$XDG_CACHE_HOME/gptlab/kernels.json`` (default
``~/.cache/gptlab``), so later runs reuse them. ``GPTLAB_ONEDNN=0`` keeps plain ``nn.Linear``;
``GPTLAB_ONEDNN=1`` sends every product to oneDNN without measuring.

A product timed alone is not the product inside a training step: there, oneDNN's calls sit between
other kernels that evict its caches and it pays its fixed cost 3x per layer. On Zen 4 the per-shape
choices (oneDNN for 10 of 15 products, each 5-20% faster alone) made the char model's step 9% slower
than plain ``F.linear``. So callers that run a whole step pass it as ``probe``: the step itself is timed
with the per-shape choices and with ``F.linear`` everywhere (alternating), and the layers are swapped
back when the choices do not win there (:func:`keep_if_faster`); the verdict is cached like the rest.

The model itself holds plain ``nn.Linear`` modules; :func:`apply_cpu_kernels` swaps them for
:class:`TunedLinear` (same parameters, names and state dict) from outside, for the commands that run on
CPU. ``TunedLinear`` falls back to ``F.linear`` wherever oneDNN would not be the plain fp32 CPU product:
other devices, bf16/fp16, autocast, and inside ``torch.compile``, where inductor picks its own kernels.
There is no public fp32 oneDNN matmul in PyTorch, so this uses the operator inductor itself lowers CPU
linears to (``torch.ops.mkldnn._linear_pointwise``), checked once.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptlab.runtime import cpu_model
from gptlab.timing import alternate

# Products with more rows are timed on their first MEASURE_ROWS rows: speed per row is flat by then,
# and timing the full 8192-row GPT-2 head twice would take seconds.
MEASURE_ROWS = 512
# Per candidate: about this much time per timed round, and at most this many rounds (alternating).
ROUND_S = 2e-3
MAX_ROUNDS = 5


def mode() -> str:
    """``off`` (GPTLAB_ONEDNN=0 or no usable oneDNN), ``onednn`` (GPTLAB_ONEDNN=1) or ``auto``."""
    env = os.environ.get("GPTLAB_ONEDNN", "auto").strip().lower()
    if env in ("0", "false", "no", "off") or not onednn_available():
        return "off"
    return "onednn" if env in ("1", "true", "yes", "on") else "auto"


@functools.cache
def onednn_available() -> bool:
    """Whether this torch build has the oneDNN linear operator and it computes ``F.linear``."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        x, w = torch.ones(2, 3), torch.ones(4, 3)
        return bool(torch.equal(_onednn_mm_t(x, w), F.linear(x, w)))
    except (AttributeError, RuntimeError):
        return False


def _onednn_mm_t(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b.T (+ bias)`` by oneDNN: ``a`` (..., K), ``b`` (N, K), strided views allowed; a new
    contiguous (..., N) tensor."""
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")


CANDIDATES: dict[str, Callable[..., torch.Tensor]] = {"onednn": _onednn_mm_t, "f.linear": F.linear}
FORCE: str | None = None  # a CANDIDATES name to use for every product (tests compare candidates with it)

# --------------------------------------------------------------------------- the choice and its cache

_choices: dict[tuple, str] = {}  # (kind, rows bucket, N, K, bias, threads) -> candidate name
_file_entries: dict[str, str] | None = None  # this machine's entries of the cache file, read once
_step_verdicts: dict[str, bool] = {}  # probe signature -> keep the per-shape choices (see keep_if_faster)


def cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gptlab" / "kernels.json"


@functools.cache
def machine_key() -> str:
    """What a measured choice depends on besides the shape: the CPU model and the torch version."""
    return f"{cpu_model()} | torch {torch.__version__}"


def _shape_str(key: tuple) -> str:
    kind, rows, n, k, bias, threads = key
    return f"{kind} rows<={rows} N={n} K={k} bias={int(bias)} threads={threads}"


def _saved_choices() -> dict[str, str]:
    """This machine's entries of the cache file, name -> choice (no cache yet, or unreadable: none, so
    everything is measured again)."""
    try:
        saved = json.loads(cache_path().read_text(encoding="utf-8")).get(machine_key(), {})
        return {k: v["choice"] for k, v in saved.items() if isinstance(v.get("choice"), str)}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


def _read_file() -> dict[str, str]:
    return {k: v for k, v in _saved_choices().items() if v in CANDIDATES}


def _save(key: tuple, record: dict) -> None:
    _save_raw(_shape_str(key), record)


def _save_raw(name: str, record: dict) -> None:
    """Add one measurement to the cache file (read-merge-replace, so concurrent runs lose nothing
    worse than one entry); a cache that cannot be written only costs a re-measurement later."""
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            data = data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            data = {}
        data.setdefault(machine_key(), {})[name] = record
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass


def _time_candidates(run: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Best seconds per call of each candidate (see :meth:`Timings.best`), in alternating rounds after
    two warm-up calls (the first builds oneDNN's primitive); about ROUND_S per round, fewer for slow products."""
    first = alternate(run, warmup=1, rounds=1)  # one timed call each: the size of the product
    slowest = max(first.seconds[n][0] for n in run)
    rounds = max(1, min(MAX_ROUNDS, int(10 * ROUND_S / max(slowest, 1e-7))))
    calls = max(1, min(100, int(ROUND_S / max(slowest, 1e-7))))
    timed = alternate(run, warmup=0, rounds=rounds, calls=calls)
    return {name: timed.best(name) for name in run}


def choose(kind: str, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> str:
    """The candidate (``onednn`` or ``f.linear``) for ``a @ b.T (+ bias)``, a (M, K) and b (N, K):
    cached, else measured on these very tensors. ``kind`` names the product's role and layout
    (``fwd``, ``grad_in``, ``grad_w``): the same shapes in another layout may favour the other library."""
    rows = a.size(0)
    key = (kind, 1 << max(rows - 1, 0).bit_length(), b.size(0), a.size(-1), bias is not None,
           torch.get_num_threads())
    got = FORCE or _choices.get(key)
    if got is not None:
        return got
    forced = mode()
    if forced != "auto":  # GPTLAB_ONEDNN=0/1 (or no oneDNN): no measuring
        _choices[key] = "f.linear" if forced == "off" else "onednn"
        return _choices[key]
    global _file_entries
    if _file_entries is None:
        _file_entries = _read_file()
    got = _file_entries.get(_shape_str(key))
    if got is not None:
        _choices[key] = got
        return got
    if kind == "grad_w":  # rows are the output; the long shared dimension is what to shorten
        a, b = a[:, :MEASURE_ROWS * 4], b[:, :MEASURE_ROWS * 4]
    else:
        a = a[:MEASURE_ROWS]
    with torch.no_grad():
        secs = _time_candidates({name: (lambda f=f: f(a, b, bias)) for name, f in CANDIDATES.items()})
    best = min(secs, key=secs.__getitem__)
    _choices[key] = _file_entries[_shape_str(key)] = best
    _save(key, {"choice": best, **{f"{n}_us": round(s * 1e6, 2) for n, s in secs.items()}})
    return best


def clear_choices() -> None:
    """Forget the choices held in memory (the cache file stays): the next product re-reads or re-measures."""
    global _file_entries
    _choices.clear()
    _step_verdicts.clear()
    _file_entries = None


def mm_t(kind: str, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b.T (+ bias)`` (a 2-D) by the faster library for this shape."""
    return CANDIDATES[choose(kind, a, b, bias)](a, b, bias)


# --------------------------------------------------------------------------- the linear layer


class _TunedLinearFn(torch.autograd.Function):
    """2-D ``x @ weight.T + bias`` where each of the three products (forward, input gradient, weight
    gradient) goes to its own faster library. Callers reshape outside: an output that is a view made
    inside a Function could not be modified in place afterwards."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return mm_t("fwd", x, weight, bias)  # (M, N)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = mm_t("grad_in", grad, weight.t())  # (M, N) @ (N, K)
        if ctx.needs_input_grad[1]:
            gw = mm_t("grad_w", grad.t(), x.t())  # (N, M) @ (M, K)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = grad.sum(0)
        return gx, gw, gb


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` (x @ weight.T + bias), each fp32 CPU product on the faster library (module docstring)."""
    if (torch.compiler.is_compiling() or x.device.type != "cpu" or x.dtype != torch.float32
            or weight.dtype != torch.float32 or x.dim() < 2 or torch.is_autocast_enabled("cpu")):
        return F.linear(x, weight, bias)
    x2 = x.reshape(-1, x.size(-1))  # (M, K)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        y = _TunedLinearFn.apply(x2, weight, bias)  # (M, N)
    else:
        y = mm_t("fwd", x2, weight, bias)
    return y.view(*x.shape[:-1], weight.size(0))  # (..., N)


class TunedLinear(nn.Linear):
    """``nn.Linear`` (same parameters, names and init) whose product goes through :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def apply_cpu_kernels(model: nn.Module, probe: Callable[[], object] | None = None,
                      signature: str = "") -> nn.Module:
    """Swap every plain ``nn.Linear`` of ``model`` for :class:`TunedLinear`, in place (the modules keep
    their parameters, so names, state dicts, tied weights and optimizers are unaffected); returns it.

    ``probe``: one forward + backward pass of the work to come (no optimizer update); with it the swap is
    kept only if that pass is faster with it (:func:`keep_if_faster`; ``signature`` names the work in the
    cache). A no-op unless the model is fp32 on CPU and ``GPTLAB_ONEDNN`` is not 0. Call it before
    ``torch.compile`` / DDP wrapping; under compile the layers trace as ``F.linear``.
    """
    p = next(model.parameters(), None)
    if p is None or p.device.type != "cpu" or p.dtype != torch.float32 or mode() == "off":
        return model
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = TunedLinear
    if probe is not None and mode() == "auto" and FORCE is None and not keep_if_faster(probe, signature):
        for module in model.modules():
            if type(module) is TunedLinear:
                module.__class__ = nn.Linear
    return model


# Probes slower than this per pass are not repeated: products that large are timed reliably alone (the
# per-shape choice stands), and repeating a multi-second pass would delay the run for little. Passes
# above PROBE_MAX_FLOP (about a second at a 2-core CPU's 50-100 GFLOP/s) are not even tried once.
PROBE_MAX_S = 1.0
PROBE_MAX_FLOP = 1e11


def keep_if_faster(probe: Callable[[], object], signature: str) -> bool:
    """Whether ``probe`` (a pass over :class:`TunedLinear` layers) runs faster on the per-shape choices
    than on ``F.linear`` everywhere: timed alternately, best of each, cached per machine and ``signature``."""
    key = f"step {signature} threads={torch.get_num_threads()}"
    if key in _step_verdicts:
        return _step_verdicts[key]
    saved = _read_step(key)
    if saved is not None:
        _step_verdicts[key] = saved
        return saved
    first = alternate({"tuned": probe}, warmup=1, rounds=1)  # the warm-up measures the per-shape choices
    if first.best("tuned") > PROBE_MAX_S:
        return True

    def forced(fn: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            global FORCE
            FORCE = "f.linear"
            try:
                return fn()
            finally:
                FORCE = None
        return run

    timed = alternate({"tuned": probe, "f.linear": forced(probe)}, warmup=1, rounds=MAX_ROUNDS, calls=2)
    tuned, plain = timed.best("tuned"), timed.best("f.linear")
    verdict = _step_verdicts[key] = tuned < plain
    _save_raw(key, {"choice": "tuned" if verdict else "f.linear", "tuned_ms": round(tuned * 1e3, 3),
                    "f.linear_ms": round(plain * 1e3, 3)})
    return verdict


def training_probe(model: nn.Module, batch: int, seq_len: int) -> tuple[Callable[[], None] | None, str]:
    """A probe for :func:`apply_cpu_kernels`: one forward + backward pass of a GPT on a fixed random batch
    of the training shape, and its signature (``None`` for a pass over PROBE_MAX_FLOP). It leaves no
    gradients and moves no global generator (dropout draws happen inside a forked one), so a run is the
    same whether or not it probed."""
    import hashlib

    cfg = model.config
    if 6 * sum(p.numel() for p in model.parameters()) * batch * seq_len > PROBE_MAX_FLOP:
        return None, ""
    x = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), generator=torch.Generator().manual_seed(0))

    def run() -> None:
        with torch.random.fork_rng(devices=[]):
            model(x[:, :-1], x[:, 1:])[1].backward()
        model.zero_grad(set_to_none=True)

    digest = hashlib.sha1(cfg.to_json().encode()).hexdigest()[:10]
    return run, (f"train L={cfg.n_layer} C={cfg.n_embd} V={cfg.padded_vocab_size} B={batch} T={seq_len} "
                 f"config={digest}")


def _read_step(key: str) -> bool | None:
    return {"tuned": True, "f.linear": False}.get(_saved_choices().get(key, ""))
