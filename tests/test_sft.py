"""Supervised fine-tuning through the trainer: ``--config sft-tiny --init BASE`` end to end on a tiny base."""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

import pytest
import torch

from gptlab.config import resolve_train_config
from gptlab.metrics import read_metrics
from gptlab.train import train
from test_train import cfg_for, train_settings


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """A character-level base model trained for a few steps on text holding every letter, ' ' and ':'."""
    from gptlab.data.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("base")
    rng = random.Random(0)
    text = "\n".join(" ".join("".join(rng.choices(string.ascii_lowercase, k=rng.randint(1, 7)))
                              for _ in range(rng.randint(3, 9))) + ":" for _ in range(600))
    (root / "corpus.txt").write_text(text + "\n", encoding="utf-8")
    prepare_dataset("text", input=str(root / "corpus.txt"), out=root / "chars", tokenizer="char", progress=False)
    train(cfg_for(root / "chars", root / "run", "--model.block_size=48", "--eval.eval_tokens=0",
                  "--batch.micro_batch=4", "--batch.seq_len=32", "--batch.batch_tokens=128",
                  "--model.pad_vocab_multiple=1", max_steps=4))
    return root / "run"


def sft_cfg(base: Path, out: Path, data_home: Path, *extra: str, **flags):
    flags = train_settings(init=str(base), out=str(out), **flags)
    return resolve_train_config("sft-tiny", flags, ["--logging.progress=false", "--system.threads=1",
                                                    "--data.task_examples=300", "--eval.chat_eval_n=10",
                                                    "--batch.micro_batch=4", "--batch.batch_tokens=192",
                                                    "--batch.seq_len=48", *extra])


def test_sft_tiny_end_to_end(base_run, tmp_path, monkeypatch):
    from gptlab.chat import ChatTemplate, has_chat_tokens
    from gptlab.data.shards import read_manifest, verify_dataset
    from gptlab.loading import load_model

    monkeypatch.setenv("GPTLAB_DATA_HOME", str(tmp_path / "home"))
    out = tmp_path / "sft"
    summary = train(sft_cfg(base_run, out, tmp_path / "home", "--eval.chat_eval_every=2", max_steps=4, eval_every=2))
    assert summary["steps"] == 4
    # the data: generated conversations, rendered with the base's tokenizer + chat tokens, in 48-token rows
    data_dirs = [d for d in (tmp_path / "home").iterdir() if d.is_dir() and not d.name.startswith(".")]
    assert len(data_dirs) == 1 and data_dirs[0].name.startswith("chat-reverse-n300-s0-") and data_dirs[0].name.endswith("-T48")
    m = read_manifest(data_dirs[0])
    base_model, base_tok = load_model(base_run)
    assert m["tokenizer"] == {**base_tok.spec(), "chat": True} and m["chat"]["seq_len"] == 48
    assert verify_dataset(data_dirs[0])["ok"]
    assert sum(1 for _ in open(data_dirs[0].with_name(data_dirs[0].name + ".conversations.jsonl"))) == 300
    # metrics: masked val loss and held-out exact match at steps 2 and 4
    recs = read_metrics(out / "metrics.jsonl")
    chat = [r for r in recs if r["kind"] == "chat_eval"]
    assert [r["step"] for r in chat] == [2, 4] and all(r["n"] == 10 and 0 <= r["accuracy"] <= 1 for r in chat)
    assert [r["step"] for r in recs if r["kind"] == "val"] == [2, 4]
    # the fine-tuned model: six more real tokens, the base's weights elsewhere, a chat tokenizer
    model, tok = load_model(out)
    assert model.config.vocab_size == base_model.config.vocab_size + 6 and has_chat_tokens(tok)
    assert json.loads((out / "tokenizer.json").read_text())["chat"] is True
    ChatTemplate.for_tokenizer(tok)  # gptlab chat / serve can render conversations for it
    # resume continues the same run
    summary = train(sft_cfg(base_run, out, tmp_path / "home", "--eval.chat_eval_every=2", max_steps=6,
                            eval_every=2, resume="auto"))
    assert summary["steps"] == 6
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "chat_eval"] == [2, 4, 6]


def test_sft_tiny_rows_start_every_question_at_position_zero(base_run, tmp_path):
    """The recipe's rows hold one whole task conversation each, so every training question sits at position 0,
    where a chat starts. Packed 64-token rows put almost no short question there, and the model (learned
    positions) then got every held-out 3-letter question wrong (BENCHMARKS.md "Chat: SFT demo")."""
    from gptlab.chat import write_conversations
    from gptlab.data.prepare import prepare_chat
    from gptlab.evals.chat import MAX_LETTERS, MIN_LETTERS, task_conversations
    from gptlab.loading import load_model

    cfg = resolve_train_config("sft-tiny", train_settings(init=str(base_run)), [])
    _, tok = load_model(base_run)  # characters, like the demo's shakespeare-char base: one token per character
    convs = task_conversations(400, cfg.data.seed, task=cfg.data.task)
    assert {len(c[0]["content"].split()) - 1 for c in convs} == set(range(MIN_LETTERS, MAX_LETTERS + 1))
    write_conversations(tmp_path / "c.jsonl", convs)
    res = prepare_chat("chat", input=tmp_path / "c.jsonl", out=tmp_path / "d", tokenizer=tok, seq_len=cfg.seq_len,
                       val_fraction=0.1, progress=False)
    info = res["chat"]
    for split in ("train", "val"):
        assert info[f"{split}_rows"] == info[f"{split}_conversations"] > 0 and info[f"{split}_cropped"] == 0


def test_sft_val_loss_counts_assistant_tokens_only(base_run, tmp_path, monkeypatch):
    """The trainer's val loss equals a loss computed independently from the rendered conversations."""
    from gptlab.chat import ChatTemplate
    from gptlab.data.loader import TokenLoader
    from gptlab.data.shards import read_manifest, read_shard, shard_paths
    from gptlab.loading import load_model

    monkeypatch.setenv("GPTLAB_DATA_HOME", str(tmp_path / "home"))
    out = tmp_path / "sft"
    train(sft_cfg(base_run, out, tmp_path / "home", max_steps=2, eval_every=2))
    val = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "val"][-1]["val_loss"]
    data = next(d for d in (tmp_path / "home").iterdir() if d.is_dir() and not d.name.startswith("."))
    m = read_manifest(data)
    model, tok = load_model(out)
    t = ChatTemplate.for_tokenizer(tok)
    n_rows = TokenLoader(data, "val", 4, 48).batches_per_epoch * 4
    # reference: per row, cross-entropy at positions whose target is inside an assistant reply
    toks = torch.tensor(read_shard(shard_paths(data, "val", m)[0]).astype("int64"))
    losses, per_target = [], []
    with torch.no_grad():
        for r in range(0, n_rows, 4):
            x = torch.stack([toks[i * 48:i * 48 + 48] for i in range(r, r + 4)])
            nxt = torch.stack([toks[i * 48 + 1:i * 48 + 49] for i in range(r, r + 4)])
            logits, _ = model(x)
            keep = torch.zeros_like(nxt, dtype=torch.bool)
            for b in range(4):
                inside = False
                for i in range(48):
                    if x[b, i].item() == t.start["assistant"]:
                        inside = True
                    keep[b, i] = inside
                    if nxt[b, i].item() == t.stop_id:
                        inside = False
            ce = torch.nn.functional.cross_entropy(logits[keep].float(), nxt[keep], reduction="none")
            losses.append(ce.mean().item())
            per_target.append(ce)
    assert val == pytest.approx(sum(losses) / len(losses), rel=1e-4)  # the trainer: mean of batch means
    # gptlab eval loss: the same targets, weighted per token
    from gptlab.evals.loss import evaluate_loss

    res = evaluate_loss(model, data, split="val", tokens=n_rows * 48, batch_size=4, tokenizer=tok)
    assert res["tokens"] == sum(len(c) for c in per_target)
    assert res["loss"] == pytest.approx(torch.cat(per_target).mean().item(), rel=1e-5)


@pytest.mark.slow
def test_sft_two_gloo_processes_equal_one_process(base_run, tmp_path, monkeypatch):
    """DDP on chat data: 2 ranks x 2 micro-batches with the masked loss give one process's 4 micro-batches."""
    import os
    import subprocess
    import sys

    from test_train import assert_same_weights, final_weights, train_losses

    monkeypatch.setenv("GPTLAB_DATA_HOME", str(tmp_path / "home"))
    common = ["--batch.micro_batch=2", "--batch.batch_tokens=384", "--checkpoint.every=0", "--eval.eval_every=4",
              "--eval.chat_eval_every=4"]
    single = train(sft_cfg(base_run, tmp_path / "single", tmp_path / "home", *common, max_steps=4))
    # prepared by the single run: the same rows for both
    data = next(d for d in (tmp_path / "home").iterdir() if d.is_dir() and not d.name.startswith("."))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "gptlab", "train", "--config", "sft-tiny", "--init", str(base_run), "--data", str(data),
                        "--out", str(tmp_path / "ddp"), "--max-steps", "4", "--logging.progress=false",
                        "--system.threads=1", "--eval.chat_eval_n=10", "--batch.seq_len=48", *common],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert single["steps"] == 4
    assert_same_weights(final_weights(tmp_path / "ddp"), final_weights(tmp_path / "single"), exact=False)
    for (sa, a), (sb, b) in zip(train_losses(tmp_path / "ddp"), train_losses(tmp_path / "single")):
        assert sa == sb and a == pytest.approx(b, rel=1e-5)
    chat = [[(x["step"], x["accuracy"]) for x in read_metrics(d / "metrics.jsonl") if x["kind"] == "chat_eval"]
            for d in (tmp_path / "ddp", tmp_path / "single")]
    assert chat[0] == chat[1] and len(chat[0]) == 1
