"""TokenLoader: order vs a plain-Python reference, rank disjointness, shuffling, exact resume, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gptlab.data import shards as S
from gptlab.data.loader import TokenLoader
from gptlab.errors import GptlabError

VOCAB = 65536


def make_dataset(path, train=(50, 37, 81, 8, 64), val=(40,)):
    """Shards whose tokens are all distinct (token = global position), so a token names its place."""
    path.mkdir(parents=True, exist_ok=True)
    entries, base, shard_tokens = [], 0, {}
    for split, sizes in (("train", train), ("val", val)):
        for i, n in enumerate(sizes):
            toks = np.arange(base, base + n)
            base += n
            name = f"t_{split}_{i:06d}.bin"
            sha = S.write_shard(path / name, toks, VOCAB)
            entries.append({"file": name, "split": split, "tokens": n, "sha256": sha})
            shard_tokens.setdefault(split, []).append(toks)
    S.write_manifest(path, S.build_manifest(dataset="t", tokenizer_spec={"type": "gpt2"}, vocab_size=VOCAB,
                                            eot_id=None, shards=entries))
    return shard_tokens


def reference_sequences(shard_tokens, T):
    """Every (T+1)-token sample, shard by shard, in order: what an unshuffled epoch walks through."""
    return [toks[s * T:s * T + T + 1].tolist() for toks in shard_tokens for s in range((len(toks) - 1) // T)]


def rows(x, y):
    return [xr + [yr[-1]] for xr, yr in zip(x.tolist(), y.tolist())]


def test_sequential_order_matches_reference_across_shards_and_epochs(tmp_path):
    data = make_dataset(tmp_path)
    B, T = 3, 8
    seqs = reference_sequences(data["train"], T)
    per_epoch = len(seqs) // B
    loader = TokenLoader(tmp_path, "train", B, T)
    assert loader.num_sequences == len(seqs) and loader.batches_per_epoch == per_epoch
    assert loader.tokens_per_epoch == per_epoch * B * T and loader.num_tokens == sum(map(len, data["train"]))
    spans_two_shards = False
    for step in range(int(2.5 * per_epoch)):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        k = step % per_epoch
        assert rows(x, y) == seqs[k * B:(k + 1) * B], step
        firsts = [r[0] for r in rows(x, y)]
        spans_two_shards |= len({np.searchsorted(np.cumsum([len(t) for t in data["train"]]), f, "right")
                                 for f in firsts}) > 1
    assert spans_two_shards and loader.epoch == 2


@pytest.mark.parametrize("shuffle", [False, True])
def test_ranks_are_disjoint_and_together_equal_one_process(tmp_path, shuffle):
    make_dataset(tmp_path)
    B, T, W = 2, 8, 2
    ranks = [TokenLoader(tmp_path, "train", B, T, rank=r, world_size=W, shuffle=shuffle, seed=3) for r in range(W)]
    single = TokenLoader(tmp_path, "train", B * W, T, shuffle=shuffle, seed=3)
    for _ in range(3 * single.batches_per_epoch):
        parts = [rows(*ld.next_batch()) for ld in ranks]
        assert parts[0] + parts[1] == rows(*single.next_batch())
        assert not {tuple(r) for r in parts[0]} & {tuple(r) for r in parts[1]}


def test_shuffle_is_a_seeded_permutation_per_epoch(tmp_path):
    data = make_dataset(tmp_path, train=(41, 33, 57, 25, 49, 81))
    B, T = 2, 8
    all_seqs = {tuple(s) for s in reference_sequences(data["train"], T)}
    loader = TokenLoader(tmp_path, "train", B, T, shuffle=True, seed=1)
    epochs = []
    for _ in range(3):
        seen = [tuple(r) for _ in range(loader.batches_per_epoch) for r in rows(*loader.next_batch())]
        assert len(set(seen)) == len(seen) == loader.batches_per_epoch * B
        assert set(seen) <= all_seqs
        epochs.append(seen)
    assert epochs[0] != epochs[1] != epochs[2]
    sequential = [tuple(s) for s in reference_sequences(data["train"], T)][:len(epochs[0])]
    assert epochs[0] != sequential
    again = TokenLoader(tmp_path, "train", B, T, shuffle=True, seed=1)
    assert [tuple(r) for _ in range(again.batches_per_epoch) for r in rows(*again.next_batch())] == epochs[0]
    other = TokenLoader(tmp_path, "train", B, T, shuffle=True, seed=2)
    assert [tuple(r) for _ in range(other.batches_per_epoch) for r in rows(*other.next_batch())] != epochs[0]


@pytest.mark.parametrize("shuffle", [False, True])
def test_restored_loader_yields_exactly_the_same_batches(tmp_path, shuffle):
    make_dataset(tmp_path)
    B, T, W = 2, 8, 2
    probe = TokenLoader(tmp_path, "train", B, T, world_size=W)
    n = probe.batches_per_epoch
    for k in (0, 1, n - 1, n, n + 3, 2 * n + 1):  # inside, at and across epoch (and shard) boundaries
        for rank in range(W):
            a = TokenLoader(tmp_path, "train", B, T, rank=rank, world_size=W, shuffle=shuffle, seed=7)
            for _ in range(k):
                a.next_batch()
            state = json.loads(json.dumps(a.state_dict()))
            b = TokenLoader(tmp_path, "train", B, T, rank=rank, world_size=W, shuffle=shuffle, seed=7)
            b.load_state_dict(state)
            for _ in range(n + 2):
                xa, ya = a.next_batch()
                xb, yb = b.next_batch()
                assert torch.equal(xa, xb) and torch.equal(ya, yb), (k, rank)


def test_val_is_sequential_even_with_shuffle_and_reset_repeats_it(tmp_path):
    data = make_dataset(tmp_path, val=(30, 30))
    T = 4
    seqs = reference_sequences(data["val"], T)
    loader = TokenLoader(tmp_path, "val", 2, T, shuffle=True, seed=5)
    assert not loader.shuffle
    first = [rows(*loader.next_batch()) for _ in range(5)]
    assert [r for b in first for r in b] == seqs[:10]
    loader.reset()
    assert [rows(*loader.next_batch()) for _ in range(5)] == first


def test_glob_of_llmc_shards(tmp_path):
    data = make_dataset(tmp_path)
    loader = TokenLoader(str(tmp_path / "t_train_*.bin"), "train", 4, 8)
    assert rows(*loader.next_batch()) == reference_sequences(data["train"], 8)[:4]


def test_clear_errors(tmp_path):
    make_dataset(tmp_path, train=(50, 37), val=())
    with pytest.raises(GptlabError, match=r"no 'val' split in manifest.json \(splits: train\)"):
        TokenLoader(tmp_path, "val", 1, 8)
    with pytest.raises(GptlabError, match=r"seq_len 64 is longer than the data: the largest shard has 50 tokens"):
        TokenLoader(tmp_path, "train", 1, 64)
    with pytest.raises(GptlabError, match=r"only 10 sequences of 9 tokens .* one batch needs 12 \(batch_size 6 x world_size 2\)"):
        TokenLoader(tmp_path, "train", 6, 8, world_size=2)
    with pytest.raises(GptlabError, match=r"rank 2 must be in \[0, world_size=2\)"):
        TokenLoader(tmp_path, "train", 1, 8, rank=2, world_size=2)
    loader = TokenLoader(tmp_path, "train", 1, 8)
    state = loader.state_dict()
    with pytest.raises(GptlabError, match="saved with seq_len=8 but this loader has seq_len=4"):
        TokenLoader(tmp_path, "train", 1, 4).load_state_dict(state)
    with pytest.raises(GptlabError, match="saved with shuffle=False"):
        TokenLoader(tmp_path, "train", 1, 8, shuffle=True).load_state_dict(state)
    with pytest.raises(GptlabError, match="nope: not found: no dataset directory or .bin shard matches"):
        TokenLoader(tmp_path / "nope", "train", 1, 8)


def test_corrupt_shard_is_named(tmp_path):
    make_dataset(tmp_path)
    p = tmp_path / "t_train_000001.bin"
    p.write_bytes(p.read_bytes()[:-2])
    with pytest.raises(GptlabError, match=r"t_train_000001.bin: shard truncated"):
        TokenLoader(tmp_path, "train", 1, 8)
    make_dataset(tmp_path)
    m = json.loads((tmp_path / "manifest.json").read_text())
    m["shards"][0]["tokens"] = 49
    S.write_manifest(tmp_path, m)  # re-written by gptlab: checksum and fingerprints follow the edit
    with pytest.raises(GptlabError, match=r"t_train_000000.bin: header has 50 tokens but manifest.json says 49"):
        TokenLoader(tmp_path, "train", 1, 8)


@pytest.mark.gpu
def test_cuda_batches_match_cpu(tmp_path):
    make_dataset(tmp_path)
    cpu = TokenLoader(tmp_path, "train", 4, 8, shuffle=True)
    gpu = TokenLoader(tmp_path, "train", 4, 8, shuffle=True, device="cuda")
    for _ in range(10):
        (xc, yc), (xg, yg) = cpu.next_batch(), gpu.next_batch()
        assert xg.is_cuda and yg.is_cuda and xg.is_contiguous()
        assert torch.equal(xc, xg.cpu()) and torch.equal(yc, yg.cpu())
