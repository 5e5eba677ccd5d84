"""The oneDNN CPU linear: forward and gradients against ``F.linear``, fallbacks, and a model step."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from gptlab import kernels
from gptlab.config import ModelConfig
from gptlab.kernels import Linear, linear
from gptlab.model import GPT

needs_onednn = pytest.mark.skipif(not kernels.ONEDNN, reason="oneDNN linear not available in this torch build")


@pytest.fixture
def any_size(monkeypatch):
    """Send every product, however small, through oneDNN (the tests' shapes are under MIN_MACS)."""
    monkeypatch.setattr(kernels, "MIN_MACS", 0)
    monkeypatch.setattr(kernels, "MIN_WEIGHT", 0)


def _grads(fn, x, w, b, g):
    for t in (x, w, b):
        if t is not None:
            t.grad = None
    y = fn(x, w, b)
    y.backward(g)
    return y.detach(), [t.grad.clone() for t in (x, w, b) if t is not None]


@needs_onednn
@pytest.mark.parametrize("shape", [(7, 16), (3, 5, 16), (2, 3, 4, 16)])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_gradients_equal_f_linear(shape, bias, any_size):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen, requires_grad=True)
    w = torch.randn(24, 16, generator=gen, requires_grad=True)
    b = torch.randn(24, generator=gen, requires_grad=True) if bias else None
    g = torch.randn(*shape[:-1], 24, generator=gen)
    y, grads = _grads(linear, x, w, b, g)
    y_ref, grads_ref = _grads(F.linear, x, w, b, g)
    assert y.shape == y_ref.shape and y.is_contiguous()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for a, r in zip(grads, grads_ref):
        assert a.shape == r.shape and a.is_contiguous()
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)
    fn = linear(x, w, b).grad_fn  # ViewBackward of the 2-D oneDNN product, or the product itself
    chain = [fn] + [f for f, _ in fn.next_functions if f is not None]
    assert any("OneDNN" in type(f).__name__ for f in chain)


@needs_onednn
def test_strided_input_no_grad_and_in_place_after(any_size):
    x = torch.randn(5, 4, 16).transpose(0, 1)  # non-contiguous (4, 5, 16)
    w = torch.randn(8, 16)
    with torch.no_grad():
        torch.testing.assert_close(linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
    # The model writes -inf into padded logit columns in place: allowed on our output.
    w.requires_grad_(True)
    y = linear(x, w)
    y[..., 6:] = float("-inf")
    y[..., :6].sum().backward()
    torch.testing.assert_close(w.grad[6:], torch.zeros(2, 16))


def test_falls_back_to_f_linear_for_other_dtypes_and_autocast():
    x, w = torch.randn(3, 16, dtype=torch.bfloat16), torch.randn(8, 16, dtype=torch.bfloat16)
    assert torch.equal(linear(x, w), F.linear(x, w))
    xf, wf = torch.randn(3, 16), torch.randn(8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not kernels._use_onednn(xf, wf)
        assert linear(xf, wf).dtype == torch.bfloat16  # autocast applied, as F.linear would
    assert not kernels._use_onednn(xf.to(torch.float64), wf.to(torch.float64))


def test_small_products_stay_on_f_linear():
    """Small, cache-resident products (under MIN_MACS and MIN_WEIGHT) stay on F.linear, bit for bit."""
    x, w = torch.randn(1, 128, requires_grad=True), torch.randn(384, 128, requires_grad=True)
    assert x.numel() * w.size(0) < kernels.MIN_MACS and w.numel() < kernels.MIN_WEIGHT
    assert torch.equal(linear(x, w), F.linear(x, w))
    assert "OneDNN" not in type(linear(x, w).grad_fn).__name__
    big = torch.randn(64, 768)
    assert kernels._use_onednn(big, torch.randn(768, 768)) == kernels.ONEDNN  # many multiply-adds
    one = torch.randn(1, 768)
    assert kernels._use_onednn(one, torch.randn(768, 768)) == kernels.ONEDNN  # a weight streamed from memory


def test_environment_switch_turns_it_off():
    code = "from gptlab import kernels; print(kernels.ONEDNN)"
    env = dict(os.environ, GPTLAB_ONEDNN="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_linear_module_keeps_nn_linear_parameters():
    m = Linear(16, 8, bias=True)
    assert isinstance(m, torch.nn.Linear)
    assert set(dict(m.named_parameters())) == {"weight", "bias"}
    x = torch.randn(2, 16)
    torch.testing.assert_close(m(x), F.linear(x, m.weight, m.bias), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_training_steps_match_the_f_linear_model(monkeypatch, any_size):
    """Ten AdamW steps of a padded-vocab model with and without oneDNN: the same losses to fp32 rounding."""
    cfg = ModelConfig.from_preset("tiny", vocab_size=97, pad_vocab_multiple=64, bias=True)
    x = torch.randint(0, 97, (4, 17), generator=torch.Generator().manual_seed(0))

    def run(onednn: bool) -> list[float]:
        monkeypatch.setattr(kernels, "ONEDNN", onednn)
        torch.manual_seed(0)
        m = GPT(cfg)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        losses = []
        for _ in range(10):
            opt.zero_grad(set_to_none=True)
            loss = m(x[:, :-1], x[:, 1:])[1]
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    fast, ref = run(True), run(False)
    assert fast[-1] < fast[0] - 0.1  # it learns
    for a, b in zip(fast, ref):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5)
