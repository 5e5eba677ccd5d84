"""fp32 matrix products on CPU through oneDNN instead of the BLAS behind ``torch.mm``.

Why: PyTorch's CPU wheels send fp32 ``mm``/``linear`` to Intel MKL, which picks its AVX2 code path on
AMD processors even when they have AVX-512; oneDNN (also inside PyTorch) dispatches on the instruction
set itself. On the AMD EPYC (Zen 5) machines this project is benchmarked on that is 2x the FLOP/s for
the forward product and the input gradient (BENCHMARKS.md, "oneDNN linear"), and matrix products are
most of a CPU training step and almost all of a decode step. On Intel CPUs the two libraries are on par.

The entry point is :func:`linear`, a drop-in for ``F.linear`` with the same autograd semantics; it
falls back to ``F.linear`` wherever oneDNN would not be the plain fp32 CPU product (GPU, bf16/fp16,
autocast, inside ``torch.compile`` -- inductor picks its own kernels) and when ``GPTLAB_ONEDNN=0``.
There is no public fp32 oneDNN matmul in PyTorch, so this uses the operator inductor itself lowers
CPU linears to (``torch.ops.mkldnn._linear_pointwise``), checked once at import.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F


def _onednn_available() -> bool:
    if os.environ.get("GPTLAB_ONEDNN", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        op = torch.ops.mkldnn._linear_pointwise
        x, w = torch.ones(2, 3), torch.ones(4, 3)
        return bool(torch.equal(op(x, w, None, "none", [], ""), F.linear(x, w)))
    except (AttributeError, RuntimeError):
        return False


ONEDNN = _onednn_available()


def _mm_t(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b.T (+ bias)`` by oneDNN: ``a`` (..., K), ``b`` (N, K), strided views allowed; a new
    contiguous (..., N) tensor."""
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """2-D ``x @ weight.T + bias`` with oneDNN products in both directions. Callers reshape outside:
    an output that is a view made inside a Function could not be modified in place afterwards."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _mm_t(x, weight, bias)  # (M, N)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _mm_t(grad, weight.t())  # (M, N) @ (N, K)
        if ctx.needs_input_grad[1]:
            # (N, M) @ (M, K); oneDNN copies the transposed left operand, and still beats MKL here.
            gw = _mm_t(grad.t(), x.t())
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = grad.sum(0)
        return gx, gw, gb


# A oneDNN call costs ~12 us more than MKL's before any arithmetic (primitive lookup). That loses on
# products that are both small and cache-resident -- a one-token step of a 128-wide model ran 2x slower --
# so oneDNN takes a product only when it has at least MIN_MACS multiply-adds (rows x out x in; measured
# crossover 0.6M-1.5M with hot caches) or a weight of at least MIN_WEIGHT elements (512 KB in fp32),
# which a decode step streams from memory, where oneDNN's ~1.8x faster matrix-vector product wins back the
# fixed cost (a 256-wide GPT-2-shaped model decodes 1.5x faster with its 196K-element weights on oneDNN).
MIN_MACS = 1_500_000
MIN_WEIGHT = 131_072


def _use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    # Cheapest tests first: a decode step asks this ~100 times per token.
    return (ONEDNN and (weight.numel() >= MIN_WEIGHT or x.numel() * weight.size(0) >= MIN_MACS)
            and x.device.type == "cpu"
            and x.dtype == torch.float32 and weight.dtype == torch.float32 and x.dim() >= 2
            and not torch.compiler.is_compiling() and not torch.is_autocast_enabled("cpu"))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` (x @ weight.T + bias), through oneDNN for fp32 on CPU (see the module docstring)."""
    if not _use_onednn(x, weight):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        y = _OneDNNLinear.apply(x.reshape(-1, x.size(-1)), weight, bias)  # (M, N)
        return y.view(*x.shape[:-1], weight.size(0))  # (..., N)
    return _mm_t(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, names and init) whose product goes through :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
