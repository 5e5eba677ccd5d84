"""Muon + AdamW optimizer: Newton-Schulz numerics, parameter routing, equality with torch's own
Muon/AdamW, checkpoint round trip, and that it trains a tiny GPT."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from gptlab.config import MODERN_ARCH, ModelConfig
from gptlab.errors import GptlabError
from gptlab.model import GPT
from gptlab.muon import NS_COEFFICIENTS, MuonAdamW, build_muon_optimizer, muon_param_groups, newton_schulz


def _polynomial_reference(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Newton-Schulz acts on each singular value alone: U f(S / ||G||_F) V^T with f the quintic, 5 times."""
    a, b, c = NS_COEFFICIENTS
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    s = S / G.norm()
    for _ in range(steps):
        s = a * s + b * s**3 + c * s**5
    return U @ torch.diag(s) @ Vh


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (32, 32)])
def test_newton_schulz_equals_polynomial_of_singular_values(shape):
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    X = newton_schulz(G, eps=0.0, dtype=torch.float64)
    torch.testing.assert_close(X, _polynomial_reference(G), atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (96, 32)])
def test_newton_schulz_singular_values_near_one(shape, dtype):
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 1e-3  # scale must not matter
    X = newton_schulz(G, dtype=dtype)
    assert X.dtype == dtype and X.shape == G.shape
    sv = torch.linalg.svdvals(X.float())
    # 5 quintic steps leave singular values in about [0.68, 1.13] for a well-conditioned input.
    assert sv.min() > 0.6 and sv.max() < 1.25, (sv.min().item(), sv.max().item())
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    polar = U @ Vh  # the exact orthogonalisation
    cos = (X.float() * polar).sum() / (X.float().norm() * polar.norm())
    assert cos > 0.97


def test_muon_group_matches_torch_muon():
    gen = torch.Generator().manual_seed(2)
    W = torch.randn(48, 80, generator=gen)
    ref, mine = W.clone().requires_grad_(), W.clone().requires_grad_()
    opt_ref = torch.optim.Muon([ref], lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True,
                               adjust_lr_fn="original")
    opt = MuonAdamW([dict(params=[mine], use_muon=True, weight_decay=0.1)], lr=0.02, momentum=0.95,
                    ns_dtype="bfloat16")  # torch's Muon always iterates in bf16
    for _ in range(3):
        g = torch.randn(48, 80, generator=gen)
        ref.grad, mine.grad = g.clone(), g.clone()
        opt_ref.step()
        opt.step()
    moved = (ref - W).norm()
    assert moved > 0.01
    assert (ref - mine).norm() / moved < 0.03  # bf16 rounding differs (addmm vs separate ops)


def test_adamw_groups_match_torch_adamw_exactly():
    gen = torch.Generator().manual_seed(3)
    ps = [torch.randn(16, 8, generator=gen), torch.randn(8, generator=gen)]
    ref = [p.clone().requires_grad_() for p in ps]
    mine = [p.clone().requires_grad_() for p in ps]
    opt_ref = torch.optim.AdamW([dict(params=[ref[0]], weight_decay=0.1), dict(params=[ref[1]], weight_decay=0.0)],
                                lr=1e-2, betas=(0.8, 0.95), eps=1e-10, fused=True)  # as the AdamW recipe runs
    opt = MuonAdamW([dict(params=[mine[0]], weight_decay=0.1), dict(params=[mine[1]], weight_decay=0.0)],
                    lr=1e-2, betas=(0.8, 0.95), eps=1e-10)
    for step in range(5):
        for o in (opt_ref, opt):
            for group in o.param_groups:
                group["lr"] = 1e-2 * (1 - step / 5)  # the trainer's schedule writes group["lr"]
        for r, m in zip(ref, mine):
            g = torch.randn(r.shape, generator=gen)
            r.grad, m.grad = g.clone(), g.clone()
        opt_ref.step()
        opt.step()
    for r, m in zip(ref, mine):
        assert torch.equal(r, m)


def _names(model, params):
    ids = {id(p) for p in params}
    return sorted(n for n, p in model.named_parameters() if id(p) in ids)


@pytest.mark.parametrize("arch", ["gpt2", "modern"])
def test_param_routing(arch):
    extra = dict(n_kv_head=2) if arch == "modern" else {}
    cfg = ModelConfig.from_preset("tiny", **(MODERN_ARCH if arch == "modern" else {}), **extra)
    model = GPT(cfg)
    groups = muon_param_groups(model, lr=1e-3, weight_decay=0.1, muon_lr=0.02)
    muon = [p for g in groups if g["use_muon"] for p in g["params"]]
    decay = [p for g in groups if not g["use_muon"] and g["weight_decay"] > 0 for p in g["params"]]
    no_decay = [p for g in groups if not g["use_muon"] and g["weight_decay"] == 0 for p in g["params"]]
    expected_muon = sorted(f"transformer.h.{i}.{m}.weight" for i in range(cfg.n_layer)
                           for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    assert _names(model, muon) == expected_muon
    embeddings = ["transformer.wte.weight"] + (["lm_head.weight"] if not cfg.tie_embeddings else []) + (
        ["transformer.wpe.weight"] if cfg.pos_emb == "learned" else [])
    assert _names(model, decay) == sorted(embeddings)
    assert all(p.ndim == 1 for p in no_decay) and len(no_decay) > 0
    # every trainable tensor exactly once
    all_ids = [id(p) for g in groups for p in g["params"]]
    assert len(all_ids) == len(set(all_ids)) == len(list(model.parameters()))
    # fused projections are split into their real matrices
    splits = {tuple(g["split"]): g for g in groups if g["use_muon"]}
    hs = cfg.head_dim
    assert (cfg.n_head * hs, cfg.kv_heads * hs, cfg.kv_heads * hs) in splits
    if cfg.mlp == "swiglu":
        assert (cfg.hidden_dim, cfg.hidden_dim) in splits
    for g in groups:
        assert g["lr"] == (0.02 if g["use_muon"] else 1e-3)


def test_split_blocks_are_orthogonalised_separately():
    torch.manual_seed(4)
    W = torch.randn(3 * 32, 32)
    p = W.clone().requires_grad_()
    opt = MuonAdamW([dict(params=[p], use_muon=True, split=[32, 16, 48])], lr=0.1, ns_dtype="float32")
    p.grad = torch.randn_like(W)
    opt.step()
    update = (W - p.detach()) / 0.1
    # First step: the Nesterov update is a positive multiple of the gradient, and NS is scale-free.
    expected = torch.cat([newton_schulz(b) * max(1.0, b.size(0) / b.size(1)) ** 0.5
                          for b in p.grad.split([32, 16, 48])])
    torch.testing.assert_close(update, expected, atol=1e-4, rtol=1e-4)


def test_bad_groups_are_clear_errors():
    with pytest.raises(GptlabError, match="2-D"):
        MuonAdamW([dict(params=[torch.zeros(4, requires_grad=True)], use_muon=True)])
    with pytest.raises(GptlabError, match="split"):
        MuonAdamW([dict(params=[torch.zeros(4, 4, requires_grad=True)], use_muon=True, split=[2, 1])])


def _batches(n: int, B: int = 8, T: int = 32):
    """Deterministic learnable data: a noisy repeating byte pattern."""
    gen = torch.Generator().manual_seed(5)
    base = torch.randint(0, 64, (97,), generator=gen)
    out = []
    for _ in range(n):
        starts = torch.randint(0, 97, (B,), generator=gen)
        idx = (starts[:, None] + torch.arange(T + 1)) % 97
        seq = base[idx]
        out.append((seq[:, :-1], seq[:, 1:]))
    return out


def _train(model, opt, batches):
    losses = []
    for x, y in batches:
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_state_dict_round_trip_continues_identically(tmp_path):
    torch.manual_seed(6)
    model = GPT(ModelConfig.from_preset("tiny", **MODERN_ARCH))
    cfg = dict(lr=3e-3, weight_decay=0.1, muon_lr=0.02, muon_weight_decay=0.01)
    opt = build_muon_optimizer(model, cfg)
    batches = _batches(6)
    _train(model, opt, batches[:3])
    path = tmp_path / "optim.pt"
    torch.save(opt.state_dict(), path)
    clone = copy.deepcopy(model)
    opt2 = build_muon_optimizer(clone, cfg)
    opt2.load_state_dict(torch.load(path, weights_only=True))  # no pickle needed to restore
    _train(model, opt, batches[3:])
    _train(clone, opt2, batches[3:])
    for (n, a), b in zip(model.named_parameters(), clone.parameters()):
        assert torch.equal(a, b), n
    kinds = {type(v) for s in opt.state.values() for v in s.values()}
    assert kinds == {torch.Tensor}


def test_muon_trains_tiny_model_at_least_as_fast_as_adamw():
    batches = _batches(25)
    cfg = ModelConfig.from_preset("tiny")
    torch.manual_seed(7)
    model = GPT(cfg)
    ref = copy.deepcopy(model)
    muon = _train(model, build_muon_optimizer(model, dict(lr=3e-3, weight_decay=0.0, muon_lr=0.02)), batches)
    adamw = _train(ref, torch.optim.AdamW(ref.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0), batches)
    assert muon[-1] < muon[0] - 1.0  # it learns
    assert sum(muon[-5:]) < sum(adamw[-5:]), (muon[-5:], adamw[-5:])  # about 2.0 vs 2.4 here


def test_build_reads_dataclass_and_dict_configs():
    from dataclasses import dataclass

    @dataclass
    class Optim:
        lr: float = 1e-3
        weight_decay: float = 0.1
        beta1: float = 0.8
        beta2: float = 0.99
        eps: float = 1e-10
        muon_lr: float = 0.05
        muon_momentum: float = 0.9
        muon_weight_decay: float = 0.01

    model = GPT(ModelConfig.from_preset("tiny"))
    for cfg in (Optim(), Optim().__dict__):
        opt = build_muon_optimizer(model, cfg)
        m = [g for g in opt.param_groups if g["use_muon"]]
        a = [g for g in opt.param_groups if not g["use_muon"]]
        assert {(g["lr"], g["momentum"], g["weight_decay"], g["base_lr"]) for g in m} == {(0.05, 0.9, 0.01, 0.05)}
        assert {(g["lr"], g["betas"], g["eps"], g["base_lr"]) for g in a} == {(1e-3, (0.8, 0.99), 1e-10, 1e-3)}
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=True)["param_groups"][0]["use_muon"] is True


def test_batched_newton_schulz_equals_one_at_a_time():
    G = torch.randn(3, 40, 24, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    batched = newton_schulz(G, dtype=torch.float64)
    for k in range(3):
        torch.testing.assert_close(batched[k], newton_schulz(G[k], dtype=torch.float64), atol=1e-12, rtol=1e-10)


def test_works_on_ddp_and_compiled_wrappers(tmp_path):
    """Routing sees through DDP / torch.compile wrappers, and a DDP step equals the plain step."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    torch.manual_seed(9)
    model = GPT(ModelConfig.from_preset("tiny", **MODERN_ARCH))
    plain = copy.deepcopy(model)
    ddp = DDP(model)
    cfg = dict(lr=3e-3, muon_lr=0.02)
    opt_ddp, opt_plain = build_muon_optimizer(ddp, cfg), build_muon_optimizer(plain, cfg)
    assert [len(g["params"]) for g in opt_ddp.param_groups] == [len(g["params"]) for g in opt_plain.param_groups]
    wrapped = torch.nn.Module()
    wrapped._orig_mod = plain  # what torch.compile's OptimizedModule holds
    assert [len(g["params"]) for g in muon_param_groups(wrapped, lr=1e-3, weight_decay=0.1, muon_lr=0.02)] == \
        [len(g["params"]) for g in opt_plain.param_groups]
    batches = _batches(2)
    _train(ddp, opt_ddp, batches)
    _train(plain, opt_plain, batches)
    for (n, a), b in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=n)
