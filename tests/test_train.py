"""Training end to end on CPU with tiny models: accumulation and DDP equivalence, bit-exact resume after
SIGKILL, atomic checkpoints under a kill during save, NaN stop, SIGTERM / time-limit stop, config errors, CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gptlab.checkpoint import latest_checkpoint, list_checkpoints, load_model_state
from gptlab.config import ConfigError, ModelConfig, resolve_train_config
from gptlab.loading import load_checkpoint
from gptlab.metrics import read_metrics
from gptlab.train import ResumeError, train

TINY = ["--model.n_layer=2", "--model.n_head=2", "--model.n_embd=32", "--model.block_size=32",
        "--eval.eval_tokens=2048", "--eval.sample_every=0", "--logging.progress=false", "--system.device=cpu",
        "--optim.warmup_steps=2", "--optim.lr=1e-2", "--system.threads=1"]


def train_settings(**flags) -> dict:
    """``gptlab train`` flags by name (max_steps=3 is --max-steps 3) -> config keys."""
    from gptlab.commands.train import FLAGS

    key = {name[2:].replace("-", "_"): k for name, k, _ in FLAGS}
    return {key[k]: v for k, v in flags.items()}


def cfg_for(data_dir: Path, out: Path, *extra: str, **flags):
    """The :data:`TINY` run on ``data_dir``; ``extra`` overrides win over TINY's, ``flags`` as train_settings."""
    return resolve_train_config(None, train_settings(data=str(data_dir), out=str(out), **flags), [*TINY, *extra])


FAULT_CLI = str(Path(__file__).with_name("fault_cli.py"))


def run_cli(args: list[str], faults: str = "", timeout: float = 240) -> subprocess.CompletedProcess:
    """``gptlab train ARGS`` in a subprocess; ``faults`` (e.g. ``kill_at_step=10``): see fault_cli.py."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [FAULT_CLI, faults, "--"] if faults else ["-m", "gptlab"]
    return subprocess.run([sys.executable, *launcher, "train", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = latest_checkpoint(run_dir)
    assert ckpt is not None
    return load_model_state(ckpt)


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], exact: bool = True) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            # Adam divides each gradient by its own running RMS, so fp32 summation-order differences in
            # small gradient entries reach the weights at a fraction of lr (1e-2 here) per step.
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=2e-5)


# --------------------------------------------------------------------------- equivalences


# The key bias has an exactly-zero true gradient (softmax ignores a constant shift of the scores), so Adam
# turns its rounding noise into full-size updates; equivalence tests compare models without biases.
NO_BIAS = "--model.bias=false"


def test_grad_accumulation_step_equals_one_big_batch_step(data_dir, tmp_path):
    """One trainer step over 4 micro-batches of 2 sequences moves the weights exactly as one plain PyTorch
    step on the same 8 sequences as one batch. AdamW with a large eps makes the update proportional to the
    gradient (``lr * g / (|g| + eps)``), so a wrong loss scale or a missing micro-batch shows up."""
    from gptlab.data.loader import TokenLoader
    from gptlab.model import GPT

    opt = ["--optim.eps=1.0", "--optim.weight_decay=0", "--optim.grad_clip=0", "--optim.warmup_steps=0",
           "--optim.decay=constant", "--optim.lr=1.0", "--model.dropout=0"]
    cfg = cfg_for(data_dir, tmp_path / "acc", NO_BIAS, *opt, "--batch.batch_tokens=256", "--batch.micro_batch=2",
                  "--checkpoint.every=0", "--eval.eval_every=0", max_steps=1)
    assert cfg.grad_accum_steps(1) == 4
    train(cfg)
    trained = final_weights(tmp_path / "acc")

    # The reference: the same initial weights, the 8 sequences as one batch, torch's own AdamW.
    vocab = json.loads((data_dir / "manifest.json").read_text())["vocab_size"]
    ref = GPT(cfg.model.to_model_config(vocab))
    ref.init_weights(torch.Generator().manual_seed(cfg.system.seed))
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    x, y = TokenLoader(data_dir, "train", 8, cfg.seq_len, shuffle=cfg.data.shuffle, seed=cfg.data.seed).next_batch()
    adamw = torch.optim.AdamW(ref.parameters(), lr=1.0, betas=cfg.optim.betas, eps=1.0, weight_decay=0.0)
    _, loss = ref(x, y)
    loss.backward()
    adamw.step()
    assert train_losses(tmp_path / "acc") == [(1, pytest.approx(loss.item(), rel=1e-6))]
    after = ref.state_dict()
    moved = 0
    for k, w in trained.items():
        # The update, not the weights (atol: rounding of weights ~1e2 times larger than a step).
        torch.testing.assert_close(w - before[k], after[k] - before[k], rtol=1e-4, atol=1e-8,
                                   msg=lambda m, k=k: f"{k}: {m}")
        moved += int((after[k] != before[k]).sum())
    assert moved > 0.9 * sum(v.numel() for v in trained.values())  # nearly every weight took a real step


def _torchrun(args: list[str], nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", "-m", "gptlab", "train", *args],
                          capture_output=True, text=True, env=env, timeout=timeout)


def _ddp_vs_single(data_dir: Path, tmp_path: Path, *extra: str) -> None:
    sched = ["--optim.decay_steps=7", "--batch.batch_tokens=256", "--batch.micro_batch=2", "--eval.eval_every=5",
             "--checkpoint.every=0"]
    common = [*TINY, NO_BIAS, *sched, "--data", str(data_dir), "--out", str(tmp_path / "ddp"), *extra]
    # Two ranks x 2 micro-steps x 2 sequences (no_sync on the first micro-step), 5 steps, then a
    # resumed 2-process run to step 7 (every rank's loader position comes back) ...
    r = _torchrun([*common, "--max-steps", "5"])
    assert r.returncode == 0, r.stderr[-3000:]
    r = _torchrun([*common, "--max-steps", "7", "--resume", "auto"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr
    # ... against one process doing 4 micro-steps over the same 8 sequences per step.
    train(cfg_for(data_dir, tmp_path / "single", NO_BIAS, *sched, max_steps=7))
    assert_same_weights(final_weights(tmp_path / "ddp"), final_weights(tmp_path / "single"), exact=False)
    la, lb = train_losses(tmp_path / "ddp"), train_losses(tmp_path / "single")
    assert [s for s, _ in la] == [s for s, _ in lb] == list(range(1, 8))
    for (_, x), (_, y) in zip(la, lb):
        assert x == pytest.approx(y, rel=1e-5)
    va = [r["val_loss"] for r in read_metrics(tmp_path / "ddp" / "metrics.jsonl") if r["kind"] == "val"]
    vb = [r["val_loss"] for r in read_metrics(tmp_path / "single" / "metrics.jsonl") if r["kind"] == "val"]
    assert len(va) == 2 and va == pytest.approx(vb, rel=1e-5)  # steps 5 and 7
    meta = json.loads((latest_checkpoint(tmp_path / "ddp") / "meta.json").read_text())
    assert meta["world_size"] == 2 and len(meta["loaders"]) == 2
    # Resuming a 2-process run with 1 process is refused.
    with pytest.raises(ResumeError, match="world size 2"):
        train(cfg_for(data_dir, tmp_path / "ddp", "--batch.batch_tokens=256", "--batch.micro_batch=4",
                      "--checkpoint.every=0", max_steps=8, resume="auto"))


@pytest.mark.slow
def test_ddp_two_gloo_processes_equal_one_process(data_dir, tmp_path):
    _ddp_vs_single(data_dir, tmp_path)


@pytest.mark.slow
def test_fsdp2_two_gloo_processes_equal_one_process(data_dir, tmp_path):
    _ddp_vs_single(data_dir, tmp_path, "--system.fsdp=true")


# --------------------------------------------------------------------------- crash safety and resume

RESUME_ARGS = [*TINY, "--max-steps", "12", "--checkpoint-every", "4", "--model.dropout=0.1", "--data.shuffle=true",
               "--batch.batch_tokens=256", "--batch.micro_batch=4", "--eval.eval_every=6",
               "--checkpoint.keep_last=0"]


@pytest.mark.slow
def test_sigkill_and_kill_during_save_resume_bit_exact(data_dir, tmp_path):
    """A run SIGKILLed mid-run (or mid-save) and resumed logs the same losses and ends with the same weights."""
    base = [*RESUME_ARGS, "--data", str(data_dir)]
    ref = tmp_path / "ref"
    r = run_cli([*base, "--out", str(ref)])
    assert r.returncode == 0, r.stderr[-3000:]
    ref_losses = train_losses(ref)
    assert [s for s, _ in ref_losses] == list(range(1, 13))

    # Killed after logging step 10 (last checkpoint: step 8): resume replays 9 and 10.
    run = tmp_path / "killed"
    r = run_cli([*base, "--out", str(run)], faults="kill_at_step=10")
    assert r.returncode == -signal.SIGKILL
    assert latest_checkpoint(run).name == "step_00000008"
    assert max(s for s, _ in train_losses(run)) == 10
    r = run_cli([*base, "--out", str(run), "--resume", "auto"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr
    assert train_losses(run) == ref_losses  # bit-identical, replayed steps included, no duplicates
    assert_same_weights(final_weights(run), final_weights(ref))
    vals = lambda d: [(x["step"], x["val_loss"]) for x in read_metrics(d / "metrics.jsonl") if x["kind"] == "val"]
    assert vals(run) == vals(ref)

    # Killed in the middle of writing checkpoint 8: the partial save is ignored, step 4 stays loadable.
    run2 = tmp_path / "killed_in_save"
    r = run_cli([*base, "--out", str(run2)], faults="kill_in_save=8")
    assert r.returncode == -signal.SIGKILL
    assert [p.name for p in list_checkpoints(run2)] == ["step_00000004"]
    assert any(p.name.startswith(".tmp-step_00000008") for p in (run2 / "checkpoints").iterdir())
    model, tok, meta = load_checkpoint(run2)
    assert meta["step"] == 4 and tok is not None
    r = run_cli([*base, "--out", str(run2), "--resume", "auto"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert train_losses(run2) == ref_losses
    assert_same_weights(final_weights(run2), final_weights(ref))
    assert not any(p.name.startswith(".tmp-") for p in (run2 / "checkpoints").iterdir())


def test_nan_loss_stops_before_the_update_and_keeps_last_checkpoint(data_dir, tmp_path, capsys):
    from fault_cli import install_faults

    from gptlab.cli import main

    out = tmp_path / "nan"
    remove = install_faults("nan_at_step=6")
    try:
        rc = main(["train", "--data", str(data_dir), "--out", str(out), "--max-steps", "10", "--checkpoint-every", "4",
                   *TINY, "--batch.batch_tokens=128", "--batch.micro_batch=4", "--eval.eval_every=0"])
    finally:
        remove()
    assert rc == 1
    err = capsys.readouterr().err
    assert "step 6: loss is nan" in err and "Last good checkpoint: step 4" in err
    assert [p.name for p in list_checkpoints(out)] == ["step_00000004"]
    assert max(s for s, _ in train_losses(out)) == 5  # step 6 was never applied nor logged
    model, _, meta = load_checkpoint(out)
    assert meta["step"] == 4
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # Resuming continues from the good checkpoint.
    s = train(cfg_for(data_dir, out, "--batch.batch_tokens=128", "--batch.micro_batch=4", "--eval.eval_every=0",
                      max_steps=7, resume="auto", checkpoint_every=4))
    assert s["steps"] == 7


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_checkpoints_and_exits_zero(data_dir, tmp_path, sig):
    out = tmp_path / "term"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "gptlab", "train", *TINY, "--data", str(data_dir), "--out", str(out),
                          "--max-steps", "100000", "--checkpoint-every", "0", "--eval.eval_every=0",
                          "--batch.batch_tokens=128", "--batch.micro_batch=4"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(train_losses(out)) < 3:
            time.sleep(0.2)
        assert len(train_losses(out)) >= 3
        p.send_signal(sig)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err[-2000:]
    assert f"{sig.name}: stopping after this step" in err
    last = max(s for s, _ in train_losses(out))
    assert latest_checkpoint(out).name == f"step_{last:08d}"
    assert last < 100000


def test_time_limit_stops_cleanly(data_dir, tmp_path):
    s = train(cfg_for(data_dir, tmp_path / "tl", "--system.time_limit=0.0001", "--eval.eval_every=1000",
                      "--batch.batch_tokens=128", "--batch.micro_batch=4", max_steps=100000, checkpoint_every=0))
    assert s["stopped"] == "time_limit"
    assert 1 <= s["steps"] < 1000
    assert latest_checkpoint(tmp_path / "tl").name == f"step_{s['steps']:08d}"
    # a stop checkpoints at once: no validation pass that was not due
    kinds = [json.loads(line)["kind"] for line in (tmp_path / "tl" / "metrics.jsonl").read_text().splitlines()]
    assert "val" not in kinds and s["val_loss"] is None


# --------------------------------------------------------------------------- config and resume errors


def test_config_errors(data_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"batch.batch_tokens=1000 is not a multiple .* use e\.g\."):
        train(cfg_for(data_dir, tmp_path / "a", "--batch.batch_tokens=1000", "--batch.micro_batch=4"))
    with pytest.raises(ConfigError, match="seq_len=64 exceeds model.block_size=32"):
        cfg_for(data_dir, tmp_path / "a", "--batch.seq_len=64")
    with pytest.raises(ConfigError, match="did you mean 'warmup_steps'"):
        cfg_for(data_dir, tmp_path / "a", "--optim.warmup_step=3")
    with pytest.raises(ConfigError, match="unknown key 'optimm'"):
        cfg_for(data_dir, tmp_path / "a", "--optimm.lr=3")
    with pytest.raises(ConfigError, match="no such recipe.*did you mean 'quickstart'"):
        resolve_train_config("quickstrat")
    with pytest.raises(ConfigError, match="optim.decay='cosin'"):
        cfg_for(data_dir, tmp_path / "a", "--optim.decay=cosin")
    with pytest.raises(ConfigError, match="model.vocab_size=10 is below the dataset"):
        train(cfg_for(data_dir, tmp_path / "a", "--model.vocab_size=10", "--batch.batch_tokens=128",
                      "--batch.micro_batch=4", max_steps=1))


def test_resume_rules(data_dir, tmp_path):
    small = ["--batch.batch_tokens=128", "--batch.micro_batch=4", "--eval.eval_every=0"]
    out = tmp_path / "r"
    # --resume auto on an empty dir starts fresh.
    assert train(cfg_for(data_dir, out, *small, max_steps=2, resume="auto"))["steps"] == 2
    # A second plain run would clobber the first: refused.
    with pytest.raises(ResumeError, match="--resume auto"):
        train(cfg_for(data_dir, out, *small, max_steps=4))
    # A different model cannot continue this run.
    with pytest.raises(ResumeError, match="model.n_layer: 2 -> 3"):
        train(cfg_for(data_dir, out, *small, "--model.n_layer=3", max_steps=4, resume="auto"))
    # Progress without any complete checkpoint: --resume auto starts fresh (and says so), as llm.c does,
    # so a scheduler restarting a job that died before its first checkpoint recovers (issue 11, d6).
    for c in list_checkpoints(out):
        (c / "COMPLETE").unlink()
    s = train(cfg_for(data_dir, out, *small, max_steps=2, resume="auto"))
    assert s["steps"] == 2 and [st for st, _ in train_losses(out)] == [1, 2]
    # --resume never starts over explicitly.
    s = train(cfg_for(data_dir, out, *small, max_steps=3, resume="never"))
    assert s["steps"] == 3 and [st for st, _ in train_losses(out)] == [1, 2, 3]


# --------------------------------------------------------------------------- recipes and the CLI


def test_recipes_resolve():
    from importlib import resources

    names = sorted(p.name[:-5] for p in resources.files("gptlab").joinpath("configs").iterdir()
                   if p.name.endswith(".toml"))
    assert {"gpt2-124m-fineweb-edu", "gpt2-124m-openwebtext", "shakespeare-char", "shakespeare-char-cpu",
            "finetune-shakespeare", "tinystories", "quickstart"} <= set(names)
    for n in names:
        cfg = resolve_train_config(n)
        assert cfg.name == n
        cfg.grad_accum_steps(1)
    g = resolve_train_config("gpt2-124m-fineweb-edu")
    assert (g.batch.batch_tokens, g.batch.micro_batch, g.seq_len, g.grad_accum_steps(8)) == (524288, 64, 1024, 1)
    assert (g.optim.lr, g.optim.final_lr, g.optim.warmup_steps, g.schedule.max_steps) == (6e-4, pytest.approx(6e-5),
                                                                                          715, 19073)
    assert g.model.to_model_config().padded_vocab_size == 50304 and g.optim.betas == (0.9, 0.95)
    c = resolve_train_config("shakespeare-char-cpu")  # inherits shakespeare-char, then overrides
    assert (c.model.n_layer, c.model.n_head, c.model.n_embd, c.model.block_size, c.batch.micro_batch) == (4, 4, 128, 64, 12)
    assert (c.schedule.max_steps, c.optim.decay_steps, c.model.dropout, c.model.bias) == (2000, 2000, 0.0, False)
    assert (c.optim.lr, c.optim.min_lr, c.optim.betas[1], c.optim.warmup_steps) == (1e-3, 1e-4, 0.99, 100)


def test_cli_end_to_end_with_toml_and_precedence(tmp_path):
    """TOML < flags < --section.key=value; automatic prepare of the recipe's dataset; then sample from it."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("to be or not to be that is the question\n" * 400, encoding="utf-8")
    toml = tmp_path / "mine.toml"
    toml.write_text(f"""
name = "mine"
[model]
n_layer = 1
n_head = 2
n_embd = 32
block_size = 32
[data]
dataset = "text"
input = "{corpus}"
dir = "{tmp_path / 'prepared'}"
tokenizer = "char"
[batch]
batch_tokens = 128
micro_batch = 4
[schedule]
max_steps = 50
[eval]
eval_every = 2
eval_tokens = 256
sample_every = 3
sample_prompt = "to be"
sample_tokens = 8
[system]
device = "cpu"
""", encoding="utf-8")
    out = tmp_path / "run"
    r = run_cli(["--config", str(toml), "--out", str(out), "--max-steps", "5", "--schedule.max_steps=4", "--json"])
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout)
    assert summary["steps"] == 4 and summary["run_dir"] == str(out)
    assert "world size 1" in r.stderr and "grad-accum" in r.stderr and "param group decay" in r.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["schedule"]["max_steps"] == 4 and cfg["model"]["n_layer"] == 1 and cfg["model"]["vocab_size"] > 0
    assert json.loads((out / "tokenizer.json").read_text())["type"] == "char"
    recs = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in recs if r["kind"] == "train"] == [1, 2, 3, 4]
    assert [r["step"] for r in recs if r["kind"] == "val"] == [2, 4]
    assert [r["step"] for r in recs if r["kind"] == "sample"][:1] == [3]
    t = next(r for r in recs if r["kind"] == "train")
    assert {"loss", "lr", "grad_norm", "dt_ms", "tokens_per_s"} <= t.keys()
    assert "=== step 3 sample 0 ===\nto be" in (out / "samples.txt").read_text()
    s = subprocess.run([sys.executable, "-m", "gptlab", "sample", "--init", str(out), "--prompt", "to",
                        "--max-new-tokens", "5", "--json"], capture_output=True, text=True, timeout=120)
    assert s.returncode == 0, s.stderr[-2000:]


def test_init_from_a_run_takes_its_architecture_and_weights(data_dir, tmp_path):
    """model.init (here a gptlab run dir, via gptlab.loading) seeds the weights; with lr 0 they stay equal."""
    small = ["--batch.batch_tokens=128", "--batch.micro_batch=4", "--eval.eval_every=0"]
    train(cfg_for(data_dir, tmp_path / "a", *small, max_steps=3))
    s = train(cfg_for(data_dir, tmp_path / "b", *small, "--model.n_layer=5", "--optim.lr=0", "--optim.warmup_steps=0",
                      max_steps=2, init=str(tmp_path / "a")))
    assert s["steps"] == 2
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    assert cfg["model"]["n_layer"] == 2 and cfg["model"]["init"] == str(tmp_path / "a")
    assert_same_weights(final_weights(tmp_path / "a"), final_weights(tmp_path / "b"))


def test_cli_accepts_space_separated_overrides(capsys):
    from gptlab.cli import main

    # parsed as --optim.lr=1e-3 (not an argparse error, exit 2), then the unknown recipe is reported
    assert main(["train", "--config", "no-such-recipe", "--optim.lr", "1e-3"]) == 1
    assert "no such recipe" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_errors_reach_every_rank(data_dir, tmp_path):
    """A refusal decided on rank 0 (resume rules) stops every rank promptly with exit != 0."""
    common = [*TINY, "--data", str(data_dir), "--max-steps", "2", "--batch.batch_tokens=256",
              "--batch.micro_batch=2", "--eval.eval_every=0", "--out", str(tmp_path / "run")]
    assert _torchrun(common).returncode == 0
    r = _torchrun(common, timeout=180)
    assert r.returncode != 0 and "--resume auto" in r.stderr
    # A NaN loss on rank 1 only stops both ranks before the update (the logged loss is all-reduced).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nan_run = [*common[:-1], str(tmp_path / "nan"), "--checkpoint-every", "1"]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        FAULT_CLI, "nan_at_step=2,nan_rank=1", "--", "train", *nan_run],
                       capture_output=True, text=True, env=env, timeout=180)
    assert r.returncode != 0 and "step 2: loss is nan" in r.stderr
    assert [p.name for p in list_checkpoints(tmp_path / "nan")] == ["step_00000001"]


@pytest.mark.gpu
def test_cuda_bf16_compiled_training_evaluates_samples_and_resumes(data_dir, tmp_path):
    """On a GPU: bf16 autocast, fused AdamW, torch.compile for training with the uncompiled model for
    evaluation and sampling, MFU in the metrics; then a resume continues from the checkpoint."""
    args = ["--system.device=cuda", "--system.compile=true", "--batch.batch_tokens=256", "--batch.micro_batch=4",
            "--eval.eval_every=2", "--eval.sample_every=2", "--eval.sample_prompt=the", "--eval.sample_tokens=8"]
    out = tmp_path / "gpu"
    s = train(cfg_for(data_dir, out, *args, max_steps=4, checkpoint_every=2))
    assert s["steps"] == 4
    recs = read_metrics(out / "metrics.jsonl")
    train_recs = [r for r in recs if r["kind"] == "train"]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train_recs)
    assert [r["step"] for r in recs if r["kind"] == "val"] == [2, 4]
    assert any(r["kind"] == "sample" for r in recs)
    meta = json.loads((latest_checkpoint(out) / "meta.json").read_text())
    assert meta["config"]["system"]["compile"] is True
    s = train(cfg_for(data_dir, out, *args, max_steps=6, checkpoint_every=2, resume="auto"))
    assert s["steps"] == 6 and [r["step"] for r in read_metrics(out / "metrics.jsonl")
                                if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]


def test_cpu_compiled_training_equals_eager(data_dir, tmp_path, monkeypatch):
    """--system.compile on CPU compiles each block in place (inductor, one graph for all blocks): the same
    losses and weights as the eager run to fp32 rounding, checkpoints under the plain names, and a resume."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    args = ["--batch.batch_tokens=128", "--batch.micro_batch=4", "--eval.eval_every=0", "--model.dropout=0"]
    train(cfg_for(data_dir, tmp_path / "eager", *args, max_steps=4, checkpoint_every=2))
    from torch._dynamo.utils import counters

    counters.clear()
    train(cfg_for(data_dir, tmp_path / "comp", *args, "--system.compile=true", max_steps=4, checkpoint_every=2))
    assert counters["stats"]["unique_graphs"] >= 1  # it did compile
    losses = {k: [r["loss"] for r in read_metrics(tmp_path / k / "metrics.jsonl") if r["kind"] == "train"]
              for k in ("eager", "comp")}
    assert losses["comp"] == pytest.approx(losses["eager"], rel=1e-5)
    eager, comp = final_weights(tmp_path / "eager"), final_weights(tmp_path / "comp")
    assert eager.keys() == comp.keys()  # no _orig_mod. prefixes
    for k in eager:  # AdamW scales each gradient to ~lr per step, so near-zero ones carry fp32 noise: 1% of lr
        torch.testing.assert_close(comp[k], eager[k], rtol=1e-4, atol=1e-4)
    s = train(cfg_for(data_dir, tmp_path / "comp", *args, "--system.compile=true", max_steps=6, checkpoint_every=2,
                      resume="auto"))
    assert s["steps"] == 6


def test_cpu_compile_without_a_compiler_trains_eager_with_a_warning(monkeypatch, tmp_path, capsys):
    """A recipe that compiles on CPU must still run where no C++ compiler is installed: eager, said once."""
    from gptlab.model import GPT
    from gptlab.runtime import compile_for_training

    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no g++, c++ or clang++
    monkeypatch.delenv("CXX", raising=False)
    model = GPT(ModelConfig.from_preset("tiny"))
    assert compile_for_training(model, torch.device("cpu")) is model
    assert all(getattr(b, "_compiled_call_impl", None) is None for b in model.transformer.h)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs a C++ compiler" in err and "training eager" in err


def test_hellaswag_during_training_matches_a_separate_evaluation(tmp_path, capsys):
    """eval.hellaswag_every scores the current weights: the last step's numbers equal a fresh evaluation of
    the saved final checkpoint; a missing HellaSwag file only warns."""
    from gptlab.data.prepare import prepare_dataset
    from gptlab.evals.hellaswag import evaluate_hellaswag, load_hellaswag

    corpus = tmp_path / "c.txt"
    corpus.write_text("The cat sat on the mat. A woman is in a kitchen. She mixes flour and sugar.\n" * 300)
    prepare_dataset("text", input=str(corpus), out=tmp_path / "bpe", progress=False)  # GPT-2 BPE
    examples = [{"ctx": "A woman is in a kitchen. She", "label": i % 4,
                 "endings": ["mixes flour and sugar.", "jumps out of a plane.", "drives a tractor.", "sat on the mat."]}
                for i in range(3)]
    hs = tmp_path / "hs.jsonl"
    hs.write_text("".join(json.dumps(e) + "\n" for e in examples))
    out = tmp_path / "run"
    small = ["--batch.batch_tokens=128", "--batch.micro_batch=4", "--eval.eval_every=0",
             f"--eval.hellaswag_input={hs}", "--eval.hellaswag_every=2"]
    train(cfg_for(tmp_path / "bpe", out, *small, max_steps=4))
    recs = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "hellaswag"]
    assert [r["step"] for r in recs] == [2, 4] and all(r["n"] == 3 for r in recs)
    model, tok, _ = load_checkpoint(out)
    ref = evaluate_hellaswag(model, load_hellaswag(str(hs)), tok, device=torch.device("cpu"))
    assert (recs[-1]["acc"], recs[-1]["acc_norm"]) == (ref["acc"], ref["acc_norm"])
    capsys.readouterr()
    train(cfg_for(tmp_path / "bpe", tmp_path / "run2", *small[:-2], f"--eval.hellaswag_input={tmp_path / 'nope.jsonl'}",
                  "--eval.hellaswag_every=2", max_steps=2))
    assert "HellaSwag evaluation is off" in capsys.readouterr().err


def test_muon_training_resumes_exactly(data_dir, tmp_path):
    """optim.optimizer=muon trains, and its state (momentum buffers + AdamW moments) round-trips a checkpoint."""
    pytest.importorskip("gptlab.muon")
    small = ["--batch.batch_tokens=128", "--batch.micro_batch=4", "--eval.eval_every=0", "--optim.optimizer=muon",
             "--optim.decay_steps=4", "--checkpoint.keep_last=0"]
    train(cfg_for(data_dir, tmp_path / "ref", *small, max_steps=4, checkpoint_every=2))
    train(cfg_for(data_dir, tmp_path / "res", *small, max_steps=2, checkpoint_every=2))
    train(cfg_for(data_dir, tmp_path / "res", *small, max_steps=4, checkpoint_every=2, resume="auto"))
    assert train_losses(tmp_path / "res") == train_losses(tmp_path / "ref")
    assert_same_weights(final_weights(tmp_path / "res"), final_weights(tmp_path / "ref"))
    losses = [x for _, x in train_losses(tmp_path / "ref")]
    assert losses[-1] < losses[0]


def test_a_registered_eval_runs_when_due_on_the_current_weights(data_dir, tmp_path, monkeypatch):
    """A new in-training eval is one class: registered, it runs every ``every_key`` steps and after the last,
    on the weights of that step, and its records land in metrics.jsonl under its name."""
    from gptlab.evals import registry

    class WeightNorm(registry.Eval):
        name = "weight_norm"

        @classmethod
        def every(cls, cfg):  # instead of an every_key (an [eval] config field)
            return 3

        def run(self, model, ctx):
            return [{"norm": float(torch.sqrt(sum((p.detach() ** 2).sum() for p in model.parameters())))}]

    monkeypatch.setitem(registry._REGISTRY, WeightNorm.name, WeightNorm)
    out = tmp_path / "run"
    train(cfg_for(data_dir, out, "--batch.batch_tokens=128", "--batch.micro_batch=4", "--eval.eval_every=2",
                  "--checkpoint.every=0", max_steps=7))
    recs = read_metrics(out / "metrics.jsonl")
    assert [(r["kind"], r["step"]) for r in recs if r["kind"] != "train"] == [
        ("val", 2), ("weight_norm", 3), ("val", 4), ("val", 6), ("weight_norm", 6), ("val", 7), ("weight_norm", 7)]
    final = final_weights(out)  # a tied head is stored once, as the model holds it once
    want = float(torch.sqrt(sum((w ** 2).sum() for w in final.values())))
    assert recs[-1]["norm"] == pytest.approx(want, rel=1e-6)
