"""Shard format (llm.c-compatible header, uint16/uint32), manifest, and every corruption check."""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest

from gptlab.data import shards as S
from gptlab.errors import GptlabError


def _llmc_shard(path, tokens, magic=20240520, version=1, dtype="<u2", count=None):
    """Write a shard the way llm.c's data_common.write_datafile lays it out (independent reference)."""
    header = struct.pack("<256i", magic, version, len(tokens) if count is None else count, *([0] * 253))
    path.write_bytes(header + np.asarray(tokens, dtype=dtype).tobytes())


def _dataset(tmp_path, splits=(("train", [10, 20]), ("val", [7])), vocab=1000):
    rng = np.random.default_rng(0)
    entries = []
    for split, sizes in splits:
        for i, n in enumerate(sizes):
            name = f"d_{split}_{i:06d}.bin"
            sha = S.write_shard(tmp_path / name, rng.integers(0, vocab, n), vocab)
            entries.append({"file": name, "split": split, "tokens": n, "sha256": sha})
    S.write_manifest(tmp_path, S.build_manifest(dataset="d", tokenizer_spec={"type": "gpt2"}, vocab_size=vocab,
                                                eot_id=None, shards=entries))
    return entries


def test_uint16_roundtrip_matches_llmc_layout(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 50257, 1000)
    p = tmp_path / "a.bin"
    sha = S.write_shard(p, tokens.tolist(), 50257)
    ref = tmp_path / "ref.bin"
    _llmc_shard(ref, tokens)
    assert p.read_bytes() == ref.read_bytes()
    assert sha == hashlib.sha256(p.read_bytes()).hexdigest()
    mm = S.read_shard(p)
    assert mm.dtype == np.uint16 and np.array_equal(np.asarray(mm), tokens)
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")]  # no temp file left behind


def test_uint32_for_large_vocab(tmp_path):
    tokens = np.array([0, 65535, 65536, 100_255], dtype=np.int64)
    p = tmp_path / "b.bin"
    S.write_shard(p, tokens, 100_256 + 1)
    header = np.fromfile(p, dtype="<i4", count=3)
    assert header.tolist() == [S.MAGIC_U32, S.VERSION_U32, 4]
    assert p.stat().st_size == 1024 + 4 * 4
    mm = S.read_shard(p)
    assert mm.dtype == np.uint32 and mm.tolist() == tokens.tolist()


def test_reads_llmc_written_shards(tmp_path):
    p = tmp_path / "fineweb_val_000000.bin"
    _llmc_shard(p, [50256, 1, 2, 3])
    assert S.read_shard(p).tolist() == [50256, 1, 2, 3]
    S.write_shard(tmp_path / "empty.bin", [], 10)
    assert S.read_shard(tmp_path / "empty.bin").size == 0 and (tmp_path / "empty.bin").stat().st_size == 1024


def test_write_rejects_out_of_vocab_ids(tmp_path):
    with pytest.raises(GptlabError, match=r"x.bin: token id 1000 is outside the vocabulary \[0, 1000\)"):
        S.write_shard(tmp_path / "x.bin", [1, 1000], 1000)
    with pytest.raises(GptlabError, match="outside the vocabulary"):
        S.write_shard(tmp_path / "x.bin", [-1], 1000)
    assert not list(tmp_path.iterdir())


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(S.os, "replace", boom)
    with pytest.raises(OSError):
        S.write_shard(tmp_path / "x.bin", [1, 2, 3], 10)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("case, match", [
    ("magic", r"bad magic number 12345: not a token shard"),
    ("version", r"unsupported shard version 3 for magic 20240520"),
    ("truncated", r"shard truncated: header says 100 tokens \(1224 bytes\) but the file has 1100 bytes"),
    ("trailing", r"shard has trailing bytes"),
    ("short", r"smaller than the 1024-byte header"),
])
def test_corrupt_headers_are_named_errors(tmp_path, case, match):
    p = tmp_path / f"{case}.bin"
    if case == "magic":
        _llmc_shard(p, range(100), magic=12345)
    elif case == "version":
        _llmc_shard(p, range(100), version=3)
    elif case == "truncated":
        _llmc_shard(p, range(100))
        p.write_bytes(p.read_bytes()[:1100])
    elif case == "trailing":
        _llmc_shard(p, range(100))
        p.write_bytes(p.read_bytes() + b"\0\0")
    else:
        p.write_bytes(b"\0" * 100)
    with pytest.raises(GptlabError, match=match) as e:
        S.read_shard(p)
    assert str(p) in str(e.value)


def test_manifest_roundtrip_and_verify(tmp_path):
    entries = _dataset(tmp_path)
    m = S.read_manifest(tmp_path)
    assert m["shards"] == entries and m["vocab_size"] == 1000 and m["dtype"] == "uint16"
    assert m["splits"] == {"train": {"tokens": 30, "shards": 2}, "val": {"tokens": 7, "shards": 1}}
    assert [p.name for p in S.shard_paths(tmp_path, "train")] == ["d_train_000000.bin", "d_train_000001.bin"]
    res = S.verify_dataset(tmp_path)
    assert res["ok"] and res["splits"] == m["splits"] and res["shards_checked"] == 3


def test_verify_detects_sha_mismatch(tmp_path):
    _dataset(tmp_path)
    p = tmp_path / "d_train_000001.bin"
    data = bytearray(p.read_bytes())
    data[-1] ^= 0x01  # flip one token bit: header and size still fine
    p.write_bytes(bytes(data))
    S.verify_dataset(tmp_path, check_hash=False)
    with pytest.raises(GptlabError, match=r"d_train_000001.bin: sha256 .* does not match manifest.json"):
        S.verify_dataset(tmp_path)


def test_verify_detects_token_out_of_vocab(tmp_path):
    _dataset(tmp_path)
    p = tmp_path / "d_val_000000.bin"
    _llmc_shard(p, [1, 2, 999, 4000, 5, 6, 7])
    m = json.loads((tmp_path / "manifest.json").read_text())
    for s in m["shards"]:
        if s["file"] == p.name:
            s["sha256"] = hashlib.sha256(p.read_bytes()).hexdigest()
    S.write_manifest(tmp_path, m)  # a re-written manifest (its checksum and fingerprints follow)
    S.verify_dataset(tmp_path, check_tokens=False)
    with pytest.raises(GptlabError, match=r"d_val_000000.bin: token 4000 at token offset 3 is >= the vocabulary size 1000"):
        S.verify_dataset(tmp_path)


def test_verify_detects_count_mismatch_and_missing_files(tmp_path):
    _dataset(tmp_path)
    m = json.loads((tmp_path / "manifest.json").read_text())
    m["shards"][0]["tokens"] = 11
    S.write_manifest(tmp_path, m)  # re-written by gptlab: checksum and fingerprints follow the edit
    with pytest.raises(GptlabError, match=r"d_train_000000.bin: header has 10 tokens but manifest.json says 11"):
        S.verify_dataset(tmp_path)
    (tmp_path / "d_train_000000.bin").unlink()
    with pytest.raises(GptlabError, match=r"d_train_000000.bin: shard file not found"):
        S.verify_dataset(tmp_path)


def test_read_manifest_errors(tmp_path):
    with pytest.raises(GptlabError, match="dataset directory not found"):
        S.read_manifest(tmp_path / "nope")
    with pytest.raises(GptlabError, match="no manifest.json, so this is not a prepared dataset"):
        S.read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(GptlabError, match="manifest.json: not valid JSON"):
        S.read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other", "format_version": 1}))
    with pytest.raises(GptlabError, match="unknown manifest format 'other'"):
        S.read_manifest(tmp_path)
    _dataset(tmp_path)
    m = json.loads((tmp_path / "manifest.json").read_text())
    m["shards"][0]["file"] = "../escape.bin"
    S.write_manifest(tmp_path, m)  # re-written by gptlab: checksum and fingerprints follow the edit
    with pytest.raises(GptlabError, match="must be a plain file name"):
        S.read_manifest(tmp_path)


def test_synthetic_dataset_is_valid_and_seeded(tmp_path):
    m = S.write_synthetic_dataset(tmp_path / "a", train_tokens=2500, val_tokens=300, shard_tokens=1000, seed=1)
    assert [s["tokens"] for s in m["shards"]] == [1000, 1000, 500, 300]
    assert S.verify_dataset(tmp_path / "a")["splits"] == {"train": {"tokens": 2500, "shards": 3},
                                                         "val": {"tokens": 300, "shards": 1}}
    S.write_synthetic_dataset(tmp_path / "b", train_tokens=2500, val_tokens=300, shard_tokens=1000, seed=1)
    assert (tmp_path / "a" / "synthetic_train_000002.bin").read_bytes() == \
        (tmp_path / "b" / "synthetic_train_000002.bin").read_bytes()
