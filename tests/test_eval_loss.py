"""Validation loss of any model: the documented windows, against transformers' own forward pass."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gptlab.cli import main
from gptlab.data import shards as S
from gptlab.evals.loss import EvalLossError, evaluate_loss

BLOCK = 64
VAL_SHARDS = (300, 200)  # (300-1)//64 = 4 and (200-1)//64 = 3 windows of 64


def _write_dataset(root, *, spec=None, vocab=50257, seed=0):
    rng = np.random.default_rng(seed)
    entries = []
    for i, (split, n) in enumerate([("val", VAL_SHARDS[0]), ("val", VAL_SHARDS[1]), ("train", 500)]):
        toks = rng.integers(0, vocab, size=n)
        name = f"{split}_{i:06d}.bin"
        entries.append({"file": name, "split": split, "tokens": n, "sha256": S.write_shard(root / name, toks, vocab)})
    S.write_manifest(root, S.build_manifest(dataset="test", tokenizer_spec=spec or {"type": "gpt2"},
                                            vocab_size=vocab, eot_id=50256 if vocab == 50257 else None,
                                            shards=entries))
    return root


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return _write_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def hf_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    # A wide init makes per-window losses differ a lot, so a shifted window cannot go unnoticed.
    cfg = GPT2Config(vocab_size=50257, n_positions=BLOCK, n_embd=32, n_layer=2, n_head=2, initializer_range=0.2)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def model(hf_model):
    from gptlab.loading import from_hf_model

    return from_hf_model(hf_model, device="cpu").eval()


def _raw_tokens(path):
    """Shard tokens read with plain numpy (header: 256 int32, then uint16)."""
    return np.fromfile(path, dtype="<u2", offset=256 * 4).astype(np.int64)


@torch.no_grad()
def _reference(hf, data_dir, n_windows, T=BLOCK):
    """Mean loss over the first n_windows windows [s*T, s*T+T+1) of each val shard, in order."""
    losses = []
    for i in range(len(VAL_SHARDS)):
        arr = _raw_tokens(data_dir / f"val_{i:06d}.bin")
        for s in range((len(arr) - 1) // T):
            w = torch.from_numpy(arr[s * T: s * T + T + 1])
            logits = hf(w[None, :-1]).logits[0].double()  # (T, V)
            losses.append(F.cross_entropy(logits, w[1:], reduction="none"))
    return torch.cat(losses[:n_windows]).mean().item(), [x.mean().item() for x in losses]


def test_matches_transformers_on_documented_windows(hf_model, model, data_dir):
    want_all, per_window = _reference(hf_model, data_dir, 7)
    assert np.std(per_window) > 0.05  # windows are distinguishable
    res = evaluate_loss(model, data_dir, batch_size=3, device="cpu")
    assert (res["windows"], res["tokens"], res["seq_len"], res["split"]) == (7, 7 * BLOCK, BLOCK, "val")
    assert res["loss"] == pytest.approx(want_all, rel=1e-5)
    # tokens=N scores the first N // T windows; a batch that straddles shards is fine.
    want5, _ = _reference(hf_model, data_dir, 5)
    res5 = evaluate_loss(model, data_dir, tokens=5 * BLOCK + 10, batch_size=2, device="cpu")
    assert (res5["windows"], res5["tokens"]) == (5, 5 * BLOCK)
    assert res5["loss"] == pytest.approx(want5, rel=1e-5)
    assert res5["perplexity"] == pytest.approx(np.exp(want5), rel=1e-5)


def test_shorter_seq_len(hf_model, model, data_dir):
    T = 32
    losses = []
    for i in range(len(VAL_SHARDS)):
        arr = _raw_tokens(data_dir / f"val_{i:06d}.bin")
        for s in range((len(arr) - 1) // T):
            w = torch.from_numpy(arr[s * T: s * T + T + 1])
            with torch.no_grad():
                losses.append(F.cross_entropy(hf_model(w[None, :-1]).logits[0].double(), w[1:], reduction="none"))
    res = evaluate_loss(model, data_dir, seq_len=T, device="cpu")
    assert res["windows"] == len(losses) == 299 // 32 + 199 // 32
    assert res["loss"] == pytest.approx(torch.cat(losses).mean().item(), rel=1e-5)


def test_windows_are_the_token_loaders(data_dir):
    from gptlab.data.loader import TokenLoader

    loader = TokenLoader(data_dir, "val", batch_size=1, seq_len=BLOCK)
    raw = [_raw_tokens(data_dir / f"val_{i:06d}.bin") for i in range(2)]
    want = [r[s * BLOCK: s * BLOCK + BLOCK + 1] for r in raw for s in range((len(r) - 1) // BLOCK)]
    for w in want:
        x, y = loader.next_batch()
        assert x[0].tolist() == w[:-1].tolist() and y[0].tolist() == w[1:].tolist()


def test_cli_with_a_hugging_face_dir(hf_model, data_dir, tmp_path, capsys):
    hf_dir = tmp_path / "hf"
    hf_model.save_pretrained(hf_dir)
    want, _ = _reference(hf_model, data_dir, 3)
    rc = main(["eval", "loss", "--init", str(hf_dir), "--data", str(data_dir), "--tokens", str(3 * BLOCK),
               "--device", "cpu", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["task"] == "loss" and out["tokens"] == 3 * BLOCK and out["windows"] == 3
    assert out["loss"] == pytest.approx(want, rel=1e-5)
    # Asking for more than the split holds is a one-line error.
    rc = main(["eval", "loss", "--init", str(hf_dir), "--data", str(data_dir), "--tokens", "100000",
               "--device", "cpu", "--json"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "--tokens 100000" in err and "\n" not in err


def test_tokenizer_mismatch_and_bad_requests(model, data_dir, tmp_path):
    from gptlab.tokenizer import CharTokenizer, GPT2Tokenizer

    chars = _write_dataset(tmp_path / "chars", spec={"type": "char", "chars": [chr(97 + i) for i in range(26)]},
                           vocab=26)
    with pytest.raises(EvalLossError, match="vocabulary has 26 tokens"):
        evaluate_loss(model, chars, device="cpu")
    with pytest.raises(EvalLossError, match="char tokenizer"):
        evaluate_loss(model, chars, device="cpu", tokenizer=GPT2Tokenizer())
    # Same vocabulary size, different tokenizer: caught by the spec when the model's tokenizer is known.
    other = CharTokenizer([chr(i) for i in range(0x100, 0x100 + 50257)])
    with pytest.raises(EvalLossError, match="different char tokenizer"):
        evaluate_loss(model, data_dir, device="cpu", tokenizer=other)
    assert evaluate_loss(model, data_dir, tokens=BLOCK, device="cpu", tokenizer=GPT2Tokenizer())["windows"] == 1
    with pytest.raises(EvalLossError, match="at least one window"):
        evaluate_loss(model, data_dir, tokens=BLOCK - 1, device="cpu")
    with pytest.raises(EvalLossError, match="seq_len 65"):
        evaluate_loss(model, data_dir, seq_len=BLOCK + 1, device="cpu")
    with pytest.raises(EvalLossError, match="no 'test' split"):
        evaluate_loss(model, data_dir, split="test", device="cpu")
    with pytest.raises(S.ShardError, match="not found"):
        evaluate_loss(model, tmp_path / "missing", device="cpu")


def _seeded_model_loss(data_dir: str) -> dict:
    """The loss of a seeded random model on ``data_dir`` (under torch.distributed: all ranks together)."""
    from gptlab.config import ModelConfig
    from gptlab.model import GPT

    torch.manual_seed(0)
    m = GPT(ModelConfig(block_size=BLOCK, vocab_size=50257, n_layer=1, n_head=2, n_embd=16, init_std=0.2))
    return evaluate_loss(m, data_dir, batch_size=2, device="cpu")


@pytest.mark.slow
def test_ddp_sharded_loss_equals_single_process(data_dir, tmp_path):
    from dist_util import run_on_gloo_ranks

    single = _seeded_model_loss(str(data_dir))
    for res in run_on_gloo_ranks(_seeded_model_loss, 2, tmp_path, str(data_dir)):
        assert (res["tokens"], res["windows"]) == (single["tokens"], single["windows"])
        assert res["loss"] == pytest.approx(single["loss"], rel=1e-6)
