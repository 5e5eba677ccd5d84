"""Parameter groups, optimizer construction and the learning-rate schedule."""

from __future__ import annotations

import math

import pytest
import torch

from gptlab.config import ModelConfig, OptimConfig
from gptlab.model import GPT
from gptlab.optim import build_optimizer, describe_groups, lr_at, lr_factor, param_groups, set_lr


def nanogpt_get_lr(it: int, lr: float, min_lr: float, warmup: int, decay_steps: int) -> float:
    """build-nanogpt's get_lr, written out independently as the reference."""
    if it < warmup:
        return lr * (it + 1) / warmup
    if it > decay_steps:
        return min_lr
    ratio = (it - warmup) / (decay_steps - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def test_cosine_schedule_matches_build_nanogpt():
    cfg = OptimConfig(lr=6e-4, min_lr_ratio=0.1, warmup_steps=715, decay="cosine", decay_steps=19073)
    for it in [0, 1, 100, 714, 715, 716, 5000, 9894, 19072, 19073, 19074, 25000]:
        assert lr_at(it, cfg, 19073) == pytest.approx(nanogpt_get_lr(it, 6e-4, 6e-5, 715, 19073), rel=1e-12), it
    assert lr_at(0, cfg, 19073) == pytest.approx(6e-4 / 715)  # step 0 is the first update
    assert lr_at(714, cfg, 19073) == pytest.approx(6e-4)
    # decay_steps = 0 means "decay over max_steps"
    assert lr_at(100, OptimConfig(warmup_steps=10, decay_steps=0), 200) == lr_at(
        100, OptimConfig(warmup_steps=10, decay_steps=200), 10**6)


def test_other_schedules():
    lin = OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=0, decay="linear", decay_steps=100)
    assert [lr_at(s, lin, 100) for s in (0, 25, 50, 100, 150)] == pytest.approx([1.0, 0.75, 0.5, 0.0, 0.0])
    const = OptimConfig(lr=3e-5, warmup_steps=0, decay="constant")
    assert {lr_at(s, const, 20) for s in range(30)} == {3e-5}
    warm_const = OptimConfig(lr=1.0, warmup_steps=4, decay="constant")
    assert [lr_at(s, warm_const, 10) for s in range(6)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
    wsd = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, decay="wsd", wsd_decay_frac=0.2, decay_steps=100)
    # stable at the peak until step 80, then linear to 0.1 at step 100
    assert lr_at(50, wsd, 100) == 1.0 and lr_at(79, wsd, 100) == 1.0
    assert lr_at(90, wsd, 100) == pytest.approx(1.0 - 0.5 * 0.9)
    assert lr_at(100, wsd, 100) == pytest.approx(0.1)
    # monotone non-increasing after warmup, for every kind
    for kind in ("cosine", "linear", "wsd", "constant"):
        c = OptimConfig(lr=1.0, warmup_steps=5, decay=kind, decay_steps=60)
        vals = [lr_factor(s, c, 60) for s in range(4, 80)]
        assert all(a >= b - 1e-12 for a, b in zip(vals, vals[1:])), kind
    with pytest.raises(ValueError):
        lr_factor(-1, lin, 10)


def test_param_groups_counts_for_gpt2_layout():
    cfg = ModelConfig.from_preset("tiny")  # 2 layers, biases, tied head
    model = GPT(cfg)
    decay, no_decay = param_groups(model, 0.1)
    L = cfg.n_layer
    # decayed: wte, wpe, and per block c_attn, attn.c_proj, c_fc, mlp.c_proj weights (lm_head is wte: once)
    assert len(decay["params"]) == 2 + 4 * L
    # not decayed: per block ln_1 w/b, ln_2 w/b and 4 Linear biases; plus ln_f w/b
    assert len(no_decay["params"]) == 8 * L + 2
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    total = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert total == model.num_params()
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    text = describe_groups([decay, no_decay])
    assert f"{len(decay['params'])} tensors" in text and f"{total - sum(p.numel() for p in no_decay['params']):,}" in text
    # untied head: one more decayed matrix
    untied = GPT(ModelConfig.from_preset("tiny", tie_embeddings=False))
    assert len(param_groups(untied, 0.1)[0]["params"]) == 3 + 4 * L


def test_build_adamw_and_set_lr():
    model = GPT(ModelConfig.from_preset("tiny"))
    cfg = OptimConfig(lr=1e-3, betas=(0.9, 0.99), eps=1e-7, weight_decay=0.05)
    opt, summary = build_optimizer(model, cfg, "cpu")
    assert isinstance(opt, torch.optim.AdamW) and "param group decay" in summary
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    assert opt.param_groups[0]["betas"] == (0.9, 0.99) and opt.param_groups[0]["eps"] == 1e-7
    assert opt.param_groups[0].get("fused")  # fused kernel on CPU too (torch >= 2.4)
    ref_model = GPT(ModelConfig.from_preset("tiny"))
    ref_model.load_state_dict(model.state_dict())
    ref = torch.optim.AdamW(param_groups(ref_model, 0.05), lr=1e-3, betas=(0.9, 0.99), eps=1e-7, foreach=False)
    set_lr(opt, 0.5)
    assert [g["lr"] for g in opt.param_groups] == [5e-4, 5e-4]
    # the optimizer really steps with those groups: no-decay params move only by the gradient
    x = torch.randint(0, 256, (2, 16))
    _, loss = model(x, x)
    loss.backward()
    before = model.transformer.ln_f.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, model.transformer.ln_f.weight)
    # the fused update equals the plain for-loop AdamW to rounding
    _, ref_loss = ref_model(x, x)
    ref_loss.backward()
    for g in ref.param_groups:
        g["lr"] = 5e-4
    ref.step()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


def test_muon_optimizer_groups_scale_with_schedule():
    pytest.importorskip("gptlab.muon")
    model = GPT(ModelConfig.from_preset("tiny"))
    opt, _ = build_optimizer(model, OptimConfig(optimizer="muon", lr=1e-3, muon_lr=0.02), "cpu")
    base = sorted({g["base_lr"] for g in opt.param_groups})
    assert 0.02 in base and 1e-3 in base
    set_lr(opt, 0.1)
    assert sorted({round(g["lr"], 12) for g in opt.param_groups}) == sorted({round(b * 0.1, 12) for b in base})


def test_config_validation():
    from gptlab.config import ConfigError

    with pytest.raises(ConfigError, match="optim.optimizer='sgd'"):
        OptimConfig(optimizer="sgd")
    with pytest.raises(ConfigError, match="optim.betas"):
        OptimConfig(betas=(0.9,))
    with pytest.raises(ConfigError, match="min_lr=0.1 is above optim.lr"):
        OptimConfig(lr=0.01, min_lr=0.1)
