"""Dataset registry, local readers, token-preserving text cuts and the (faked) download paths."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import random

import pytest

from gptlab.data import sources
from gptlab.errors import GptlabError
from gptlab.tokenizer import GPT2Tokenizer


def test_default_data_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("GPTLAB_DATA_HOME", str(tmp_path / "home"))
    assert sources.default_data_dir("pydocs") == tmp_path / "home" / "pydocs"
    monkeypatch.delenv("GPTLAB_DATA_HOME")
    assert sources.default_data_dir("x").parts[-4:] == (".cache", "gptlab", "data", "x")


def test_registry_lists_every_dataset_and_hints_typos():
    want = {"shakespeare_char", "shakespeare", "tinystories", "openwebtext", "fineweb_edu_10b",
            "fineweb_edu_100b", "fineweb_10b", "pydocs", "text", "jsonl", "chat", "smoltalk"}
    assert set(sources.DATASETS) == want
    with pytest.raises(GptlabError, match="did you mean 'fineweb_10b'"):
        sources.get_dataset("fineweb10b")


def test_expand_input_file_dir_glob(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ("d/b.txt", "d/a.txt", "d/sub/c.txt", "d/.hidden"):
        (tmp_path / name).write_text("x")
    assert sources.expand_input(tmp_path / "d" / "a.txt") == [tmp_path / "d" / "a.txt"]
    assert [p.name for p in sources.expand_input(tmp_path / "d")] == ["a.txt", "b.txt", "c.txt"]
    assert [p.name for p in sources.expand_input(str(tmp_path / "d" / "*.txt"))] == ["a.txt", "b.txt"]
    with pytest.raises(GptlabError, match="no such file"):
        sources.expand_input(tmp_path / "missing*.txt")


def _random_text(rng: random.Random, n: int) -> str:
    atoms = list("ab  \n\n\r.'s1é\t") + ["the ", "'ll", " \n", "\r\n", "\n\n", "Hello", "  x"]
    return "".join(rng.choice(atoms) for _ in range(n))


def test_safe_cuts_never_change_gpt2_tokens():
    """Every cut is_safe_cut allows, and every piece stream, tokenizes exactly like the whole text."""
    enc = GPT2Tokenizer().enc
    rng = random.Random(0)
    cuts = 0
    for _ in range(150):
        text = _random_text(rng, rng.randint(20, 200))
        whole = enc.encode_ordinary(text)
        for i in range(len(text) + 1):
            if sources.is_safe_cut(text, i):
                cuts += 1
                assert enc.encode_ordinary(text[:i]) + enc.encode_ordinary(text[i:]) == whole, (text, i)
        pieces = list(sources.iter_text_pieces(text, 6))
        assert "".join(pieces) == text
        assert [t for p in pieces for t in enc.encode_ordinary(p)] == whole
    assert cuts > 500  # the property was exercised, not vacuous


def test_safe_pieces_bounded_and_progress_without_cuts_in_window():
    text = "x" * 5000 + "a\nb" + "y" * 10 + ("word\nnext " * 2000)
    pieces = list(sources.iter_safe_pieces(iter([text[i:i + 100] for i in range(0, len(text), 100)]), 64))
    assert "".join(pieces) == text
    assert len(pieces) > 10  # cut after the long line, not one giant piece
    assert max(len(p) for p in pieces[1:]) <= 2 * 64 + 16


def test_local_file_documents_jsonl_gz_parquet_txt(tmp_path):
    docs = ["first doc", "second\nwith newline", "<|endoftext|> literal"]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)) + "\n\n")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "gz doc"}) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["pq one", "pq two"], "n": [1, 2]}), tmp_path / "c.parquet")
    (tmp_path / "d.txt").write_text("whole file\nis one doc\n")
    got = list(sources.local_file_documents(sources.expand_input(tmp_path)))
    assert got == docs + ["gz doc", "pq one", "pq two", "whole file\nis one doc\n"]


def test_local_file_documents_errors_name_the_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(GptlabError, match=r"x.jsonl:2: no field 'text'.*--field"):
        list(sources.local_file_documents([p]))
    with pytest.raises(GptlabError, match=r"x.jsonl:1: no field 'body'"):
        list(sources.local_file_documents([p], "body"))
    p.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(GptlabError, match=r"x.jsonl:2: not valid JSON"):
        list(sources.local_file_documents([p]))


def test_text_file_documents_split_at_character_boundary(tmp_path):
    text = ("héllo wörld ✓ " * 50) + "\nend\n"
    p = tmp_path / "t.txt"
    p.write_text(text, encoding="utf-8")
    docs = list(sources.text_file_documents([p], 0.1))
    assert [d.split for d in docs] == ["train", "val"]
    train, val = ("".join(d.pieces) for d in docs)
    assert train + val == text
    size = len(text.encode("utf-8"))
    assert len(train.encode("utf-8")) >= int(size * 0.9) > len(train.encode("utf-8")) - 4


def test_fetch_url_checks_sha_and_caches(monkeypatch, tmp_path):
    payload = b"To be, or not to be\n" * 100
    calls = []

    def fake_get(url, timeout=60.0):
        calls.append(url)
        yield payload[:7]
        yield payload[7:]

    monkeypatch.setattr(sources, "_http_get", fake_get)
    sha = hashlib.sha256(payload).hexdigest()
    dest = tmp_path / "dl" / "f.txt"
    assert sources.fetch_url("https://example.invalid/f", dest, sha, what="demo") == dest
    assert dest.read_bytes() == payload
    sources.fetch_url("https://example.invalid/f", dest, sha, what="demo")
    assert len(calls) == 1  # cached
    with pytest.raises(GptlabError, match=r"demo: download .* has sha256 .* expected 0+.*--input"):
        sources.fetch_url("https://example.invalid/g", tmp_path / "g.txt", "0" * 64, what="demo")
    assert not list(tmp_path.glob("g.txt*")) and not list(tmp_path.glob(".g.txt*"))


def test_fetch_url_offline_error_names_input_flag(monkeypatch, tmp_path):
    def offline(url, timeout=60.0):
        raise OSError("network is unreachable")
        yield b""  # pragma: no cover

    monkeypatch.setattr(sources, "_http_get", offline)
    with pytest.raises(GptlabError, match=r"shakespeare: could not download .*unreachable.*--input"):
        sources.fetch_url(sources.TINY_SHAKESPEARE_URL, tmp_path / "x", "0" * 64, what="shakespeare")


def test_shakespeare_download_path_with_fake_network(monkeypatch, tmp_path):
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 30
    payload = text.encode()
    monkeypatch.setenv("GPTLAB_DATA_HOME", str(tmp_path))
    monkeypatch.setattr(sources, "_http_get", lambda url, timeout=60.0: iter([payload]))
    info = dataclasses.replace(sources.get_dataset("shakespeare_char"), sha256=hashlib.sha256(payload).hexdigest())
    make, src = sources.open_source(info)
    docs = list(make())
    assert [d.split for d in docs] == ["train", "val"]
    n = len(text)
    assert "".join(docs[0].pieces) == text[:int(n * 0.9)] and "".join(docs[1].pieces) == text[int(n * 0.9):]
    assert src["cache"] == str(tmp_path / "downloads" / "tinyshakespeare.txt")


@pytest.mark.parametrize("name", ["tinystories", "openwebtext", "fineweb_edu_10b", "fineweb_edu_100b", "fineweb_10b"])
def test_hub_offline_error_is_one_line_with_input_flag(monkeypatch, name):
    def fail(path, name_, split, streaming=True):
        raise ConnectionError("Couldn't reach the Hugging Face Hub\n(long traceback text)")

    monkeypatch.setattr(sources, "load_hf_dataset", fail)
    make, _ = sources.open_source(sources.get_dataset(name))
    with pytest.raises(GptlabError) as e:
        list(make())
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{name}: cannot download ") and "--input" in msg
    assert sources.get_dataset(name).hf_path in msg


def test_hub_error_midstream_is_wrapped(monkeypatch):
    def rows():
        yield {"text": "one"}
        raise TimeoutError("read timed out")

    monkeypatch.setattr(sources, "load_hf_dataset", lambda *a, **k: rows())
    make, _ = sources.open_source(sources.get_dataset("fineweb_10b"))
    with pytest.raises(GptlabError, match="failed after 1 documents: TimeoutError"):
        list(make())


def test_local_only_datasets_need_input():
    for name in ("text", "jsonl"):
        with pytest.raises(GptlabError, match=f"{name}: needs local files: pass --input"):
            sources.open_source(sources.get_dataset(name))


def test_unresolvable_hub_fails_fast_without_calling_datasets(monkeypatch):
    import socket

    for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example.invalid")
    seen = []

    def no_dns(host, *a, **k):
        seen.append(host)
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    make, _ = sources.open_source(sources.get_dataset("fineweb_edu_10b"))
    with pytest.raises(GptlabError, match=r"cannot resolve hub.example.invalid.*--input"):
        next(iter(make()))
    assert seen == ["hub.example.invalid"]
