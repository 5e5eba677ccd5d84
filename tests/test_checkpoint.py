"""Checkpoint files: atomic save, completeness marker, pruning, RNG capture, weights-only loading."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from gptlab.checkpoint import (
    COMPLETE, CheckpointError, capture_rng_state, latest_checkpoint, list_checkpoints, load_model_state,
    load_training_state, prune_checkpoints, restore_rng_state, save_checkpoint,
)
from gptlab.config import ModelConfig, to_dict
from gptlab.loading import LoadError, load_checkpoint, materialize
from gptlab.model import GPT


def _trained_model_and_optimizer(cfg: ModelConfig):
    torch.manual_seed(0)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    for _ in range(2):
        _, loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _save(run_dir, step, model, opt, **meta):
    return save_checkpoint(run_dir, step, model_state=model.state_dict(), tied=model.config.tie_embeddings,
                           optimizer_state=opt.state_dict(), rng_states=[capture_rng_state()],
                           meta={"model_config": to_dict(model.config), "tokenizer": {"type": "gpt2"}, **meta})


@pytest.mark.parametrize("tied", [True, False])
def test_roundtrip_model_optimizer_and_tied_weights(tmp_path, tied):
    cfg = ModelConfig.from_preset("tiny", tie_embeddings=tied)
    model, opt = _trained_model_and_optimizer(cfg)
    path = _save(tmp_path, 7, model, opt)
    assert path.name == "step_00000007" and (path / COMPLETE).is_file()
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert ("lm_head.weight" in f.keys()) is (not tied)  # the tied matrix is stored once
    loaded, tok, meta = load_checkpoint(tmp_path)
    assert meta["step"] == 7 and tok is not None and tok.name == "gpt2"
    assert (loaded.lm_head.weight is loaded.transformer.wte.weight) is tied
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    x = torch.randint(0, 256, (1, 8))
    model.eval()
    assert torch.equal(model(x)[0], loaded(x)[0])
    # optimizer and RNG load with weights_only=True and restore the optimizer exactly
    state = load_training_state(path)
    opt2 = torch.optim.AdamW(loaded.parameters(), lr=1e-3)
    opt2.load_state_dict(state["optimizer"])
    for (a, b) in zip(opt.state.values(), opt2.state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    torch.load(path / "optimizer.pt", weights_only=True)
    torch.load(path / "rng.pt", weights_only=True)


def test_rng_capture_restore_replays_every_generator():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal()  # a cached Gaussian in numpy's state
    random.gauss(0, 1)
    state = capture_rng_state()
    # through a weights-only save/load, as a checkpoint does
    import io

    buf = io.BytesIO()
    torch.save({"ranks": [state]}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)["ranks"][0]
    a = (random.random(), random.gauss(0, 1), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    restore_rng_state(state)
    b = (random.random(), random.gauss(0, 1), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    assert a == b


def test_incomplete_checkpoints_do_not_exist(tmp_path):
    cfg = ModelConfig.from_preset("tiny")
    model, opt = _trained_model_and_optimizer(cfg)
    _save(tmp_path, 1, model, opt)
    p2 = _save(tmp_path, 2, model, opt)
    (p2 / COMPLETE).unlink()  # as if killed between rename and marker
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000001"]
    assert latest_checkpoint(tmp_path).name == "step_00000001"
    with pytest.raises(CheckpointError, match="incomplete"):
        load_checkpoint(p2)
    # saving the same step again replaces the leftover
    p2b = _save(tmp_path, 2, model, opt)
    assert p2b == p2 and (p2 / COMPLETE).is_file()
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_checkpoint(tmp_path / "empty_run")
    with pytest.raises(CheckpointError, match="no such"):
        load_checkpoint(tmp_path / "missing")


def test_kill_during_save_keeps_previous_checkpoint(tmp_path):
    """A real SIGKILL in the middle of a save (after the weights file) leaves a hidden partial dir only."""
    cfg = ModelConfig.from_preset("tiny")
    model, opt = _trained_model_and_optimizer(cfg)
    _save(tmp_path, 1, model, opt)
    script = textwrap.dedent(f"""
        import os, signal
        import torch
        from gptlab import hooks
        from gptlab.checkpoint import save_checkpoint, capture_rng_state
        from gptlab.config import ModelConfig, to_dict
        from gptlab.model import GPT
        m = GPT(ModelConfig.from_preset("tiny"))
        hooks.install("checkpoint_partial", lambda step, path: os.kill(os.getpid(), signal.SIGKILL))
        save_checkpoint({str(tmp_path)!r}, 2, model_state=m.state_dict(), tied=True, optimizer_state={{}},
                        rng_states=[capture_rng_state()], meta={{"model_config": to_dict(m.config)}})
    """)
    r = subprocess.run([sys.executable, "-c", script], timeout=120)
    assert r.returncode == -9
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000001"]
    leftovers = [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    assert len(leftovers) == 1
    loaded, _, meta = load_checkpoint(tmp_path)
    assert meta["step"] == 1
    assert torch.equal(loaded.transformer.wte.weight, model.transformer.wte.weight)
    prune_checkpoints(tmp_path, keep_last=2, keep_best=False)
    assert not any(p.name.startswith(".tmp-") for p in (tmp_path / "checkpoints").iterdir())


def test_prune_keeps_last_k_and_best(tmp_path):
    cfg = ModelConfig.from_preset("tiny")
    model, opt = _trained_model_and_optimizer(cfg)
    for step, val in [(1, 3.0), (2, 1.5), (3, 2.0), (4, 2.5), (5, None)]:
        _save(tmp_path, step, model, opt, val_loss=val)
    removed = prune_checkpoints(tmp_path, keep_last=2, keep_best=True)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002", "step_00000004", "step_00000005"]
    assert len(removed) == 2
    prune_checkpoints(tmp_path, keep_last=1, keep_best=False)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000005"]
    prune_checkpoints(tmp_path, keep_last=0, keep_best=False)  # 0 keeps everything
    assert len(list_checkpoints(tmp_path)) == 1


def test_materialize_rejects_mismatched_weights(tmp_path):
    model, opt = _trained_model_and_optimizer(ModelConfig.from_preset("tiny"))
    path = _save(tmp_path, 1, model, opt)
    with pytest.raises(LoadError, match=r"do not match the model \(missing \['transformer\.h\.2\."):
        materialize(ModelConfig.from_preset("tiny", n_layer=3), load_model_state(path))
    with pytest.raises(LoadError, match=r"shape mismatch for transformer\.h\.0\.attn\.c_attn\.bias \(192,\) "
                                        r"\(expected \(288,\)\)"):
        materialize(ModelConfig.from_preset("tiny", n_embd=96), load_model_state(path))
    meta = json.loads((path / "meta.json").read_text())
    assert meta["step"] == 1 and "saved_at" in meta
