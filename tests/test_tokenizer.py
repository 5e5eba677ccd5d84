import json

import pytest

from gptlab import tokenizer as tk


def test_gpt2_known_encoding():
    t = tk.GPT2Tokenizer()
    assert t.encode("Hello, I'm a language model,") == [15496, 11, 314, 1101, 257, 3303, 2746, 11]
    assert t.vocab_size == 50257 and t.eot_id == 50256
    assert t.decode([15496, 11, 314, 1101, 257, 3303, 2746, 11]) == "Hello, I'm a language model,"


def test_gpt2_matches_reference_bpe_from_transformers(tmp_path):
    # Independent reference: transformers' GPT-2 BPE (HF tokenizers) built from the same vocab files.
    transformers = pytest.importorskip("transformers")
    vocab_bpe, encoder_json = tk.gpt2_vocab_files()
    (tmp_path / "vocab.json").write_bytes(encoder_json.read_bytes())
    (tmp_path / "merges.txt").write_bytes(vocab_bpe.read_bytes())
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), tokenizer_type="gpt2")
    t = tk.GPT2Tokenizer()
    text = "  Unicode: naïve café — 東京 🙂\n\n\tcode: def f(x):\n    return x**2  # ok\nIt's we'll they've"
    assert t.encode(text) == ref.encode(text)
    assert t.decode(t.encode(text)) == text


def test_literal_endoftext_is_ordinary_text_unless_asked():
    t = tk.GPT2Tokenizer()
    ids = t.encode("a<|endoftext|>b")
    assert 50256 not in ids
    assert t.decode(ids) == "a<|endoftext|>b"
    assert t.encode("a<|endoftext|>b", allow_special=True) == [64, 50256, 65]
    assert all(50256 not in x for x in t.encode_batch(["<|endoftext|>", "x"], num_threads=2))


def test_hash_mismatch_names_the_file(tmp_path, monkeypatch):
    vocab_bpe, encoder_json = tk.gpt2_vocab_files()
    (tmp_path / "vocab.bpe").write_bytes(vocab_bpe.read_bytes() + b"\n")
    (tmp_path / "encoder.json").write_bytes(encoder_json.read_bytes())
    monkeypatch.setenv("GPTLAB_GPT2_VOCAB_DIR", str(tmp_path))
    tk.gpt2_encoding.cache_clear()
    try:
        with pytest.raises(tk.TokenizerError, match="vocab.bpe: sha256"):
            tk.gpt2_encoding()
    finally:
        tk.gpt2_encoding.cache_clear()


def test_char_tokenizer_roundtrip_and_json(tmp_path):
    text = "hello world\nHELLO!"
    t = tk.CharTokenizer.from_text(text)
    assert t.vocab_size == len(set(text))
    assert t.chars == sorted(set(text))
    assert t.decode(t.encode(text)) == text
    path = tmp_path / "tok.json"
    tk.save_tokenizer(t, path)
    assert json.loads(path.read_text())["type"] == "char"
    t2 = tk.load_tokenizer(path)
    assert t2.encode(text) == t.encode(text)
    with pytest.raises(tk.TokenizerError, match="'z' is not in"):
        t.encode("z")


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(tk.TokenizerError, match="not found"):
        tk.load_tokenizer(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(tk.TokenizerError, match="bad.json: not valid JSON"):
        tk.load_tokenizer(bad)
    bad.write_text('{"type": "sentencepiece"}')
    with pytest.raises(tk.TokenizerError, match="unknown tokenizer spec"):
        tk.load_tokenizer(bad)


def test_fingerprint_names_the_ids_not_the_object():
    from gptlab.tokenizer import CharTokenizer, GPT2Tokenizer, fingerprint

    a, b = CharTokenizer(list("abc")), CharTokenizer(list("abc"))
    assert fingerprint(a) == fingerprint(b) == fingerprint(a.spec())
    assert fingerprint(a) != fingerprint(CharTokenizer(list("acb")))  # same set, other ids
    assert fingerprint(GPT2Tokenizer()) != fingerprint(a)
    assert len(fingerprint(a)) == 64
