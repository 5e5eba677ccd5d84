"""``gptlab prepare``: tokenize a corpus in parallel into token shards with a train/val split.

Pipeline (memory stays bounded whatever the corpus size):

    documents (streamed) -> text pieces -> batches of ~1 MB -> tokenizer threads (ordered, at most
    2 x workers batches in flight) -> EOT before each document -> train/val router -> one shard-sized
    buffer per split, flushed to ``NAME_SPLIT_NNNNNN.bin`` when full -> manifest.json last.

Parallelism is threads: tiktoken releases the GIL while encoding, and threads avoid pickling
every token list between processes. Work units are cut independently of the worker count and
results are consumed in order, so the shards are byte-identical for any ``--workers``.

Validation split rules (``DatasetInfo.val_rule``), all deterministic and streamable:

* ``chars`` (shakespeare, shakespeare_char, text): the last ``val_fraction`` of the characters is val,
  as nanoGPT's ``data[int(n*0.9):]`` (``text``: per file, cut at a byte offset moved to a character start).
* ``fraction`` (pydocs, jsonl, openwebtext, and any corpus given ``--val-fraction``): whole documents; a
  document goes to val when the val tokens so far are fewer than ``f`` x all tokens so far. Val ends
  within one document of ``f`` of the tokens, spread through the corpus (a corpus sorted by topic or
  date is sampled throughout), decided in stream order, so it needs no total in advance.
* ``first_tokens`` (fineweb_*): the first ``--shard-tokens`` tokens of the stream are val, the
  document that crosses the boundary continuing into train: build-nanogpt's "shard 0 is val".
* ``hf_split`` (tinystories): the Hub's own validation split.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from gptlab import fsio, hooks
from gptlab.data import shards as S
from gptlab.data import sources
from gptlab.errors import GptlabError
from gptlab.tokenizer import SPEC_FILE, BPETokenizer, CharTokenizer, GPT2Tokenizer, Tokenizer, load_tokenizer, save_tokenizer

BATCH_CHARS = 1 << 20  # characters per tokenizer work unit


class PrepareError(GptlabError, ValueError):
    """Bad arguments to ``prepare`` (the message names the flag)."""


def default_workers() -> int:
    """All cores this process may use."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def make_encoder(tok: Tokenizer) -> Callable[[list[str]], list[np.ndarray]]:
    """A thread-safe ``texts -> token arrays`` function for ``tok`` (corpus text is never special tokens)."""
    dtype = S.token_dtype(tok.vocab_size)
    if isinstance(tok, (GPT2Tokenizer, BPETokenizer)):
        enc = tok.enc
        if hasattr(enc, "encode_to_numpy"):
            # tiktoken >= 0.8 fills a buffer in Rust without the GIL (no Python list of ints); with no
            # special token allowed and none disallowed it is exactly encode_ordinary.
            def encode_bpe(texts: list[str]) -> list[np.ndarray]:
                return [enc.encode_to_numpy(t, allowed_special=set(), disallowed_special=()).astype(dtype)
                        for t in texts]
        else:  # pragma: no cover - older tiktoken
            def encode_bpe(texts: list[str]) -> list[np.ndarray]:
                return [np.array(enc.encode_ordinary(t), dtype=dtype) for t in texts]

        return encode_bpe
    if isinstance(tok, CharTokenizer):
        codes = np.array([ord(c) for c in tok.chars], dtype=np.int64)
        table = np.full(int(codes.max()) + 1, -1, dtype=np.int64)
        table[codes] = np.arange(len(codes))

        def encode_char(texts: list[str]) -> list[np.ndarray]:
            out = []
            for t in texts:
                cp = np.frombuffer(t.encode("utf-32-le"), dtype="<u4").astype(np.int64)
                ids = table[np.minimum(cp, table.size - 1)]
                bad = (ids < 0) | (cp >= table.size)
                if bad.any():
                    ch = chr(int(cp[np.argmax(bad)]))
                    raise PrepareError(f"character {ch!r} is not in the {tok.vocab_size}-character vocabulary")
                out.append(ids.astype(dtype))
            return out

        return encode_char

    def encode_generic(texts: list[str]) -> list[np.ndarray]:
        return [np.array(tok.encode(t), dtype=dtype) for t in texts]

    return encode_generic


def _batches(items: Iterable[tuple[Any, str]], batch_chars: int) -> Iterator[list[tuple[Any, str]]]:
    batch: list[tuple[Any, str]] = []
    size = 0
    for item in items:
        batch.append(item)
        size += len(item[1])
        if size >= batch_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def encode_stream(items: Iterable[tuple[Any, str]], encode: Callable[[list[str]], list[np.ndarray]],
                  workers: int = 1, batch_chars: int | None = None) -> Iterator[tuple[Any, np.ndarray]]:
    """Encode ``(tag, text)`` items in ``workers`` threads, yielding ``(tag, tokens)`` in input order.

    At most ``2 * workers`` batches are in flight, so memory is bounded on unbounded streams.
    """
    batch_chars = batch_chars or BATCH_CHARS
    if workers <= 1:
        for batch in _batches(items, batch_chars):
            yield from zip((tag for tag, _ in batch), encode([t for _, t in batch]))
        return
    pending: collections.deque = collections.deque()
    with cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gptlab-tok") as pool:
        try:
            for batch in _batches(items, batch_chars):
                pending.append(([tag for tag, _ in batch], pool.submit(encode, [t for _, t in batch])))
                if len(pending) >= 2 * workers:
                    tags, fut = pending.popleft()
                    yield from zip(tags, fut.result())
            while pending:
                tags, fut = pending.popleft()
                yield from zip(tags, fut.result())
        finally:
            for _, fut in pending:
                fut.cancel()


def tokenize_documents(docs: Iterable[str], tokenizer: Tokenizer, workers: int = 0, *, eot: bool = True,
                       batch_chars: int | None = None) -> Iterator[np.ndarray]:
    """Tokens of each document in order (``[eot] + tokens`` when ``eot`` and the tokenizer has one).

    This is prepare's own parallel path; ``gptlab bench prepare`` times it for 1..N workers.
    """
    encode = make_encoder(tokenizer)
    eot_arr = (np.array([tokenizer.eot_id], dtype=S.token_dtype(tokenizer.vocab_size))
               if eot and tokenizer.eot_id is not None else None)
    for _, toks in encode_stream(enumerate(docs), encode, workers or default_workers(), batch_chars):
        yield np.concatenate([eot_arr, toks]) if eot_arr is not None else toks


class ShardWriter:
    """Fills one shard-sized buffer for a split and writes ``NAME_SPLIT_NNNNNN.bin`` each time it is full."""

    def __init__(self, out_dir: Path, dataset: str, split: str, shard_tokens: int, vocab_size: int) -> None:
        self.out_dir, self.dataset, self.split = out_dir, dataset, split
        self.vocab_size = vocab_size
        self.buf = np.empty(shard_tokens, dtype=S.token_dtype(vocab_size))
        self.fill = 0
        self.tokens = 0
        self.documents = 0
        self.shards: list[dict[str, Any]] = []

    def add(self, tokens: np.ndarray) -> None:
        pos = 0
        while pos < tokens.size:
            take = min(self.buf.size - self.fill, tokens.size - pos)
            self.buf[self.fill:self.fill + take] = tokens[pos:pos + take]
            self.fill += take
            pos += take
            if self.fill == self.buf.size:
                self.flush()
        self.tokens += int(tokens.size)

    def flush(self) -> None:
        if self.fill == 0:
            return
        name = f"{self.dataset}_{self.split}_{len(self.shards):06d}.bin"
        sha = S.write_shard(self.out_dir / name, self.buf[:self.fill], self.vocab_size)
        self.shards.append({"file": name, "split": self.split, "tokens": int(self.fill), "sha256": sha})
        hooks.fire("shard_written", path=self.out_dir / name)
        self.fill = 0


def _char_vocab(make_docs: Callable[[], Iterator[sources.Document]]) -> CharTokenizer:
    chars: set[str] = set()
    for doc in make_docs():
        for piece in doc.pieces:
            chars.update(piece)
    if not chars:
        raise PrepareError("the corpus is empty: nothing to build a character vocabulary from")
    return CharTokenizer(sorted(chars))


def is_dataset_dir(d: Path) -> bool:
    """A directory ``prepare`` may write into: a gptlab dataset (a gptlab manifest.json), or empty."""
    try:
        m = json.loads((d / S.MANIFEST).read_text(encoding="utf-8"))
        return isinstance(m, dict) and m.get("format") == S.MANIFEST_FORMAT
    except (OSError, ValueError):
        return not any(d.iterdir()) if d.is_dir() else False


def _open_out(name: str, out: str | os.PathLike | None, overwrite: bool,
              own: Callable[[str], bool] | None = None) -> tuple[Path, fsio.DirLock]:
    """``--out`` checked (not ``/``, home, or someone else's files) and locked for this prepare; clears
    what an interrupted prepare of it left behind. Shard files this prepare would not write
    (``own(file_name)`` false), such as llm.c's, make it an error: a dataset prepared beside them would be
    mistaken for them, or they for it."""
    out_dir = Path(out).expanduser() if out else sources.default_data_dir(name)
    own = own or (lambda f: f.startswith(f"{name}_train_") or f.startswith(f"{name}_val_"))
    stray = [p.name for p in S.foreign_shard_files(out_dir) if not own(p.name)] if out_dir.is_dir() else []
    if stray:
        shown = ", ".join(stray[:3]) + (f" (+{len(stray) - 3} more)" if len(stray) > 3 else "")
        raise PrepareError(f"--out {out_dir}: holds token shards this prepare did not write ({shown}); "
                           f"a dataset is never prepared beside other shards: choose another --out (to use those "
                           f"shards as they are, pass the directory or a glob as --data)")
    out_dir = fsio.guard_out_dir(out_dir, "--out", is_dataset_dir, "dataset")
    lock = fsio.DirLock(out_dir, "dataset directory").acquire()
    try:
        fsio.recover_swap(out_dir)
        fsio.remove_leftovers(out_dir)
        if (out_dir / S.MANIFEST).exists() and not overwrite:
            raise PrepareError(f"{out_dir}: already holds a prepared dataset (manifest.json); pass --overwrite to "
                               f"replace it, or choose another --out")
    except BaseException:
        lock.release()
        raise
    return out_dir, lock


def _publish(tmp: Path, out_dir: Path) -> None:
    """Swap the complete new dataset in; the old one's shards and manifest go, anything else stays."""
    from gptlab.tokenizer import RANKS_FILE

    own = {S.MANIFEST, SPEC_FILE, RANKS_FILE}
    try:
        own |= {f for s in S.read_manifest(out_dir)["shards"] for f in (s["file"], s.get("mask")) if f}
    except GptlabError:
        pass
    fsio.replace_dir(tmp, out_dir, lambda n: n in own)
def _build_into(name: str, out: str | os.PathLike | None, overwrite: bool, write: Callable[[Path, Path], Any],
                own: Callable[[str], bool] | None = None) -> Any:
    """Lock ``--out``, let ``write(tmp, out_dir)`` build the whole dataset in a hidden dir beside it, then
    swap it in; on any failure (or Ctrl-C) the old dataset stays and the build dir goes."""
    out_dir, lock = _open_out(name, out, overwrite, own)
    tmp = fsio.temp_name(out_dir)
    try:
        res = write(tmp, out_dir)
        _publish(tmp, out_dir)
        return res
    finally:
        if tmp.exists():
            fsio.remove_dir(tmp)
        lock.release()




# llm.c's dev/data/tinyshakespeare.py: an EOT before every blank-line-separated section, the first 32,768
# tokens are val; its files are named so that llm.c's trainer finds them.
LLMC_SHAKESPEARE_VAL_TOKENS = 32_768
LLMC_SHAKESPEARE_FILES = {"val": "tiny_shakespeare_val.bin", "train": "tiny_shakespeare_train.bin"}


def llmc_shakespeare_tokens(text: str, tok: GPT2Tokenizer) -> np.ndarray:
    """llm.c's Tiny Shakespeare token stream: each ``\n\n``-separated section is a document that starts
    with ``<|endoftext|>`` and keeps its trailing ``\n\n`` (all but the last section)."""
    sections = text.split("\n\n")
    pieces = [s + "\n\n" if i < len(sections) - 1 else s for i, s in enumerate(sections)]
    encoded = tok.enc.encode_ordinary_batch(pieces)
    out = np.empty(sum(len(e) + 1 for e in encoded), dtype=np.uint16)
    pos = 0
    for e in encoded:
        out[pos] = tok.eot_id
        out[pos + 1:pos + 1 + len(e)] = e
        pos += len(e) + 1
    return out


def _prepare_llmc_shakespeare(name: str, *, input: str | os.PathLike | None, out: str | os.PathLike | None,
                              overwrite: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    info = sources.get_dataset(name)
    text, source_info = sources.shakespeare_text(info, input)
    tok = GPT2Tokenizer()
    tokens = llmc_shakespeare_tokens(text, tok)
    n_val = LLMC_SHAKESPEARE_VAL_TOKENS
    if tokens.size <= n_val:
        raise PrepareError(f"{name}: {tokens.size:,} tokens; llm.c's layout needs more than {n_val:,} (its val split)")
    docs = int((tokens == tok.eot_id).sum())

    def write(tmp: Path, out_dir: Path) -> list[dict[str, Any]]:
        tmp.mkdir(parents=True)
        entries = []
        for split, part in (("val", tokens[:n_val]), ("train", tokens[n_val:])):
            f = LLMC_SHAKESPEARE_FILES[split]
            entries.append({"file": f, "split": split, "tokens": int(part.size),
                            "sha256": S.write_shard(tmp / f, part, tok.vocab_size)})
        manifest = S.build_manifest(dataset=name, tokenizer_spec=tok.spec(), vocab_size=tok.vocab_size,
                                    eot_id=tok.eot_id, shards=entries,
                                    source={**source_info, "layout": "llmc", "val_rule": "first_tokens",
                                            "val_tokens": n_val},
                                    extra={"documents": docs, "layout": "llmc"})
        S.write_manifest(tmp, manifest)
        return entries

    entries = _build_into(name, out, overwrite, write, own=lambda f: f in LLMC_SHAKESPEARE_FILES.values())
    out_dir = Path(out).expanduser() if out else sources.default_data_dir(name)
    seconds = time.perf_counter() - t0
    return {"dataset": name, "out": str(out_dir), "tokenizer": "gpt2", "vocab_size": tok.vocab_size,
            "eot_id": tok.eot_id, "val_rule": "first_tokens", "layout": "llmc", "documents": docs,
            "splits": {sp: {"tokens": e["tokens"], "shards": [e["file"]]} for sp, e in
                       ((e["split"], e) for e in entries)},
            "seconds": round(seconds, 4), "tokens_per_s": round(tokens.size / max(seconds, 1e-9), 1), "workers": 1,
            "warnings": []}


def prepare_dataset(name: str, *, input: str | os.PathLike | None = None, out: str | os.PathLike | None = None,
                    workers: int = 0, shard_tokens: int = 100_000_000, val_fraction: float | None = None,
                    field: str = "text", tokenizer: str | None = None, max_docs: int | None = None,
                    overwrite: bool = False, progress: bool = True, layout: str = "gptlab",
                    seq_len: int | None = None) -> dict[str, Any]:
    """Tokenize dataset ``name`` into shards under ``out`` and write ``manifest.json``; return a summary.

    ``layout="llmc"`` (``shakespeare`` only) writes llm.c's Tiny Shakespeare stream and split byte for
    byte instead of nanoGPT's (see :func:`llmc_shakespeare_tokens`). A chat dataset (``chat``,
    ``smoltalk``) goes to :func:`prepare_chat` (``seq_len``: its row length).

    The summary: ``{"dataset", "out", "tokenizer", "vocab_size", "eot_id", "val_rule", "documents",
    "splits": {split: {"tokens", "shards": [file, ...], "documents"}}, "seconds", "tokens_per_s", "workers"}``.
    """
    info = sources.get_dataset(name)
    if info.layout == "chat":
        return prepare_chat(name, input=input, out=out, tokenizer=tokenizer, seq_len=seq_len or 1024,
                            workers=workers, shard_tokens=shard_tokens, val_fraction=val_fraction,
                            max_docs=max_docs, overwrite=overwrite, progress=progress)
    if seq_len is not None:
        raise PrepareError(f"--seq-len applies to chat datasets only, not {name!r}")
    if layout not in ("gptlab", "llmc"):
        raise PrepareError(f"--layout {layout!r}: expected 'gptlab' or 'llmc'")
    if layout == "llmc":
        if name != "shakespeare" or tokenizer not in (None, "gpt2") or val_fraction is not None:
            raise PrepareError(f"--layout llmc: only for `prepare shakespeare` (GPT-2 BPE, llm.c's fixed 32,768 val "
                               f"tokens), without --tokenizer or --val-fraction")
        return _prepare_llmc_shakespeare(name, input=input, out=out, overwrite=overwrite)
    if not 1 <= shard_tokens <= S.MAX_SHARD_TOKENS:
        raise PrepareError(f"--shard-tokens {shard_tokens}: must be between 1 and {S.MAX_SHARD_TOKENS}")
    if val_fraction is not None and not 0.0 <= val_fraction < 1.0:
        raise PrepareError(f"--val-fraction {val_fraction}: must be in [0, 1)")
    if workers < 0:
        raise PrepareError(f"--workers {workers}: must be >= 0 (0 = all cores)")
    if max_docs is not None and max_docs < 1:
        raise PrepareError(f"--max-docs {max_docs}: must be >= 1")
    workers = workers or default_workers()
    t0 = time.perf_counter()
    return _build_into(name, out, overwrite, lambda tmp, out_dir: _prepare(
        name, info, input, out_dir, tmp, workers, shard_tokens, val_fraction, field, tokenizer, max_docs, progress,
        t0))


def _prepare(name: str, info: sources.DatasetInfo, input: str | os.PathLike | None, out_dir: Path, tmp: Path,
             workers: int, shard_tokens: int, val_fraction: float | None, field: str, tokenizer: str | None,
             max_docs: int | None, progress: bool, t0: float) -> dict[str, Any]:
    """The tokenizing pass of :func:`prepare_dataset`, writing shards and manifest into ``tmp``."""
    make_docs, source_info = sources.open_source(info, input=input, field_name=field, val_fraction=val_fraction,
                                                 max_docs=max_docs)
    tok_name = tokenizer or info.tokenizer
    tok: Tokenizer | None = None
    if tok_name not in ("gpt2", "char"):
        if not Path(tok_name).expanduser().exists():
            raise PrepareError(f"--tokenizer {tok_name!r}: expected 'gpt2', 'char' or a tokenizer directory "
                               f"(made by gptlab tokenizer train)")
        tok = load_tokenizer(Path(tok_name).expanduser())
    if tok_name == "char":
        tok = _char_vocab(make_docs)

    chars = 0

    def items() -> Iterator[tuple[tuple[int, bool, str | None], str]]:
        nonlocal chars
        for i, doc in enumerate(make_docs()):
            first = True
            for piece in doc.pieces:
                chars += len(piece)
                yield (i, first, doc.split), piece
                first = False
            if first:  # an empty document still counts (and still gets its EOT)
                yield (i, True, doc.split), ""

    # Pull the first piece before anything slow or visible: an offline source fails here, in
    # seconds, and leaves no --out directory behind.
    stream = items()
    head = next(stream, None)
    stream = itertools.chain([head] if head is not None else [], stream)
    if tok is None:
        tok = GPT2Tokenizer()

    rule = info.val_rule
    if rule in ("hf_split", "first_tokens") and val_fraction is not None:
        rule = "fraction"
    if rule == "hf_split" and input is not None:
        rule = "fraction"  # local copies carry no split of their own
    frac = val_fraction if val_fraction is not None else (info.val_fraction if info.val_fraction is not None else 0.1)
    val_tokens = shard_tokens  # first_tokens: build-nanogpt's first shard

    vocab = tok.vocab_size
    dtype = S.token_dtype(vocab)
    use_eot = info.layout == "documents" and tok.eot_id is not None
    eot = np.array([tok.eot_id if tok.eot_id is not None else 0], dtype=dtype)
    tmp.mkdir(parents=True)
    writers = {sp: ShardWriter(tmp, name, sp, shard_tokens, vocab) for sp in ("train", "val")}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc=f"prepare {name}", unit=" docs", file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
    ndocs = 0
    total = 0
    doc_split = "train"
    last_post = 0.0
    try:
        for (i, first, split), toks in encode_stream(stream, make_encoder(tok), workers, BATCH_CHARS):
            new_doc = first
            if first:
                ndocs += 1
                if use_eot:
                    toks = np.concatenate([eot, toks])
            if split is None:
                if rule == "fraction":
                    if first:  # decided once per document, at its first piece
                        held = writers["val"].tokens
                        doc_split = "val" if held < frac * (held + writers["train"].tokens) else "train"
                    split = doc_split
                else:
                    split = "train"
                    room = val_tokens - writers["val"].tokens if rule == "first_tokens" else 0
                    if room > 0:  # fill val exactly; the rest of this document starts train
                        writers["val"].add(toks[:room])
                        writers["val"].documents += int(first)
                        toks, first = toks[room:], False
            w = writers[split]
            w.add(toks)
            w.documents += int(first)
            if bar is not None and new_doc:
                bar.update(1)
                now = time.perf_counter()
                if now - last_post > 0.5:
                    last_post = now
                    total = writers["train"].tokens + writers["val"].tokens
                    bar.set_postfix_str(f"{total:,} tokens, {total / max(now - t0, 1e-9) / 1e6:.2f}M tok/s", refresh=False)
        for w in writers.values():
            w.flush()
        if bar is not None:  # the bar's last line shows the final counts, not the last throttled ones
            total = writers["train"].tokens + writers["val"].tokens
            bar.set_postfix_str(f"{total:,} tokens, {total / max(time.perf_counter() - t0, 1e-9) / 1e6:.2f}M tok/s",
                                refresh=False)
    finally:
        if bar is not None:
            bar.close()

    total = writers["train"].tokens + writers["val"].tokens
    if chars == 0:
        where = f"--input {input}" if input is not None else name
        raise PrepareError(f"{where}: the input is empty (no text in {ndocs} documents); nothing to prepare")
    if writers["train"].tokens == 0:
        hint = ("the first --shard-tokens tokens are val (build-nanogpt's first shard); pass a smaller "
                "--shard-tokens or --val-fraction F" if rule == "first_tokens" else "give it more text")
        raise PrepareError(f"{name}: no training tokens out of {total:,} ({hint})")
    warnings = []
    if frac > 0 and rule != "hf_split" and writers["val"].tokens == 0:
        warnings.append(f"{name}: the val split is empty ({ndocs} documents, val rule {rule!r}); "
                        f"evaluation needs one: pass a larger --val-fraction or more documents")
    seconds = time.perf_counter() - t0
    shard_list = writers["train"].shards + writers["val"].shards
    source_info = {**source_info, "val_rule": rule,
                   **({"val_fraction": frac} if rule in ("fraction", "chars") else {}),
                   **({"val_tokens": val_tokens} if rule == "first_tokens" else {})}
    manifest = S.build_manifest(dataset=name, tokenizer_spec=tok.spec(), vocab_size=vocab, eot_id=tok.eot_id,
                                shards=shard_list, source=source_info,
                                extra={"documents": ndocs, "shard_tokens": shard_tokens})
    if isinstance(tok, BPETokenizer):  # the ranks the manifest's spec names, so the directory is self-contained
        save_tokenizer(tok, tmp / SPEC_FILE)
    S.write_manifest(tmp, manifest)
    splits = {sp: {"tokens": w.tokens, "shards": [s["file"] for s in w.shards], "documents": w.documents}
              for sp, w in writers.items() if w.tokens or sp == "train"}
    return {"dataset": name, "out": str(out_dir), "tokenizer": tok.spec()["type"], "vocab_size": vocab,
            "eot_id": tok.eot_id, "val_rule": rule, "documents": ndocs, "splits": splits,
            "seconds": round(seconds, 4), "tokens_per_s": round(total / max(seconds, 1e-9), 1), "workers": workers,
            "warnings": warnings}


# ----------------------------------------------------------------------------- chat (SFT) datasets


def resolve_tokenizer(arg: str | None) -> Tokenizer:
    """``--tokenizer`` for chat data: ``gpt2`` (default), a tokenizer spec file, or a directory that holds
    one (a run dir's ``tokenizer.json``, a prepared dataset's manifest, an export's ``gptlab_tokenizer.json``).

    Chat data must use the tokenizer of the model it will fine-tune, so a char vocabulary is never
    rebuilt from the conversations: point at the base run instead.
    """
    from gptlab.tokenizer import TokenizerError, from_spec, get_tokenizer, load_tokenizer

    if arg in (None, "", "gpt2"):
        return GPT2Tokenizer()
    if arg == "char":
        raise PrepareError("--tokenizer char: a character vocabulary must be the base model's; pass the base run "
                           "directory (its tokenizer.json) instead")
    p = Path(arg).expanduser()
    if p.is_file():
        return load_tokenizer(p)
    if p.is_dir():
        if (p / S.MANIFEST).is_file():
            return from_spec(S.read_manifest(p)["tokenizer"])
        for name in ("gptlab_tokenizer.json", "tokenizer.json"):
            if (p / name).is_file():
                try:
                    return load_tokenizer(p / name)
                except TokenizerError:
                    continue
        try:  # a trained tokenizer directory (gptlab tokenizer train), when that exists
            return get_tokenizer(str(p))
        except TokenizerError:
            pass
        raise PrepareError(f"--tokenizer {arg}: no gptlab tokenizer found in this directory (expected a run dir, "
                           f"a prepared dataset or a tokenizer directory)")
    raise PrepareError(f"--tokenizer {arg}: expected gpt2, a tokenizer file or a directory holding one")


class _RowWriter:
    """Collects packed rows of one split and writes token + mask shards of whole rows (plus one pad token:
    the loader's sequence s is tokens [s*T, s*T + T + 1), so the last row needs a final target)."""

    def __init__(self, out_dir: Path, dataset: str, split: str, rows_per_shard: int, row_len: int,
                 vocab_size: int, pad_id: int) -> None:
        self.out_dir, self.dataset, self.split = out_dir, dataset, split
        self.rows_per_shard, self.T, self.vocab, self.pad_id = rows_per_shard, row_len, vocab_size, pad_id
        self.ids: list[np.ndarray] = []
        self.masks: list[np.ndarray] = []
        self.shards: list[dict[str, Any]] = []
        self.tokens = 0
        self.documents = 0

    def add(self, ids: np.ndarray, mask: np.ndarray) -> None:
        self.ids.append(ids)
        self.masks.append(mask)
        if len(self.ids) == self.rows_per_shard:
            self.flush()

    def flush(self) -> None:
        if not self.ids:
            return
        ids = np.concatenate(self.ids + [np.array([self.pad_id])])
        mask = np.concatenate(self.masks + [np.zeros(1, dtype=np.uint8)])
        stem = f"{self.dataset}_{self.split}_{len(self.shards):06d}"
        sha = S.write_shard(self.out_dir / f"{stem}.bin", ids, self.vocab)
        msha = S.write_mask(self.out_dir / f"{stem}.mask", mask)
        self.shards.append({"file": f"{stem}.bin", "split": self.split, "tokens": int(ids.size), "sha256": sha,
                            "mask": f"{stem}.mask", "mask_sha256": msha})
        self.tokens += int(ids.size)
        self.ids, self.masks = [], []


def prepare_chat(name: str = "chat", *, input: str | os.PathLike | None = None, out: str | os.PathLike | None = None,
                 tokenizer: str | Tokenizer | None = None, seq_len: int = 1024, workers: int = 0,
                 shard_tokens: int = 100_000_000, val_fraction: float | None = None, max_docs: int | None = None,
                 overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Render conversations with the chat template and pack them into rows of ``seq_len`` tokens with a
    loss mask (see :mod:`gptlab.chat` and :mod:`gptlab.data.shards`); returns a summary like
    :func:`prepare_dataset`'s plus ``"chat"`` (rows, cropped, dropped, target tokens).

    Every row starts a conversation; packing is best fit within each split, padding is masked, and a
    conversation longer than a row is cut at the row's end. The first bad record stops everything with
    ``FILE:LINE: what is wrong`` before anything is written to ``--out``.
    """
    from gptlab.chat import TEMPLATE_NAME, BestFitPacker, ChatTemplate, PackStats, with_chat_tokens

    info = sources.get_dataset(name)
    if info.layout != "chat":
        raise PrepareError(f"{name}: not a chat dataset (chat datasets: "
                           f"{', '.join(n for n, d in sources.DATASETS.items() if d.layout == 'chat')})")
    if seq_len < 2:
        raise PrepareError(f"--seq-len {seq_len}: must be >= 2")
    if val_fraction is not None and not 0.0 <= val_fraction < 1.0:
        raise PrepareError(f"--val-fraction {val_fraction}: must be in [0, 1)")
    workers = workers or default_workers()
    t0 = time.perf_counter()
    base = tokenizer if tokenizer is not None and not isinstance(tokenizer, str) else resolve_tokenizer(tokenizer)
    tok = with_chat_tokens(base)
    tmpl = ChatTemplate.for_tokenizer(tok)
    make, source_info = sources.open_chat_source(info, input=input, max_docs=max_docs)
    frac = val_fraction if val_fraction is not None else (info.val_fraction or 0.0)
    rule = "hf_split" if info.val_rule == "hf_split" and input is None and val_fraction is None else "fraction"

    # Pull the first conversation before touching --out: a missing file or a bad first line fails with
    # nothing written. The dataset is built beside --out and swapped in whole: a later bad line leaves
    # --out as it was.
    stream = make()
    head = next(stream, None)
    if head is None:
        raise PrepareError(f"{name}: no conversations in the input")
    stream = itertools.chain([head], stream)

    def write(tmp: Path, out_dir: Path) -> dict[str, Any]:  # into a hidden dir beside --out, then swapped in
        pad_id = tok.eot_id if tok.eot_id is not None else tmpl.stop_id
        rows_per_shard = max(1, (min(shard_tokens, S.MAX_SHARD_TOKENS) - 1) // seq_len)
        stats = {sp: PackStats() for sp in ("train", "val")}
        packers = {sp: BestFitPacker(seq_len, pad_id, stats=stats[sp]) for sp in ("train", "val")}
        writers = {sp: _RowWriter(tmp, name, sp, rows_per_shard, seq_len, tok.vocab_size, pad_id)
                   for sp in ("train", "val")}
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(desc=f"prepare {name}", unit=" conversations", file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
        n = 0
        try:
            for chunk in iter(lambda: list(itertools.islice(stream, 1024)), []):
                splits = []
                for msgs, _where, split in chunk:
                    if split is None or rule == "fraction":  # whole conversations, spread through the input
                        split = "val" if writers["val"].documents < frac * (n + 1) else "train"
                    writers[split].documents += 1
                    splits.append(split)
                    n += 1
                try:
                    rendered = tmpl.render_many([c[0] for c in chunk], workers)
                except GptlabError:  # find the conversation, to name its line
                    for msgs, where, _ in chunk:
                        try:
                            tmpl.render(msgs, where=where)
                        except GptlabError as e:
                            raise PrepareError(f"{where}: {e}") from None
                    raise
                for split, (ids, mask) in zip(splits, rendered):
                    for row in packers[split].add(ids, mask):
                        writers[split].add(*row)
                if bar is not None:
                    bar.update(len(chunk))
            for sp in ("train", "val"):
                for row in packers[sp].finish():
                    writers[sp].add(*row)
                writers[sp].flush()
        finally:
            if bar is not None:
                bar.close()
        if not writers["train"].shards:
            raise PrepareError(f"{name}: no training row has an assistant token ({n} conversations, rows of {seq_len} "
                               f"tokens); give it more conversations, a smaller --val-fraction or a larger --seq-len")
        warnings = []
        if (frac > 0 or rule == "hf_split") and not writers["val"].shards:
            warnings.append(f"{name}: the val split is empty ({n} conversations); evaluation needs one: pass a larger "
                            f"--val-fraction or more conversations")
        cropped = sum(s.cropped for s in stats.values())
        if cropped:
            warnings.append(f"{name}: {cropped} conversation(s) longer than --seq-len {seq_len} were cut at the row end")
        chat_info = {"template": TEMPLATE_NAME, "seq_len": seq_len, "pad_id": pad_id,
                     **{f"{sp}_{k}": getattr(st, k) for sp, st in stats.items()
                        for k in ("conversations", "rows", "cropped", "dropped", "targets", "pad") if st.conversations}}
        shard_list = [s for w in writers.values() for s in w.shards]
        manifest = S.build_manifest(dataset=name, tokenizer_spec=tok.spec(), vocab_size=tok.vocab_size,
                                    eot_id=tok.eot_id, shards=shard_list,
                                    source={**source_info, "val_rule": rule, "val_fraction": frac},
                                    extra={"documents": n, "shard_tokens": shard_tokens, "chat": chat_info})
        S.write_manifest(tmp, manifest)
        seconds = time.perf_counter() - t0
        total = sum(w.tokens for w in writers.values())
        splits = {sp: {"tokens": w.tokens, "shards": [s["file"] for s in w.shards], "documents": w.documents}
                  for sp, w in writers.items() if w.shards}
        return {"dataset": name, "out": str(out_dir), "tokenizer": tok.spec()["type"], "vocab_size": tok.vocab_size,
                "eot_id": tok.eot_id, "val_rule": rule, "documents": n, "splits": splits, "chat": chat_info,
                "seconds": round(seconds, 4), "tokens_per_s": round(total / max(seconds, 1e-9), 1),
                "workers": workers, "warnings": warnings}

    return _build_into(name, out, overwrite, write)
