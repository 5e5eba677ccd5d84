"""Train a byte-level BPE tokenizer on a corpus (``gptlab tokenizer train``) and compare tokenizers.

Text is cut into pre-tokens by a regex (GPT-4's by default) and BPE merges are learned inside them,
starting from the 256 bytes, so every text encodes losslessly. The merges come from a library, never
from Python loops here: ``rustbpe`` (the default: GPT-4-style byte-ranked training, several times
faster than the alternative here) or Hugging Face ``tokenizers``. Either way the result is turned
into tiktoken mergeable ranks, and inference is tiktoken's (:class:`gptlab.tokenizer.BPETokenizer`).

The corpus is read document by document (a file, a glob, a directory or a named dataset), each
document of a JSON-lines/parquet/Hub corpus capped at ``doc_cap`` characters (plain text files are
running text, read whole), until ``max_chars`` characters; the last
:data:`HELDOUT_FRACTION` of those characters is held out to measure compression and never trained on.
Same corpus and flags give byte-identical output directories (no timestamps, sorted keys).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from gptlab.errors import GptlabError
from gptlab.tokenizer import DEFAULT_SPECIALS, PATTERNS, BPETokenizer

HELDOUT_FRACTION = 0.05  # of the characters read, for the compression measurement
TRAINERS = ("rustbpe", "tokenizers")
DEFAULT_PATTERN = "gpt4"


class TokenizerTrainError(GptlabError, ValueError):
    """Bad arguments to ``tokenizer train`` or an unusable corpus; the message names the flag."""


def resolve_pattern(pattern: str) -> str:
    """A pattern name (``gpt4``, ``gpt4-n2``, ``gpt2``) or a regex, checked to compile."""
    pat = PATTERNS.get(pattern, pattern)
    try:
        import regex

        regex.compile(pat)
    except ImportError:  # pragma: no cover - tiktoken brings regex
        pass
    except Exception as e:
        raise TokenizerTrainError(f"--pattern {pattern!r}: not a valid regex ({e}); use gpt4, gpt4-n2, gpt2 "
                                  f"or a regex") from None
    return pat


def corpus_documents(input: str, field: str = "text") -> tuple[Iterator[tuple[str, bool]], dict[str, Any]]:
    """``(text, is_document)`` units of ``input``: a named dataset (see ``gptlab prepare``; its val split is
    left out), else files, a directory or a glob. JSON-lines/parquet/Hub rows are documents (``doc_cap``
    applies); a plain text file is one running text, streamed in token-preserving pieces, read whole."""
    from gptlab.data import sources

    if input in sources.DATASETS:
        info = sources.get_dataset(input)
        make, src = sources.open_source(info, field_name=field)
        is_doc = info.layout == "documents" and info.name != "text"

        def named() -> Iterator[tuple[str, bool]]:
            for doc in make():
                if doc.split == "val":  # never train a tokenizer on the data's own held-out split
                    continue
                if is_doc:
                    yield "".join(doc.pieces), True
                else:
                    yield from ((piece, False) for piece in doc.pieces)

        return named(), {"dataset": input, **{k: v for k, v in src.items() if k in ("sha256", "hf_path", "module")}}
    paths = sources.expand_input(input)

    def local() -> Iterator[tuple[str, bool]]:
        for p in paths:
            structured = p.name.lower().endswith(sources.JSON_EXTENSIONS + sources.PARQUET_EXTENSIONS)
            for doc in sources.local_documents([p], field):
                if structured:
                    yield "".join(doc.pieces), True
                else:
                    yield from ((piece, False) for piece in doc.pieces)

    return local(), {"input": [p.name for p in paths]}


def collect_corpus(units: Iterator[tuple[str, bool]], max_chars: int, doc_cap: int,
                   progress: bool = False) -> tuple[list[str], str, int]:
    """``(train texts, held-out text, characters read)``: documents capped at ``doc_cap`` characters,
    ``max_chars`` in all, the last :data:`HELDOUT_FRACTION` of them held out."""
    out: list[str] = []
    n = 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=max_chars, desc="read corpus", unit="char", unit_scale=True, file=sys.stderr,
                   dynamic_ncols=True, mininterval=0.5)
    try:
        for doc, is_doc in units:
            if is_doc:
                doc = doc[:doc_cap]
            if n + len(doc) > max_chars:
                doc = doc[:max_chars - n]
            if doc:
                out.append(doc)
                n += len(doc)
                if bar is not None:
                    bar.update(len(doc))
            if n >= max_chars:
                break
    finally:
        if bar is not None:
            bar.close()
    if n == 0:
        raise TokenizerTrainError("the corpus is empty: nothing to train a tokenizer on")
    # Hold out the tail by characters, cutting inside the text that straddles the boundary.
    keep = n - int(n * HELDOUT_FRACTION)
    train: list[str] = []
    held: list[str] = []
    seen = 0
    for doc in out:
        if seen >= keep:
            held.append(doc)
        elif seen + len(doc) > keep:
            train.append(doc[:keep - seen])
            held.append(doc[keep - seen:])
        else:
            train.append(doc)
        seen += len(doc)
    return train, "".join(held), n


def _need(module: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise TokenizerTrainError(f"training a tokenizer with {module} needs it installed: pip install "
                                  f"'gptlab[tokenizer]' (or pick the other --trainer)")


def _train_rustbpe(docs: list[str], n_merges: int, pattern: str) -> list[tuple[bytes, int]]:
    _need("rustbpe")
    import rustbpe

    t = rustbpe.Tokenizer()
    t.train_from_iterator(iter(docs), 256 + n_merges, pattern=pattern)
    return sorted(((bytes(b), int(r)) for b, r in t.get_mergeable_ranks()), key=lambda x: x[1])


def _train_hf(docs: list[str], n_merges: int, pattern: str) -> list[tuple[bytes, int]]:
    _need("tokenizers")
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    from gptlab.tokenizer import _bytes_to_unicode

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=256 + n_merges, min_frequency=0, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    t.train_from_iterator(docs, trainer)
    import json

    u2b = {c: b for b, c in _bytes_to_unicode().items()}
    merges = json.loads(t.to_str())["model"]["merges"]
    out = [(bytes([b]), b) for b in range(256)]
    for m in merges:
        a, b = m if isinstance(m, list) else m.split(" ")
        out.append((bytes(u2b[c] for c in a + b), len(out)))
    return out


def merges_to_ranks(merged: Sequence[tuple[bytes, int]]) -> dict[bytes, int]:
    """Contiguous tiktoken ranks from ``(token bytes, rank)`` in training order; a merge that rebuilds an
    existing byte string (two pairs can spell the same bytes) adds no token, as in tiktoken's format."""
    ranks: dict[bytes, int] = {}
    for tok, _ in merged:
        if tok not in ranks:
            ranks[tok] = len(ranks)
    return ranks


def train_bpe(docs: list[str], vocab_size: int, *, pattern: str = DEFAULT_PATTERN,
              specials: Sequence[str] = DEFAULT_SPECIALS, trainer: str = "rustbpe") -> BPETokenizer:
    """Learn ``vocab_size - len(specials) - 256`` merges on ``docs`` and build the tiktoken tokenizer."""
    pat = resolve_pattern(pattern)
    specials = list(dict.fromkeys(specials))
    n_merges = vocab_size - 256 - len(specials)
    if n_merges < 0:
        raise TokenizerTrainError(f"--vocab-size {vocab_size}: must be at least 256 bytes + {len(specials)} special "
                                  f"tokens = {256 + len(specials)}")
    if vocab_size > 2**31 - 1:
        raise TokenizerTrainError(f"--vocab-size {vocab_size}: too large")
    if trainer == "rustbpe":
        merged = _train_rustbpe(docs, n_merges, pat)
    elif trainer == "tokenizers":
        merged = _train_hf(docs, n_merges, pat)
    else:
        raise TokenizerTrainError(f"--trainer {trainer!r}: expected one of {', '.join(TRAINERS)}")
    ranks = merges_to_ranks(merged)
    n = len(ranks)
    return BPETokenizer(ranks, pat, {s: n + i for i, s in enumerate(specials)})


def bytes_per_token(tok: Any, text: str) -> float:
    """Compression: UTF-8 bytes of ``text`` per token (plain text: no special tokens)."""
    ids = tok.encode(text)
    return len(text.encode("utf-8")) / max(len(ids), 1)


def train_tokenizer(input: str, vocab_size: int, out: str | os.PathLike, *, max_chars: int = 1_000_000_000,
                    doc_cap: int = 10_000, pattern: str = DEFAULT_PATTERN, specials: Sequence[str] = (),
                    trainer: str = "rustbpe", field: str = "text", overwrite: bool = False,
                    progress: bool = True) -> dict[str, Any]:
    """Train on ``input`` and write the tokenizer directory ``out``; return the summary (``--json``)."""
    if max_chars < 1:
        raise TokenizerTrainError(f"--max-chars {max_chars}: must be >= 1")
    if doc_cap < 1:
        raise TokenizerTrainError(f"--doc-cap {doc_cap}: must be >= 1")
    for s in specials:
        if not s or s.isspace():
            raise TokenizerTrainError(f"--special {s!r}: a special token must be non-empty text")
    out_dir = Path(out).expanduser()
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not overwrite)):
        raise TokenizerTrainError(f"--out {out_dir}: exists and is not an empty directory; pass --overwrite to "
                                  f"replace the tokenizer there, or choose another --out")
    pat = resolve_pattern(pattern)
    all_specials = list(dict.fromkeys([*DEFAULT_SPECIALS, *specials]))
    t0 = time.perf_counter()
    docs, src = corpus_documents(input, field)
    train_docs, held, n_chars = collect_corpus(docs, max_chars, doc_cap, progress)
    n_bytes = sum(len(d.encode("utf-8")) for d in train_docs)
    t1 = time.perf_counter()
    if progress:
        print(f"gptlab tokenizer train: learning {vocab_size - 256 - len(all_specials):,} merges on "
              f"{n_bytes / 1e6:.1f} MB with {trainer}...", file=sys.stderr)
    tok = train_bpe(train_docs, vocab_size, pattern=pat, specials=all_specials, trainer=trainer)
    t2 = time.perf_counter()
    compression = round(bytes_per_token(tok, held), 4) if held else None
    pattern_name = next((k for k, v in PATTERNS.items() if v == pat), "custom")
    training = {"trainer": trainer, "pattern_name": pattern_name, "max_chars": max_chars, "doc_cap": doc_cap,
                "train_bytes": n_bytes, "heldout_chars": len(held), "heldout_bytes_per_token": compression,
                "source": src}
    if tok.vocab_size != vocab_size:
        training["requested_vocab_size"] = vocab_size
    from gptlab.tokenizer import fingerprint

    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save_dir(out_dir, extra={"training": training})
    seconds = t2 - t1
    return {"out": str(out_dir), "vocab_size": tok.vocab_size, "merges": len(tok.ranks) - 256,
            "special_tokens": list(tok.special_tokens), "pattern": pattern_name, "trainer": trainer,
            "bytes": n_bytes, "chars": n_chars, "seconds": round(seconds, 4),
            "bytes_per_s": round(n_bytes / max(seconds, 1e-9), 1), "read_seconds": round(t1 - t0, 4),
            "compression": compression, "heldout_bytes": len(held.encode("utf-8")),
            "ranks_sha256": tok.ranks_sha256, "fingerprint": fingerprint(tok)}


def named_tokenizer(name: str, text_for_char: str | None = None) -> Any:
    """``gpt2``, ``char`` (its vocabulary from ``text_for_char``) or a trained tokenizer directory."""
    from gptlab.tokenizer import CharTokenizer, get_tokenizer

    if name == "char":
        return CharTokenizer.from_text(text_for_char or "")
    return get_tokenizer(name)


def compare_tokenizers(input: str | os.PathLike, names: Sequence[str], rounds: int = 3) -> dict[str, Any]:
    """Bytes per token and encoding tokens/s of each tokenizer on the text file ``input``.

    Timings alternate between tokenizers round by round (fair on a shared, noisy machine); the best
    round counts.
    """
    p = Path(input)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TokenizerTrainError(f"--input {p}: file not found") from None
    except UnicodeDecodeError as e:
        raise TokenizerTrainError(f"--input {p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text:
        raise TokenizerTrainError(f"--input {p}: empty file")
    toks = {n: named_tokenizer(n, text) for n in names}
    n_bytes = len(text.encode("utf-8"))
    best: dict[str, float] = {n: float("inf") for n in names}
    counts: dict[str, int] = {}
    for _ in range(max(1, rounds)):
        for n, tok in toks.items():
            t0 = time.perf_counter()
            ids = tok.encode(text)
            best[n] = min(best[n], time.perf_counter() - t0)
            counts[n] = len(ids)
    rows = [{"tokenizer": n, "vocab_size": toks[n].vocab_size, "tokens": counts[n],
             "bytes_per_token": round(n_bytes / max(counts[n], 1), 4),
             "tokens_per_s": round(counts[n] / max(best[n], 1e-9), 1)} for n in names]
    return {"input": str(p), "bytes": n_bytes, "rounds": rounds, "tokenizers": rows}
