"""Int8 weight-only quantization for inference, applied from outside the model (as gpt-fast does).

Why: decoding one token reads every weight once, so on a CPU it is bound by memory bandwidth; int8 weights
are a quarter of the fp32 bytes. :func:`quantize_model` swaps each ``nn.Linear`` (the tied ``lm_head``
included: it gets its own int8 copy, the embedding table stays as it is because a lookup reads one row)
for an :class:`Int8Linear` holding int8 weights and one fp32 scale per output channel
(``scale = max|w_row| / 127``, symmetric, round to nearest). Activations stay in the model's dtype.

The product: for one or a few rows (decode steps) a small compiled kernel reads the int8 weights and
converts them in registers (``(x * w).sum(-1) * scale``, which inductor turns into one vectorised loop);
for more rows (prefill) the weights are converted once to the activations' dtype and go through the
ordinary matrix product, where the work is arithmetic, not bytes. That conversion costs about what reading
fp32 weights twice would, so int8 pays off for one or a few streams, not for batched serving. Inside a graph the user compiles
(``--compile``) the plain formula is left to inductor.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptlab.errors import GptlabError

SCHEMES = ("int8",)
# Rows up to which the per-row int8 kernel beats converting the weights for one matrix product: each row
# re-reads the int8 weights (a quarter of fp32's bytes), so past ~3 rows the fp32 product reads less.
MAX_GEMV_ROWS = 3
_GEMV_OK = [True]


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weights (N, K), fp32 scales (N,)) with ``weight ~= q * scale[:, None]`` per output channel."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (N,)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


@functools.cache
def _gemv():
    # Compiled once per process; inductor specialises it per (K, N) and fuses convert, multiply and sum.
    def gemv(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return (x[:, None, :] * q.to(x.dtype)[None]).sum(-1) * scale.to(x.dtype)  # (M, K) x (N, K) -> (M, N)

    return torch.compile(gemv, dynamic=True, fullgraph=True)


class Int8Linear(nn.Module):
    """``y = x @ (q * scale).T + bias`` with int8 ``q`` (N, K) and fp32 ``scale`` (N,) as buffers."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = q.size(1), q.size(0)
        self.register_buffer("weight", q)
        self.register_buffer("scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        q, scale = quantize_int8(linear.weight)
        return cls(q, scale, linear.bias)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.weight.to(dtype) * self.scale.to(dtype)[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if torch.compiler.is_compiling():
            y = F.linear(x2, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        elif x2.size(0) <= MAX_GEMV_ROWS and x.device.type == "cpu" and _GEMV_OK[0]:
            try:
                # A fresh tensor: a view's base would enter the compiled function's guards and recompile.
                y = _gemv()(x2.clone(), self.weight, self.scale)
            except Exception as e:  # noqa: BLE001 - e.g. no C++ compiler for inductor: stay correct, go slower
                _GEMV_OK[0] = False
                warnings.warn(f"int8 decode kernel unavailable ({type(e).__name__}: {e}); "
                              "using the dequantized product instead", stacklevel=2)
                return self.forward(x)
        else:
            from gptlab.kernels import linear

            # One conversion pass over the weights; the scales go on the (rows, N) output, not the weights.
            y = linear(x2, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def quantize_model(model: nn.Module, scheme: str = "int8") -> nn.Module:
    """Swap every ``nn.Linear`` of ``model`` for its int8 version, in place (inference only); returns it."""
    if scheme not in SCHEMES:
        raise GptlabError(f"--quantize {scheme!r}: expected one of {', '.join(SCHEMES)}")
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, child_name, Int8Linear.from_linear(child))
    return model.eval().requires_grad_(False)
