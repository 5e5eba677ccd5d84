"""The CPU kernel choice: every candidate equals F.linear (outputs and gradients), the measured choice is
cached per machine, apply_cpu_kernels keeps the model's parameters, and fallbacks stay F.linear."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from gptlab import kernels
from gptlab.config import ModelConfig
from gptlab.kernels import TunedLinear, apply_cpu_kernels, linear
from gptlab.model import GPT

needs_onednn = pytest.mark.skipif(not kernels.onednn_available(), reason="oneDNN linear not in this torch build")


@pytest.fixture
def auto(monkeypatch, tmp_path):
    """Measuring on, a fresh cache directory, nothing remembered in memory."""
    monkeypatch.setenv("GPTLAB_ONEDNN", "auto")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    kernels.clear_choices()
    yield tmp_path / "cache" / "gptlab" / "kernels.json"
    kernels.clear_choices()


def _run(fn, x, w, b, g):
    for t in (x, w, b):
        if t is not None:
            t.grad = None
    y = fn(x, w, b)
    y.backward(g)
    return y.detach(), [t.grad.clone() for t in (x, w, b) if t is not None]


@needs_onednn
@pytest.mark.parametrize("candidate", sorted(kernels.CANDIDATES))
@pytest.mark.parametrize("shape", [(7, 16), (3, 5, 16), (2, 3, 4, 16)])
@pytest.mark.parametrize("bias", [True, False])
def test_each_candidate_equals_f_linear(candidate, shape, bias, monkeypatch, auto):
    """Forced to one library for all three products: outputs and every gradient equal F.linear's."""
    monkeypatch.setattr(kernels, "FORCE", candidate)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen, requires_grad=True)
    w = torch.randn(24, 16, generator=gen, requires_grad=True)
    b = torch.randn(24, generator=gen, requires_grad=True) if bias else None
    g = torch.randn(*shape[:-1], 24, generator=gen)
    y, grads = _run(linear, x, w, b, g)
    y_ref, grads_ref = _run(F.linear, x, w, b, g)
    assert y.shape == y_ref.shape and y.is_contiguous()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    assert len(grads) == len(grads_ref)
    for a, r in zip(grads, grads_ref):
        assert a.shape == r.shape
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(linear(x, w, b), y_ref, rtol=1e-5, atol=1e-5)
    assert "TunedLinear" in type(linear(x, w, b).grad_fn.next_functions[0][0]).__name__
    assert not auto.exists()  # forced: nothing measured


@needs_onednn
def test_choice_is_measured_once_and_cached_per_machine(auto, monkeypatch):
    x = torch.randn(40, 32, requires_grad=True)
    w = torch.randn(48, 32, requires_grad=True)
    y = linear(x, w)
    y.sum().backward()
    torch.testing.assert_close(y, F.linear(x, w), rtol=1e-5, atol=1e-5)
    saved = json.loads(auto.read_text())
    entries = saved[kernels.machine_key()]
    kinds = sorted(k.split()[0] for k in entries)
    assert kinds == ["fwd", "grad_in", "grad_w"]  # each product of the step measured once
    for rec in entries.values():
        assert rec["choice"] in kernels.CANDIDATES
        assert rec["choice"] == min(kernels.CANDIDATES, key=lambda n: rec[f"{n}_us"])
    # A new process (memory cleared) takes the choices from the file: no timing at all.
    kernels.clear_choices()

    def no_timing(*a, **k):
        raise AssertionError("measured again although the cache has the shape")

    monkeypatch.setattr(kernels, "_time_candidates", no_timing)
    linear(torch.randn(40, 32, requires_grad=True), w).sum().backward()
    # The file decides: flip every choice and the flipped one is used.
    flipped = {k: {**v, "choice": "f.linear" if v["choice"] == "onednn" else "onednn"} for k, v in entries.items()}
    auto.write_text(json.dumps({kernels.machine_key(): flipped}))
    kernels.clear_choices()
    assert kernels.choose("fwd", torch.randn(40, 32), w.detach()) == flipped[
        next(k for k in flipped if k.startswith("fwd"))]["choice"]
    # Another CPU model or torch version has its own entries: measured afresh.
    auto.write_text(json.dumps({"Some Other CPU | torch 0.0": entries}))
    kernels.clear_choices()
    with pytest.raises(AssertionError, match="measured again"):
        linear(torch.randn(40, 32), w.detach())


def test_forced_choices_and_unwritable_cache(monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # a file where the directory should be
    for env, want in (("0", "f.linear"), ("1", "onednn" if kernels.onednn_available() else "f.linear")):
        monkeypatch.setenv("GPTLAB_ONEDNN", env)
        kernels.clear_choices()
        assert kernels.choose("fwd", torch.randn(4, 8), torch.randn(3, 8)) == want
    monkeypatch.setenv("GPTLAB_ONEDNN", "auto")
    kernels.clear_choices()
    x, w = torch.randn(4, 8), torch.randn(3, 8)
    torch.testing.assert_close(linear(x, w), F.linear(x, w))  # measured, cache not writable: still fine
    kernels.clear_choices()


def test_apply_swaps_modules_and_keeps_parameters(monkeypatch, tiny_config):
    monkeypatch.setenv("GPTLAB_ONEDNN", "1")
    model = GPT(tiny_config)
    before = {k: v.data_ptr() for k, v in model.state_dict().items()}
    params = [id(p) for p in model.parameters()]
    assert apply_cpu_kernels(model) is model
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is TunedLinear for m in linears)
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == before  # same names, same storage
    assert [id(p) for p in model.parameters()] == params
    assert model.lm_head.weight is model.transformer.wte.weight  # tying kept
    assert model.transformer.h[0].attn.c_proj.residual_proj


@pytest.mark.parametrize("case", ["env-off", "bf16", "meta"])
def test_apply_is_a_no_op_off_cpu_fp32(case, monkeypatch, tiny_config):
    monkeypatch.setenv("GPTLAB_ONEDNN", "0" if case == "env-off" else "1")
    if case == "meta":
        with torch.device("meta"):
            model = GPT(tiny_config)
    else:
        model = GPT(tiny_config).to(torch.bfloat16 if case == "bf16" else torch.float32)
    apply_cpu_kernels(model)
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))


def test_falls_back_to_f_linear_for_other_dtypes_and_autocast(monkeypatch):
    monkeypatch.setattr(kernels, "FORCE", "onednn")
    x, w = torch.randn(3, 16, dtype=torch.bfloat16), torch.randn(8, 16, dtype=torch.bfloat16)
    assert torch.equal(linear(x, w), F.linear(x, w))
    xf, wf = torch.randn(3, 16, requires_grad=True), torch.randn(8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = linear(xf, wf)
        assert y.dtype == torch.bfloat16  # autocast applied, as F.linear would
        assert "TunedLinear" not in type(y.grad_fn).__name__


@needs_onednn
def test_in_place_write_after_the_product(monkeypatch):
    """The model writes -inf into padded logit columns in place: allowed on the output, grad mode or not."""
    monkeypatch.setattr(kernels, "FORCE", "onednn")
    x = torch.randn(5, 4, 16).transpose(0, 1)  # non-contiguous (4, 5, 16)
    w = torch.randn(8, 16, requires_grad=True)
    y = linear(x, w)
    y[..., 6:] = float("-inf")
    y[..., :6].sum().backward()
    torch.testing.assert_close(w.grad[6:], torch.zeros(2, 16))


@needs_onednn
@pytest.mark.parametrize("candidate", sorted(kernels.CANDIDATES))
def test_training_steps_match_the_plain_model(candidate, monkeypatch):
    """Ten AdamW steps of a padded-vocab model on each candidate and on plain nn.Linear: the same losses
    to fp32 rounding, and the same final weights."""
    cfg = ModelConfig.from_preset("tiny", vocab_size=97, pad_vocab_multiple=64, bias=True)
    x = torch.randint(0, 97, (4, 17), generator=torch.Generator().manual_seed(0))
    monkeypatch.setenv("GPTLAB_ONEDNN", "1")

    def run(tuned: bool) -> tuple[list[float], dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        m = GPT(cfg)
        if tuned:
            apply_cpu_kernels(m)
            monkeypatch.setattr(kernels, "FORCE", candidate)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        losses = []
        for _ in range(10):
            opt.zero_grad(set_to_none=True)
            loss = m(x[:, :-1], x[:, 1:])[1]
            loss.backward()
            opt.step()
            losses.append(loss.item())
        monkeypatch.setattr(kernels, "FORCE", None)
        return losses, m.state_dict()

    (fast, w_fast), (ref, w_ref) = run(True), run(False)
    assert fast[-1] < fast[0] - 0.1  # it learns
    assert fast == pytest.approx(ref, rel=1e-4, abs=1e-5)
    for k in w_ref:
        torch.testing.assert_close(w_fast[k], w_ref[k], rtol=1e-3, atol=1e-4)


def test_compiled_training_traces_through_tuned_layers(monkeypatch, tiny_config):
    """torch.compile of a kernel-swapped model: one graph (no break), products as F.linear, same loss."""
    monkeypatch.setenv("GPTLAB_ONEDNN", "1")
    torch.manual_seed(0)
    model = apply_cpu_kernels(GPT(tiny_config))
    x = torch.randint(0, tiny_config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    eager = model(x[:, :-1], x[:, 1:])[1]
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    loss = compiled(x[:, :-1], x[:, 1:])[1]
    loss.backward()
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-5)
    assert model.lm_head.weight.grad is not None


@needs_onednn
def test_train_command_runs_on_the_measured_kernels(auto, tmp_path, tiny_corpus, capsys):
    """`gptlab train` on CPU swaps the layers in (the call site): its products are measured and cached."""
    from gptlab.cli import main
    from gptlab.data.prepare import prepare_dataset

    prepare_dataset("text", input=str(tiny_corpus), out=tmp_path / "d", tokenizer="char", progress=False)
    assert main(["train", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "run"), "--max-steps", "2",
                 "--model.n_layer=1", "--model.n_head=2", "--model.n_embd=32", "--model.block_size=16",
                 "--batch.batch_tokens=64", "--batch.micro_batch=4", "--eval.eval_every=0", "--eval.sample_every=0",
                 "--logging.progress=false", "--system.device=cpu", "--system.threads=1"]) == 0
    entries = json.loads(auto.read_text())[kernels.machine_key()]
    # 64 rows of 32 features into the fused q/k/v projection (96), forward and both gradients.
    assert {"fwd rows<=64 N=96 K=32 bias=1 threads=1", "grad_in rows<=64 N=32 K=96 bias=0 threads=1",
            "grad_w rows<=128 N=32 K=64 bias=0 threads=1"} <= set(entries)


@needs_onednn
@pytest.mark.parametrize("slow", ["tuned", "f.linear"])
def test_step_probe_keeps_whichever_runs_the_step_faster(slow, auto, tiny_config):
    """The per-shape choices stay only if the whole pass is faster with them; the verdict is cached and a
    second model with the same signature reuses it without probing. The probe runs the real model and is
    made slower on one side (a sleep) so that the outcome is known in advance."""
    import time

    def make_probe(model, calls):
        x = torch.randint(0, tiny_config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))

        def probe():
            calls.append(kernels.FORCE)
            model(x[:, :-1], x[:, 1:])[1].backward()
            model.zero_grad(set_to_none=True)
            if (kernels.FORCE == "f.linear") == (slow == "f.linear"):
                time.sleep(0.02)
        return probe

    calls: list = []
    model = GPT(tiny_config)
    apply_cpu_kernels(model, make_probe(model, calls), signature="test-sig")
    kept = slow == "f.linear"
    assert all(type(m) is (TunedLinear if kept else nn.Linear) for m in model.modules() if isinstance(m, nn.Linear))
    assert "f.linear" in calls and None in calls  # both sides timed
    entry = json.loads(auto.read_text())[kernels.machine_key()]
    step = entry[f"step test-sig threads={torch.get_num_threads()}"]
    assert step["choice"] == ("tuned" if kept else "f.linear")
    assert (step["tuned_ms"] < step["f.linear_ms"]) == kept
    kernels.clear_choices()  # from the file now
    calls2: list = []
    model2 = GPT(tiny_config)
    apply_cpu_kernels(model2, make_probe(model2, calls2), signature="test-sig")
    assert calls2 == []
    assert all(type(m) is (TunedLinear if kept else nn.Linear) for m in model2.modules() if isinstance(m, nn.Linear))


def test_training_probe_leaves_no_trace(tiny_config):
    """The trainer's probe: a real forward + backward pass that leaves no gradients and does not move the
    global generator, even with dropout (a run must not depend on whether the cache was warm)."""
    cfg = ModelConfig.from_preset("tiny", vocab_size=tiny_config.vocab_size, dropout=0.2)
    model = GPT(cfg).train()
    probe, signature = kernels.training_probe(model, batch=2, seq_len=8)
    state = torch.get_rng_state()
    probe()
    assert torch.equal(torch.get_rng_state(), state)
    assert all(p.grad is None for p in model.parameters())
    assert "B=2 T=8" in signature and signature != kernels.training_probe(GPT(tiny_config), 2, 8)[1]
    assert kernels.training_probe(model, batch=2, seq_len=8)[0] is not None
    big = int(kernels.PROBE_MAX_FLOP / (6 * model.num_params())) + 1  # tokens past the budget: no probe
    assert kernels.training_probe(model, batch=big, seq_len=1) == (None, "")
