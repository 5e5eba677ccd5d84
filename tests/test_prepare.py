"""gptlab prepare: exact token streams vs direct tiktoken encoding, split rules, worker determinism, CLI."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from gptlab.cli import main
from gptlab.data import prepare as P
from gptlab.data import shards as S
from gptlab.data import sources
from gptlab.errors import GptlabError
from gptlab.tokenizer import GPT2Tokenizer

EOT = 50256


@pytest.fixture(scope="module")
def enc():
    return GPT2Tokenizer().enc


def split_tokens(out: Path, split: str) -> list[int]:
    m = S.read_manifest(out)
    return [int(t) for p in S.shard_paths(out, split, m) for t in S.read_shard(p)]


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return path


def random_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = "the a cat sat on mat\n rain fell\r\n upon 'll héllo ✓ 42 . ,  \n\n".split(" ")
    return ["".join(rng.choice(words) + rng.choice([" ", "", "\n"]) for _ in range(rng.randint(0, 80)))
            for _ in range(n)]


def test_documents_get_eot_and_fraction_split(tmp_path, enc):
    docs = random_docs(57) + ["contains <|endoftext|> as plain text"]
    res = P.prepare_dataset("jsonl", input=write_jsonl(tmp_path / "d.jsonl", docs), out=tmp_path / "out",
                            shard_tokens=97, val_fraction=0.1, progress=False)
    want: dict[str, list[int]] = {"train": [], "val": []}
    for d in docs:  # the documented rule: val while it holds less than 10% of the tokens so far
        held, seen = len(want["val"]), len(want["val"]) + len(want["train"])
        want["val" if held < 0.1 * seen else "train"] += [EOT] + enc.encode_ordinary(d)
    for split in ("train", "val"):
        assert split_tokens(tmp_path / "out", split) == want[split]
        assert res["splits"][split]["tokens"] == len(want[split])
    n_val = want["val"].count(EOT)
    assert 3 <= n_val and res["splits"]["val"]["documents"] == n_val and res["documents"] == len(docs)
    assert abs(len(want["val"]) / (len(want["val"]) + len(want["train"])) - 0.1) < 0.03
    assert split_tokens(tmp_path / "out", "train").count(EOT) == len(docs) - n_val  # the literal is not special
    m = S.read_manifest(tmp_path / "out")
    assert m["tokenizer"] == {"type": "gpt2"} and m["vocab_size"] == 50257 and m["eot_id"] == EOT
    train_sizes = [s["tokens"] for s in m["shards"] if s["split"] == "train"]
    assert len(train_sizes) > 3 and set(train_sizes[:-1]) == {97} and 0 < train_sizes[-1] <= 97
    assert m["source"]["val_rule"] == "fraction"
    assert S.verify_dataset(tmp_path / "out")["ok"]


def test_shards_byte_identical_for_any_worker_count(tmp_path, monkeypatch):
    monkeypatch.setattr(P, "BATCH_CHARS", 300)  # many small work units in flight
    monkeypatch.setattr(sources, "PIECE_CHARS", 64)  # and long texts cut into many pieces
    corpus = tmp_path / "in"
    corpus.mkdir()
    for i, d in enumerate(random_docs(12, seed=1)):
        (corpus / f"{i:02d}.txt").write_text(d * 20, encoding="utf-8")
    outs = []
    for w in (1, 2, 3):
        out = tmp_path / f"w{w}"
        P.prepare_dataset("text", input=corpus, out=out, workers=w, shard_tokens=500, progress=False)
        outs.append(out)
    files = sorted(p.name for p in outs[0].iterdir())
    assert len(files) > 5
    for other in outs[1:]:
        assert sorted(p.name for p in other.iterdir()) == files
        for name in files:
            assert (other / name).read_bytes() == (outs[0] / name).read_bytes(), name


def test_text_files_split_by_characters_like_nanogpt(tmp_path, enc, monkeypatch):
    monkeypatch.setattr(sources, "PIECE_CHARS", 100)
    texts = ["\n".join(random_docs(30, seed=s)) for s in (2, 3)]
    for i, t in enumerate(texts):
        (tmp_path / f"{i}.txt").write_bytes(t.encode("utf-8"))
    P.prepare_dataset("text", input=str(tmp_path / "*.txt"), out=tmp_path / "out", progress=False)
    want = {"train": [], "val": []}
    for t in texts:
        raw = t.encode("utf-8")
        cut = int(len(raw) * 0.9)
        while cut < len(raw) and raw[cut] & 0xC0 == 0x80:
            cut += 1
        want["train"] += [EOT] + enc.encode_ordinary(raw[:cut].decode())
        want["val"] += [EOT] + enc.encode_ordinary(raw[cut:].decode())
    assert split_tokens(tmp_path / "out", "train") == want["train"]
    assert split_tokens(tmp_path / "out", "val") == want["val"]


def test_char_tokenizer_on_text(tmp_path, tiny_corpus):
    text = tiny_corpus.read_text()
    res = P.prepare_dataset("text", input=tiny_corpus, out=tmp_path / "o", tokenizer="char", progress=False)
    chars = sorted(set(text))
    m = S.read_manifest(tmp_path / "o")
    assert m["tokenizer"] == {"type": "char", "chars": chars} and m["eot_id"] is None
    decoded = "".join(chars[t] for t in split_tokens(tmp_path / "o", "train") + split_tokens(tmp_path / "o", "val"))
    assert decoded == text  # no delimiter without an EOT token
    assert res["vocab_size"] == len(chars)


def _fake_hub(monkeypatch, splits: dict[str, list[str]]):
    calls = []

    def fake(path, name, split, streaming=True):
        calls.append((path, name, split, streaming))
        return ({"text": t, "id": i} for i, t in enumerate(splits[split]))

    monkeypatch.setattr(sources, "load_hf_dataset", fake)
    return calls


def test_fineweb_first_shard_is_val_like_build_nanogpt(tmp_path, monkeypatch, enc):
    docs = random_docs(40, seed=4)
    calls = _fake_hub(monkeypatch, {"train": docs})
    P.prepare_dataset("fineweb_edu_10b", out=tmp_path / "fw", shard_tokens=300, progress=False)
    assert calls == [("HuggingFaceFW/fineweb-edu", "sample-10BT", "train", True)]
    stream = [t for d in docs for t in [EOT] + enc.encode_ordinary(d)]
    assert split_tokens(tmp_path / "fw", "val") == stream[:300]
    assert split_tokens(tmp_path / "fw", "train") == stream[300:]
    m = S.read_manifest(tmp_path / "fw")
    assert [s["file"] for s in m["shards"]][:2] == ["fineweb_edu_10b_train_000000.bin", "fineweb_edu_10b_train_000001.bin"]
    assert m["source"]["hf_path"] == "HuggingFaceFW/fineweb-edu" and m["source"]["val_tokens"] == 300


@pytest.mark.parametrize("name, path, config", [
    ("fineweb_edu_100b", "HuggingFaceFW/fineweb-edu", "sample-100BT"),
    ("fineweb_10b", "HuggingFaceFW/fineweb", "sample-10BT"),
    ("openwebtext", "Skylion007/openwebtext", None),
])
def test_every_hub_corpus_downloads_through_datasets(tmp_path, monkeypatch, enc, name, path, config):
    docs = random_docs(30, seed=5)
    calls = _fake_hub(monkeypatch, {"train": docs})
    res = P.prepare_dataset(name, out=tmp_path / name, val_fraction=0.1, max_docs=25, progress=False)
    assert calls == [(path, config, "train", True)]
    assert res["documents"] == 25
    assert res["splits"]["train"]["tokens"] + res["splits"]["val"]["tokens"] == \
        sum(1 + len(enc.encode_ordinary(d)) for d in docs[:25])


def test_tinystories_uses_the_hub_validation_split(tmp_path, monkeypatch, enc):
    calls = _fake_hub(monkeypatch, {"train": ["Once upon a time.", "The end."], "validation": ["Val story."]})
    P.prepare_dataset("tinystories", out=tmp_path / "ts", progress=False)
    assert [c[2] for c in calls] == ["validation", "train"] and calls[0][0] == "roneneldan/TinyStories"
    assert split_tokens(tmp_path / "ts", "val") == [EOT] + enc.encode_ordinary("Val story.")
    assert split_tokens(tmp_path / "ts", "train") == [EOT] + enc.encode_ordinary("Once upon a time.") + \
        [EOT] + enc.encode_ordinary("The end.")


def test_hub_corpus_from_local_parquet(tmp_path, enc):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = random_docs(20, seed=6)
    pq.write_table(pa.table({"text": docs}), tmp_path / "part-0.parquet")
    res = P.prepare_dataset("fineweb_10b", input=tmp_path / "part-0.parquet", out=tmp_path / "o",
                            val_fraction=0.25, progress=False)
    assert 0.2 < res["splits"]["val"]["tokens"] / (res["splits"]["val"]["tokens"] + res["splits"]["train"]["tokens"]) < 0.3
    all_tokens = split_tokens(tmp_path / "o", "train") + split_tokens(tmp_path / "o", "val")
    assert sorted(all_tokens) == sorted(t for d in docs for t in [EOT] + enc.encode_ordinary(d))


def test_pydocs_is_offline_and_exact(tmp_path, enc):
    from pydoc_data.topics import topics

    res = P.prepare_dataset("pydocs", out=tmp_path / "py", progress=False)
    keys = sorted(topics)
    assert res["documents"] == len(keys)
    sizes = [1 + len(enc.encode_ordinary(topics[k])) for k in keys]
    total = res["splits"]["train"]["tokens"] + res["splits"]["val"]["tokens"]
    assert total == sum(sizes)
    assert abs(res["splits"]["val"]["tokens"] - 0.1 * total) <= max(sizes)


def test_overwrite_and_argument_errors(tmp_path, tiny_corpus):
    out = tmp_path / "o"
    P.prepare_dataset("text", input=tiny_corpus, out=out, shard_tokens=1000, progress=False)
    n_before = len(list(out.glob("*.bin")))
    with pytest.raises(GptlabError, match="already holds a prepared dataset.*--overwrite"):
        P.prepare_dataset("text", input=tiny_corpus, out=out, progress=False)
    P.prepare_dataset("text", input=tiny_corpus, out=out, shard_tokens=100_000, overwrite=True, progress=False)
    assert n_before > 2 and len(list(out.glob("*.bin"))) == 2  # old shards removed with the old manifest
    with pytest.raises(GptlabError, match="--shard-tokens 0"):
        P.prepare_dataset("text", input=tiny_corpus, out=tmp_path / "x", shard_tokens=0)
    with pytest.raises(GptlabError, match="--val-fraction 1.0"):
        P.prepare_dataset("text", input=tiny_corpus, out=tmp_path / "x", val_fraction=1.0)
    with pytest.raises(GptlabError, match="--tokenizer 'bpe'"):
        P.prepare_dataset("text", input=tiny_corpus, out=tmp_path / "x", tokenizer="bpe", progress=False)


def test_first_tokens_rule_with_too_little_data_is_an_error(tmp_path, monkeypatch):
    _fake_hub(monkeypatch, {"train": ["tiny"]})
    with pytest.raises(GptlabError, match="no training tokens.*build-nanogpt's first shard.*--val-fraction"):
        P.prepare_dataset("fineweb_10b", out=tmp_path / "o", progress=False)
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_tokenize_documents_helper_matches_encode(enc):
    docs = random_docs(30, seed=7)
    got = list(P.tokenize_documents(docs, GPT2Tokenizer(), workers=2, batch_chars=100))
    assert [g.tolist() for g in got] == [[EOT] + enc.encode_ordinary(d) for d in docs]


def test_cli_prepare_json_verify_and_errors(tmp_path, tiny_corpus, capsys, monkeypatch):
    out = tmp_path / "cli"
    assert main(["prepare", "text", "--input", str(tiny_corpus), "--out", str(out), "--shard-tokens", "5000",
                 "--workers", "2", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["dataset"] == "text" and res["out"] == str(out) and res["tokens_per_s"] > 0
    assert res["splits"]["train"]["shards"][0] == "text_train_000000.bin"
    assert main(["prepare", "--verify", str(out), "--json"]) == 0
    ver = json.loads(capsys.readouterr().out)
    assert ver["ok"] and ver["splits"]["train"]["tokens"] == res["splits"]["train"]["tokens"]
    (out / "text_val_000000.bin").write_bytes(b"\0" * 2000)
    assert main(["prepare", "--verify", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "text_val_000000.bin: bad magic number 0" in err

    def offline(*a, **k):
        raise ConnectionError("offline")

    monkeypatch.setattr(sources, "load_hf_dataset", offline)
    assert main(["prepare", "fineweb_10b", "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fineweb_10b: cannot download HuggingFaceFW/fineweb" in err and "--input" in err
    assert not (tmp_path / "x").exists()


@pytest.mark.skipif(not os.environ.get("GPTLAB_TINYSHAKESPEARE"), reason="set GPTLAB_TINYSHAKESPEARE=path/to/input.txt")
@pytest.mark.parametrize("name, vocab, train, val", [
    ("shakespeare_char", 65, 1_003_854, 111_540),
    ("shakespeare", 50257, 301_966, 36_059),
])
def test_tiny_shakespeare_exact_counts(tmp_path, name, vocab, train, val, capsys):
    path = os.environ["GPTLAB_TINYSHAKESPEARE"]
    assert main(["prepare", name, "--input", path, "--out", str(tmp_path / name), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["vocab_size"] == vocab
    assert res["splits"]["train"]["tokens"] == train and res["splits"]["val"]["tokens"] == val


def test_encode_stream_reads_ahead_only_a_bounded_amount():
    """Memory stays bounded: the producer is never more than 2 x workers batches ahead of the consumer."""
    import itertools

    produced = 0

    def endless():
        nonlocal produced
        for i in itertools.count():
            produced += 1
            yield i, "word " * 10

    encode = P.make_encoder(GPT2Tokenizer())
    got = 0
    for _tag, toks in P.encode_stream(endless(), encode, workers=2, batch_chars=100):  # 2 items per batch
        got += 1
        assert toks.tolist() == GPT2Tokenizer().encode("word " * 10)
        assert produced <= got + 2 * 2 * 2 + 2
        if got == 200:
            break


def test_default_out_is_under_data_home(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GPTLAB_DATA_HOME", str(tmp_path / "home"))
    assert main(["prepare", "pydocs", "--json", "--max-docs", "20"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["out"] == str(tmp_path / "home" / "pydocs") and res["documents"] == 20
    assert S.verify_dataset(tmp_path / "home" / "pydocs")["ok"]


def test_interrupted_prepare_leaves_no_dataset_and_can_rerun(tmp_path, monkeypatch):
    docs = random_docs(40, seed=8)

    def flaky(path, name, split, streaming=True):
        for i, d in enumerate(docs):
            if i == 30:
                raise ConnectionResetError("connection reset by peer")
            yield {"text": d}

    monkeypatch.setattr(sources, "load_hf_dataset", flaky)
    monkeypatch.setattr(P, "BATCH_CHARS", 50)
    with pytest.raises(GptlabError, match="failed after 30 documents"):
        P.prepare_dataset("openwebtext", out=tmp_path / "o", shard_tokens=50, progress=False)
    # Shards are built beside --out: a failed prepare leaves neither --out nor partial shards.
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.tmp-*"))
    with pytest.raises(GptlabError, match="not found"):
        S.read_manifest(tmp_path / "o")
    _fake_hub(monkeypatch, {"train": docs})
    res = P.prepare_dataset("openwebtext", out=tmp_path / "o", shard_tokens=50, progress=False)
    assert res["documents"] == 40 and S.verify_dataset(tmp_path / "o")["ok"]
