"""Muon for the hidden weight matrices, AdamW for everything else — in one optimizer.

Muon ("MomentUm Orthogonalized by Newton-Schulz", Keller Jordan 2024,
https://kellerjordan.github.io/posts/muon/) takes Nesterov momentum of a 2-D gradient and replaces
it by (approximately) the nearest semi-orthogonal matrix U V^T, computed with a few Newton-Schulz
iterations instead of an SVD. It is only meant for the matrices inside the transformer blocks;
embeddings, the output head, norm gains and biases stay on AdamW (as in modded-nanogpt).

One :class:`MuonAdamW` holds both kinds as parameter groups flagged ``use_muon``, so the usual
``state_dict()`` / ``load_state_dict()``, checkpointing and per-group LR scheduling (the trainer sets
``group["lr"] = group["base_lr"] * factor``) work unchanged. Every state entry is a tensor and every
group value a plain number/bool/string/list, so saved state loads with ``torch.load(weights_only=True)``.

Under DDP the gradients are already averaged across ranks, so every rank computes the same update from
the same numbers; no extra communication is needed (modded-nanogpt shards the Newton-Schulz work across
ranks for speed, which matters only at large scale).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn
from torch.optim.adamw import adamw as _adamw_functional

from gptlab.errors import GptlabError
from gptlab.runtime import unwrap_model

# Quintic Newton-Schulz coefficients tuned to maximise the slope at zero (Keller Jordan): 5 steps push
# every singular value of a normalised matrix into roughly [0.7, 1.2] instead of converging to exactly 1,
# which costs nothing in training quality and saves iterations.
NS_COEFFICIENTS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def newton_schulz(G: torch.Tensor, steps: int = NS_STEPS, eps: float = 1e-7,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Approximately orthogonalise a matrix, or a batch (..., m, n) of same-shape matrices:
    ``U S' V^T`` with ``S'`` near 1, where ``G = U S V^T``.

    Runs in ``dtype`` (bf16 on GPUs: the iteration is robust to its rounding) and returns that dtype.
    """
    if G.ndim < 2:
        raise ValueError(f"newton_schulz expects a matrix or a batch of matrices, got shape {tuple(G.shape)}")
    a, b, c = NS_COEFFICIENTS
    X = G.to(dtype)
    transposed = X.size(-2) > X.size(-1)
    if transposed:  # iterate on the wide orientation so the Gram matrix X X^T is the small one
        X = X.mT
    # Frobenius norm >= spectral norm, so every singular value starts in [0, 1] where the iteration works.
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    # baddbmm folds the scalings and sums into the products: on CPU the separate mul/add passes took 27%
    # of the step's time (a 4-layer, 128-wide model).
    X3 = X.reshape(-1, *X.shape[-2:])  # (batch, m, n): baddbmm wants exactly one batch dimension
    for _ in range(steps):
        A = torch.bmm(X3, X3.mT)  # (batch, m, m) with m = min(rows, cols)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b*A + c*A@A
        X3 = torch.baddbmm(X3, B, X3, beta=a)  # a*X + B@X: the odd polynomial a*s + b*s^3 + c*s^5 of each s
    X = X3.reshape(X.shape)
    return X.mT if transposed else X


def _ns_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16()) else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX, through oneDNN). There the
    Newton-Schulz iteration runs in bf16 as on GPUs (the reference implementation's precision): on Zen 4
    it halves Muon's time (9.2 vs 19.6 ms per step for the 4-layer char model), which at 768 tokens per
    step is as much arithmetic as the forward pass. Elsewhere bf16 would be emulated, slower than fp32."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class MuonAdamW(torch.optim.Optimizer):
    """Muon for groups with ``use_muon=True`` (2-D weights only), AdamW for the other groups.

    Muon groups use ``lr``, ``momentum``, ``nesterov``, ``ns_steps``, ``ns_dtype`` ("auto" = bf16 on
    CUDA and on CPUs with native bf16 products, fp32 elsewhere), ``weight_decay`` (decoupled,
    ``p *= 1 - lr * wd``) and ``split`` (row counts
    of fused matrices such as [q; k; v], each block orthogonalised on its own; [] = whole matrix).
    AdamW groups use ``lr``, ``betas``, ``eps``, ``weight_decay`` and behave exactly as torch.optim.AdamW.
    Every group also keeps ``base_lr`` (its un-scheduled lr) for the trainer's LR schedule.
    """

    def __init__(self, params: Iterable[dict[str, Any]], *, lr: float = 0.02, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = NS_STEPS, ns_dtype: str = "auto",
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        if ns_dtype not in ("auto", "float32", "bfloat16"):
            raise GptlabError(f"muon ns_dtype={ns_dtype!r}: expected auto, float32 or bfloat16")
        defaults = dict(lr=lr, use_muon=False, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        ns_dtype=ns_dtype, split=[], betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group.setdefault("base_lr", group["lr"])
        group.setdefault("initial_lr", group["base_lr"])  # what torch LR schedulers look for
        if group["use_muon"]:
            for p in group["params"]:
                if p.ndim != 2:
                    raise GptlabError(f"Muon needs 2-D weight matrices; got a parameter of shape {tuple(p.shape)} "
                                      "in a use_muon group (put it in an AdamW group)")
                if group["split"] and sum(group["split"]) != p.size(0):
                    raise GptlabError(f"Muon split {group['split']} does not add up to the {p.size(0)} rows "
                                      f"of a parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """One update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_group(group)
            else:
                self._adamw_group(group)
        return loss

    def _muon_group(self, group: dict[str, Any]) -> None:
        lr, wd, beta = group["lr"], group["weight_decay"], group["momentum"]
        params, blocks = [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            g = p.grad
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            buf = state["momentum_buffer"]
            buf.lerp_(g, 1 - beta)  # buf = beta * buf + (1 - beta) * g
            # Nesterov: look ahead along the momentum, (1 - beta) * g + beta * buf.
            u = g.lerp(buf, beta) if group["nesterov"] else buf
            params.append(p)
            blocks.append(list(u.split(group["split"], dim=0)) if group["split"] else [u])
        if not params:
            return
        # Orthogonalise all same-shape blocks in one batched iteration: a few large matmuls instead of
        # many small ones (the per-call overhead dominates for small models, on CPU and GPU alike).
        buckets: dict[tuple, list[tuple[int, int]]] = {}
        for i, bl in enumerate(blocks):
            for j, blk in enumerate(bl):
                buckets.setdefault((tuple(blk.shape), blk.device), []).append((i, j))
        dtype = _ns_dtype(group["ns_dtype"], params[0].device)
        for (shape, _), where in buckets.items():
            ortho = newton_schulz(torch.stack([blocks[i][j] for i, j in where]), group["ns_steps"], dtype=dtype)
            # Scale tall blocks by sqrt(rows/cols) so each entry of the update has a similar RMS
            # whatever the shape (an orthogonal (r, c) matrix with r > c has entries of RMS 1/sqrt(r)).
            ortho = ortho * max(1.0, shape[0] / shape[1]) ** 0.5
            for k, (i, j) in enumerate(where):
                blocks[i][j] = ortho[k]
        for p, bl in zip(params, blocks):
            update = torch.cat(bl, dim=0) if len(bl) > 1 else bl[0]
            if wd:
                p.mul_(1 - lr * wd)
            p.add_(update.to(p.dtype), alpha=-lr)

    def _adamw_group(self, group: dict[str, Any]) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:  # same state layout as torch.optim.AdamW
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if not params:
            return
        beta1, beta2 = group["betas"]
        # torch's own functional AdamW, fused (one pass per tensor list) on CPU and CUDA as the AdamW
        # recipe's optimizer is: on CPU the per-tensor loop cost 2 ms a step for a 4-layer model's 20 tensors.
        fused = params[0].device.type in ("cpu", "cuda") and all(p.dtype in _FUSED_DTYPES for p in params)
        _adamw_functional(params, grads, exp_avgs, exp_avg_sqs, [], steps, foreach=None, capturable=False,
                          differentiable=False, fused=fused or None, grad_scale=None, found_inf=None, has_complex=False,
                          amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
                          weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)


def _fused_split(module: nn.Module) -> list[int]:
    """Row blocks of a fused projection that are separate matrices in the math ([] when not fused)."""
    from gptlab.model import CausalSelfAttention, SwiGLUMLP

    if isinstance(module, CausalSelfAttention):
        q, kv = module.n_head * module.head_dim, module.n_kv_head * module.head_dim
        return [q, kv, kv]  # c_attn = [W_q; W_k; W_v]
    if isinstance(module, SwiGLUMLP):
        h = module.c_proj.in_features
        return [h, h]  # c_fc = [W_gate; W_up]
    return []


def muon_param_groups(model: nn.Module, *, lr: float, weight_decay: float, muon_lr: float,
                      muon_momentum: float = 0.95, muon_weight_decay: float = 0.0,
                      split_fused: bool = True) -> list[dict[str, Any]]:
    """Route parameters: Linear weights inside the blocks -> Muon; embeddings and lm_head -> AdamW with
    weight decay; norm gains and biases (1-D) -> AdamW without decay. Empty groups are dropped."""
    model = unwrap_model(model)
    head = getattr(model, "lm_head", None)
    muon: dict[tuple[int, ...], list[nn.Parameter]] = {}
    decay, no_decay = [], []
    seen: set[int] = set()
    owner: dict[int, tuple[nn.Module, nn.Module]] = {}  # param id -> (Linear, its parent)
    for parent in model.modules():
        for child in parent.children():
            if isinstance(child, nn.Linear) and child is not head:
                owner.setdefault(id(child.weight), (child, parent))
    for _, p in model.named_parameters():  # named_parameters yields a tied weight once
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        if id(p) in owner and p.ndim == 2:
            linear, parent = owner[id(p)]
            fused = linear is getattr(parent, "c_attn", None) or linear is getattr(parent, "c_fc", None)
            split = _fused_split(parent) if split_fused and fused else []
            muon.setdefault(tuple(split), []).append(p)
        elif p.ndim >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    groups: list[dict[str, Any]] = [
        dict(params=ps, use_muon=True, split=list(split), lr=muon_lr, momentum=muon_momentum,
             weight_decay=muon_weight_decay) for split, ps in muon.items()
    ]
    groups += [dict(params=decay, use_muon=False, lr=lr, weight_decay=weight_decay),
               dict(params=no_decay, use_muon=False, lr=lr, weight_decay=0.0)]
    return [g for g in groups if g["params"]]


def _cfg(cfg: Any, name: str, default: Any) -> Any:
    if isinstance(cfg, dict):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def build_muon_optimizer(model: nn.Module, optim_cfg: Any, *, split_fused: bool = True) -> MuonAdamW:
    """The ``optimizer = "muon"`` choice of the trainer: Muon + AdamW groups from the optim config
    (``lr``, ``weight_decay``, ``beta1``/``beta2`` or ``betas``, ``eps``, ``muon_lr``, ``muon_momentum``,
    ``muon_weight_decay``; a dataclass or a dict)."""
    betas = _cfg(optim_cfg, "betas", None) or (_cfg(optim_cfg, "beta1", 0.9), _cfg(optim_cfg, "beta2", 0.95))
    groups = muon_param_groups(
        model, lr=float(_cfg(optim_cfg, "lr", 6e-4)), weight_decay=float(_cfg(optim_cfg, "weight_decay", 0.1)),
        muon_lr=float(_cfg(optim_cfg, "muon_lr", 0.02)), muon_momentum=float(_cfg(optim_cfg, "muon_momentum", 0.95)),
        muon_weight_decay=float(_cfg(optim_cfg, "muon_weight_decay", 0.0)), split_fused=split_fused,
    )
    return MuonAdamW(groups, betas=(float(betas[0]), float(betas[1])), eps=float(_cfg(optim_cfg, "eps", 1e-8)),
                     nesterov=bool(_cfg(optim_cfg, "muon_nesterov", True)),
                     ns_steps=int(_cfg(optim_cfg, "muon_ns_steps", NS_STEPS)))

