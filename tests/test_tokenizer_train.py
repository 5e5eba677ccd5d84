"""Trained byte-level BPE: merges against a pure-Python reference, lossless unicode, special tokens,
determinism, tiktoken vs Hugging Face ids, the CLI, uint32 shards, and a trained tokenizer end to end
(prepare -> train -> sample -> eval loss with bits per byte -> export -> AutoTokenizer)."""

from __future__ import annotations

import collections
import json
import math
import random

import numpy as np
import pytest

from gptlab.cli import main
from gptlab.errors import GptlabError
from gptlab.tokenizer import (DEFAULT_SPECIALS, EOT_TEXT, GPT2_PAT, GPT4_N2_PAT, GPT4_PAT, RANKS_FILE, SPEC_FILE,
                              BPETokenizer, fingerprint, from_spec, load_tokenizer, save_tokenizer,
                              token_byte_lengths)
from gptlab.tokenizer_train import TokenizerTrainError, train_bpe, train_tokenizer

# Held-out text no tokenizer here is trained on: emoji (ZWJ sequences, skin tones, flags), CJK, combining
# marks on their own, right-to-left scripts, control characters, CRLF, astral and private-use code points.
ODD_TEXTS = [
    "Hello, world! It's 2026-12-02 and 1234567 ≠ 3.14159…",
    "👩‍👩‍👧‍👦 family, 👍🏽 thumbs, 🇫🇷🇯🇵 flags, 🙂🙃",
    "日本語のテキストと中文文本，한국어 텍스트。",
    "e\u0301 a\u0308\u0323 \u0301\u0302 leading combining marks, Zalgo: Z\u0351\u0300\u0364a\u036c\u0350l",
    "עברית ومرحبا بالعالم mixed with LTR",
    "tabs\tand\x00nulls\x01\x7f and\r\nCRLF\r\n\r\n  spaces   \n\n\n",
    "\U0001d54f\U0001f600\U000e0041 \ue000\uffff\ufffd astral, private use, replacement",
    "    def f(x):\n        return x**2  # code\n",
    "",
    " ",
    "<|endoftext|> in plain text is just text <|user_start|>",
]


def _corpus(seed: int = 0, n: int = 400) -> list[str]:
    """A small mixed-script corpus (deterministic)."""
    rng = random.Random(seed)
    words = ("the quick brown fox jumps over lazy dog and cat sat on mat while rain fell softly upon green hills "
             "of old England where kings once ruled 东京 北京 上海 café naïve über straße 123 4567 89 🙂 🐍").split()
    syllables = "ka to ri mu sen dal or ve qui zan lo pe tha gri 山 水 é ü".split()

    def word() -> str:  # a known word, or a made-up one so that there are many merges to learn
        if rng.random() < 0.6:
            return rng.choice(words)
        return "".join(rng.choice(syllables) for _ in range(rng.randint(1, 4)))

    return [" ".join(word() for _ in range(rng.randint(3, 14))).capitalize() + ".\n" for _ in range(n)]


def reference_merges(texts: list[str], n_merges: int, pattern: str, byte_id: dict[int, int] | None = None) -> list[bytes]:
    """Textbook byte-level BPE, independent of any library: pre-split with the regex, then repeatedly merge
    the most frequent adjacent pair, starting from the 256 bytes. Ties go to the smallest pair of ids,
    where byte ``b`` has id ``byte_id[b]`` (default ``b``) and the k-th merge id ``256 + k``."""
    import regex

    byte_id = byte_id or {b: b for b in range(256)}
    words: collections.Counter = collections.Counter()
    for t in texts:
        for w in regex.findall(pattern, t):
            words[tuple(byte_id[b] for b in w.encode("utf-8"))] += 1
    token = {i: bytes([b]) for b, i in byte_id.items()}
    seqs = {w: list(w) for w in words}
    merges = []
    for k in range(n_merges):
        pairs: collections.Counter = collections.Counter()
        for w, c in words.items():
            s = seqs[w]
            for a, b in zip(s, s[1:]):
                pairs[(a, b)] += c
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], -p[0], -p[1]))
        new = 256 + k
        token[new] = token[best[0]] + token[best[1]]
        merges.append(token[new])
        for w, s in seqs.items():
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(new)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[w] = out
    return merges


def _merges(tok: BPETokenizer) -> list[bytes]:
    return [t for t, _ in sorted(tok.ranks.items(), key=lambda kv: kv[1])][256:]


@pytest.fixture(scope="module")
def tok() -> BPETokenizer:
    return train_bpe(_corpus(), 400)


@pytest.mark.parametrize("pattern", [GPT4_PAT, GPT2_PAT], ids=["gpt4", "gpt2"])
def test_merges_equal_a_pure_python_reference(pattern):
    texts = _corpus(1, 150)
    n = 120
    trained = train_bpe(texts, 256 + n + len(DEFAULT_SPECIALS), pattern=pattern)
    assert _merges(trained) == reference_merges(texts, n, pattern)


def test_hf_trainer_merges_equal_the_reference_under_its_tie_order():
    """Hugging Face's trainer is the same BPE; it breaks ties by its own byte ids (the sorted byte-level
    alphabet) rather than by byte value, so the reference is run with that order."""
    from gptlab.tokenizer import _bytes_to_unicode

    texts = _corpus(2, 150)
    b2u = _bytes_to_unicode()
    alphabet = sorted(b2u.values())
    hf_ids = {b: alphabet.index(c) for b, c in b2u.items()}
    got = train_bpe(texts, 256 + 100 + len(DEFAULT_SPECIALS), trainer="tokenizers")
    assert _merges(got) == reference_merges(texts, 100, GPT4_PAT, hf_ids)
    for text in ODD_TEXTS:
        assert got.decode(got.encode(text)) == text


@pytest.mark.parametrize("text", ODD_TEXTS)
def test_round_trip_on_arbitrary_unicode(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode("utf-8")
    assert all(0 <= i < tok.vocab_size - len(DEFAULT_SPECIALS) for i in ids)  # never a special token
    assert tok.encode_batch([text, text]) == [ids, ids]


def test_special_tokens(tok):
    n = len(tok.ranks)
    assert tok.vocab_size == 400 and n == 400 - len(DEFAULT_SPECIALS)
    assert list(tok.special_tokens) == list(DEFAULT_SPECIALS)
    assert [tok.special_id(s) for s in DEFAULT_SPECIALS] == list(range(n, 400))
    assert tok.eot_id == tok.special_id(EOT_TEXT) == n
    text = f"hi{EOT_TEXT}there<|assistant_start|>"
    assert tok.eot_id not in tok.encode(text)  # plain text never yields a special token
    assert tok.decode(tok.encode(text)) == text
    with_special = tok.encode(text, allow_special=True)
    assert tok.eot_id in with_special and tok.special_id("<|assistant_start|>") in with_special
    assert tok.decode(with_special) == text
    with pytest.raises(GptlabError, match="no special token"):
        tok.special_id("<|nope|>")


def test_extra_special_tokens_follow_the_defaults(tmp_path):
    (tmp_path / "c.txt").write_text("".join(_corpus()), encoding="utf-8")
    res = train_tokenizer(str(tmp_path / "c.txt"), 400, tmp_path / "t", specials=["<|tool|>", EOT_TEXT],
                          progress=False)
    t = load_tokenizer(tmp_path / "t")
    assert res["special_tokens"] == [*DEFAULT_SPECIALS, "<|tool|>"]
    assert t.special_id("<|tool|>") == 399


def test_output_is_byte_identical_for_the_same_corpus_and_flags(tmp_path):
    (tmp_path / "c.txt").write_text("".join(_corpus(3, 600)), encoding="utf-8")
    files = {}
    for name in ("a", "b"):
        train_tokenizer(str(tmp_path / "c.txt"), 700, tmp_path / name, progress=False)
        files[name] = {p.name: p.read_bytes() for p in sorted((tmp_path / name).iterdir())}
    assert files["a"] == files["b"]
    assert set(files["a"]) == {RANKS_FILE, SPEC_FILE, "tokenizer.json", "tokenizer_config.json",
                               "special_tokens_map.json"}
    spec = json.loads(files["a"][SPEC_FILE])
    import hashlib

    assert spec["ranks_sha256"] == hashlib.sha256(files["a"][RANKS_FILE]).hexdigest()
    assert spec["pattern"] == GPT4_PAT and spec["vocab_size"] == 700
    # A different corpus gives different ranks, hence a different fingerprint.
    (tmp_path / "d.txt").write_text("".join(_corpus(4, 600)), encoding="utf-8")
    train_tokenizer(str(tmp_path / "d.txt"), 700, tmp_path / "d", progress=False)
    assert fingerprint(load_tokenizer(tmp_path / "d")) != fingerprint(load_tokenizer(tmp_path / "a"))


def test_ranks_file_is_tiktokens_format(tok, tmp_path):
    from tiktoken.load import load_tiktoken_bpe

    tok.save_dir(tmp_path)
    assert load_tiktoken_bpe(str(tmp_path / RANKS_FILE)) == tok.ranks


def test_tiktoken_and_hf_tokenizers_give_identical_ids(tok, tmp_path):
    from tokenizers import Tokenizer

    tok.save_dir(tmp_path)
    hf = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    texts = [t for t in ODD_TEXTS if "<|" not in t] + _corpus(9, 50) + ["".join(_corpus(10, 200))]
    for text in texts:
        ids = tok.encode(text)
        assert hf.encode(text, add_special_tokens=False).ids == ids, text
        assert hf.decode(ids, skip_special_tokens=False) == text


def test_spec_and_loading(tok, tmp_path):
    tok.save_dir(tmp_path / "t")
    again = load_tokenizer(tmp_path / "t")
    assert again.spec() == tok.spec() and fingerprint(again) == fingerprint(tok)
    spec = tok.spec()
    assert from_spec(spec, search=[tmp_path / "nowhere", tmp_path / "t"]).ranks == tok.ranks
    with pytest.raises(GptlabError, match=RANKS_FILE):
        from_spec(spec)
    bad = dict(spec, ranks_sha256="0" * 64)
    with pytest.raises(GptlabError, match="another tokenizer"):
        from_spec(bad, search=[tmp_path / "t"])


def test_token_byte_lengths(tok):
    lengths = token_byte_lengths(tok)
    assert lengths.shape == (tok.vocab_size,)
    assert all(lengths[tok.special_id(s)] == 0 for s in DEFAULT_SPECIALS)
    for r in (0, 65, 255, 300, len(tok.ranks) - 1):
        assert lengths[r] == len(tok.decode_bytes([r]))


@pytest.mark.parametrize("argv,match", [
    (["--vocab-size", "100"], "at least 256"),
    (["--pattern", "(unclosed"], "not a valid regex"),
    (["--max-chars", "0"], "--max-chars"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, capsys, argv, match):
    (tmp_path / "c.txt").write_text("hello world\n", encoding="utf-8")
    rc = main(["tokenizer", "train", "--input", str(tmp_path / "c.txt"), "--out", str(tmp_path / "t"),
               "--vocab-size", "300", *argv])
    assert rc != 0 and match in capsys.readouterr().err


def test_refuses_to_overwrite_an_existing_tokenizer(tmp_path):
    (tmp_path / "c.txt").write_text("".join(_corpus()), encoding="utf-8")
    train_tokenizer(str(tmp_path / "c.txt"), 300, tmp_path / "t", progress=False)
    before = (tmp_path / "t" / RANKS_FILE).read_bytes()
    with pytest.raises(TokenizerTrainError, match="--overwrite"):
        train_tokenizer(str(tmp_path / "c.txt"), 400, tmp_path / "t", progress=False)
    assert (tmp_path / "t" / RANKS_FILE).read_bytes() == before


def test_cli_train_json_and_compare(tmp_path, capsys):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in _corpus(5, 300)), encoding="utf-8")
    assert main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "500", "--out", str(tmp_path / "t"),
                 "--pattern", "gpt4-n2", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    for key in ("vocab_size", "bytes", "seconds", "bytes_per_s", "compression"):
        assert key in res
    assert res["vocab_size"] == 500 and res["compression"] > 1.5 and res["pattern"] == "gpt4-n2"
    assert load_tokenizer(tmp_path / "t").pattern == GPT4_N2_PAT
    held = tmp_path / "held.txt"
    held.write_text("".join(_corpus(6, 100)), encoding="utf-8")
    assert main(["tokenizer", "compare", "--input", str(held), "gpt2", "char", str(tmp_path / "t"), "--json",
                 "--rounds", "1"]) == 0
    rows = {r["tokenizer"]: r for r in json.loads(capsys.readouterr().out)["tokenizers"]}
    n_bytes = len(held.read_text(encoding="utf-8").encode("utf-8"))
    assert rows["char"]["tokens"] == len(held.read_text(encoding="utf-8"))
    assert rows[str(tmp_path / "t")]["tokens"] == len(load_tokenizer(tmp_path / "t").encode(held.read_text()))
    assert math.isclose(rows["gpt2"]["bytes_per_token"], n_bytes / rows["gpt2"]["tokens"], rel_tol=1e-3)


def test_vocab_above_65536_writes_uint32_shards(tmp_path):
    """A BPE with every byte pair as a token (65,792 ranks + specials): prepare writes uint32 shards that
    decode back to the text."""
    from gptlab.data import shards as S
    from gptlab.data.prepare import prepare_dataset

    ranks = {bytes([b]): b for b in range(256)}
    for a in range(256):
        for b in range(256):
            ranks[bytes([a, b])] = len(ranks)
    big = BPETokenizer(ranks, GPT4_PAT, {s: len(ranks) + i for i, s in enumerate(DEFAULT_SPECIALS)})
    assert big.vocab_size == 65_799
    (tmp_path / "tok").mkdir()
    save_tokenizer(big, tmp_path / "tok" / SPEC_FILE)  # spec + ranks (the HF file is tested elsewhere)
    # prepare refuses NUL bytes as binary input (issue 11), so the corpus keeps every other odd character
    text = "".join(t.replace("\x00", "") for t in ODD_TEXTS[:6]) * 20
    (tmp_path / "c.txt").write_text(text, encoding="utf-8")
    res = prepare_dataset("text", input=str(tmp_path / "c.txt"), out=tmp_path / "data",
                          tokenizer=str(tmp_path / "tok"), progress=False)
    m = S.read_manifest(tmp_path / "data")
    assert m["dtype"] == "uint32" and m["vocab_size"] == 65_799 and res["vocab_size"] == 65_799
    assert S.verify_dataset(tmp_path / "data")["ok"]
    toks = np.concatenate([S.read_shard(p) for p in S.shard_paths(tmp_path / "data", "train")] +
                          [S.read_shard(p) for p in S.shard_paths(tmp_path / "data", "val")])
    assert toks.dtype == np.dtype("<u4") and int(toks.max()) > 65_535
    assert big.decode([t for t in toks.tolist() if t != big.eot_id]) == text  # an EOT starts each split's document
    loaded = from_spec(m["tokenizer"], search=[tmp_path / "data"])  # the dataset dir is self-contained
    assert fingerprint(loaded) == fingerprint(big)


@pytest.mark.slow
def test_trained_tokenizer_end_to_end(tmp_path, capsys):
    """prepare -> train -> sample -> eval loss (bits per byte checked by hand) -> export -> AutoTokenizer."""
    import torch

    from gptlab.loading import load_checkpoint
    from gptlab.data import shards as S

    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(_corpus(7, 3000)), encoding="utf-8")
    assert main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "512", "--out",
                 str(tmp_path / "tok"), "--json"]) == 0
    capsys.readouterr()
    assert main(["prepare", "text", "--input", str(corpus), "--tokenizer", str(tmp_path / "tok"), "--out",
                 str(tmp_path / "data"), "--json"]) == 0
    capsys.readouterr()
    tok = load_tokenizer(tmp_path / "tok")
    m = S.read_manifest(tmp_path / "data")
    assert m["tokenizer"] == tok.spec() and m["dtype"] == "uint16"
    run = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "data"), "--out", str(run), "--max-steps", "3",
                 "--model.n_layer=1", "--model.n_head=2", "--model.n_embd=32", "--model.block_size=32",
                 "--batch.seq_len=32", "--batch.micro_batch=4", "--batch.batch_tokens=128",
                 "--eval.eval_every=3", "--eval.eval_tokens=512", "--eval.sample_every=0", "--logging.progress=false",
                 "--system.device=cpu", "--system.threads=1", "--json"]) == 0
    capsys.readouterr()
    assert (run / RANKS_FILE).is_file()  # the run dir carries its tokenizer
    assert main(["sample", "--init", str(run), "--prompt", "the quick", "--max-new-tokens", "4",
                 "--seed", "0"]) == 0
    capsys.readouterr()

    assert main(["eval", "loss", "--init", str(run), "--data", str(tmp_path / "data"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    model, mtok, _ = load_checkpoint(run)
    assert fingerprint(mtok) == fingerprint(tok)
    # Independent bits per byte: per-window cross-entropy from the model, bytes by decoding the targets.
    T = res["seq_len"]
    val = np.concatenate([S.read_shard(p) for p in S.shard_paths(tmp_path / "data", "val")]).astype(np.int64)
    nats, n_bytes = 0.0, 0
    with torch.no_grad():
        for w in range(res["windows"]):
            xy = torch.from_numpy(val[w * T: w * T + T + 1])[None]
            logits, _ = model(xy[:, :-1])
            nats += torch.nn.functional.cross_entropy(logits[0].double(), xy[0, 1:], reduction="sum").item()
            n_bytes += len(tok.decode_bytes(xy[0, 1:].tolist()))
    assert res["bytes"] == n_bytes
    assert res["bpb"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-5)
    assert res["loss"] == pytest.approx(nats / res["tokens"], rel=1e-5)

    # The trainer's validation (the first 512 val tokens, as windows of 32) reports the same bits per byte.
    from gptlab.metrics import read_metrics

    val = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "val"][-1]
    assert main(["eval", "loss", "--init", str(run), "--data", str(tmp_path / "data"), "--tokens", "512",
                 "--seq-len", "32", "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert val["val_bpb"] == pytest.approx(first["bpb"], rel=1e-5)
    assert val["val_loss"] == pytest.approx(first["loss"], rel=1e-5)

    # Fine-tuning on data made with another BPE of the same size is refused (the ids mean other things).
    other = tmp_path / "c2.txt"
    other.write_text("".join(_corpus(8, 3000)), encoding="utf-8")
    train_tokenizer(str(other), 512, tmp_path / "tok2", progress=False)
    assert main(["prepare", "text", "--input", str(other), "--tokenizer", str(tmp_path / "tok2"), "--out",
                 str(tmp_path / "data2"), "--json"]) == 0
    capsys.readouterr()
    assert main(["train", "--init", str(run), "--data", str(tmp_path / "data2"), "--out", str(tmp_path / "ft"),
                 "--max-steps", "1", "--system.device=cpu", "--batch.seq_len=32", "--batch.micro_batch=4",
                 "--batch.batch_tokens=128"]) == 1
    assert "fingerprint" in capsys.readouterr().err

    assert main(["export", "--init", str(run), "--out", str(tmp_path / "hf")]) == 0
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    for text in [t for t in ODD_TEXTS if "<|" not in t]:
        assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text), text
    assert hf.eos_token_id == tok.eot_id
