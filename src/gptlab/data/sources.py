"""The dataset registry: where each corpus comes from, and how it is read as a stream of documents.

Every named dataset takes local input (``--input PATH|DIR|GLOB``) so it works without a network;
without it, Tiny Shakespeare is downloaded (SHA-256-checked, cached under the data home) and the
Hub corpora are streamed through ``datasets``. ``pydocs`` is Python's own bundled documentation
(``pydoc_data.topics``): always offline.

A source yields :class:`Document` objects: the text as one or more *pieces* (long texts are cut
only where GPT-2's pre-tokenizer would split anyway, see :func:`iter_safe_pieces`, so cutting never
changes the tokens) and, when the source decides it, the split the document belongs to.
"""

from __future__ import annotations

import difflib
import glob as globlib
import gzip
import io
import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from gptlab.errors import GptlabError

DATA_HOME_ENV = "GPTLAB_DATA_HOME"
TEXT_EXTENSIONS = (".txt", ".text", ".md", ".rst")
JSON_EXTENSIONS = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".ndjson")
PARQUET_EXTENSIONS = (".parquet",)
# Text is read and cut into pieces of about this many characters (bounded memory, parallel work units).
PIECE_CHARS = 1 << 18


class SourceError(GptlabError, ValueError):
    """A corpus cannot be found, downloaded or read; the message says what to pass instead."""


@dataclass(frozen=True)
class DatasetInfo:
    """One named corpus: origin, default tokenizer and train/val rule.

    ``layout``: ``"text"`` is one running text split by characters and tokenized without document
    delimiters (nanoGPT's Shakespeare); ``"documents"`` puts ``<|endoftext|>`` before every document
    (build-nanogpt's fineweb.py); ``"chat"`` is conversations (:func:`open_chat_source`). ``val_rule`` is one of ``chars`` (last ``val_fraction`` of the
    characters, per file), ``fraction`` (whole documents, ``val_fraction`` of the tokens, spread through),
    ``hf_split`` (the Hub's own validation split) or ``first_tokens`` (the first shard's worth of
    tokens, as build-nanogpt's first shard).
    """

    name: str
    description: str
    tokenizer: str = "gpt2"
    layout: str = "documents"
    val_rule: str = "fraction"
    val_fraction: float | None = 0.1
    url: str | None = None
    sha256: str | None = None
    size_bytes: int | None = None
    filename: str | None = None
    hf_path: str | None = None
    hf_name: str | None = None
    hf_split: str = "train"
    hf_val_split: str | None = None
    download: str = ""
    local_only: bool = False
    vocab_size: int | None = None  # when the tokenizer's vocabulary is fixed before preparing (char on a pinned corpus)


TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TINY_SHAKESPEARE_BYTES = 1_115_394

_SHAKESPEARE = dict(url=TINY_SHAKESPEARE_URL, sha256=TINY_SHAKESPEARE_SHA256, size_bytes=TINY_SHAKESPEARE_BYTES,
                    filename="tinyshakespeare.txt", layout="text", val_rule="chars", val_fraction=0.1,
                    download=f"Tiny Shakespeare ({TINY_SHAKESPEARE_BYTES:,} bytes) from {TINY_SHAKESPEARE_URL}")

DATASETS: dict[str, DatasetInfo] = {d.name: d for d in [
    DatasetInfo("shakespeare_char", "Tiny Shakespeare, character-level (vocabulary = its 65 characters)",
                tokenizer="char", vocab_size=65, **_SHAKESPEARE),
    DatasetInfo("shakespeare", "Tiny Shakespeare, GPT-2 BPE", tokenizer="gpt2", **_SHAKESPEARE),
    DatasetInfo("tinystories", "TinyStories (roneneldan/TinyStories), ~2.1M short stories, ~470M GPT-2 tokens",
                hf_path="roneneldan/TinyStories", hf_val_split="validation", val_rule="hf_split", val_fraction=None,
                download="roneneldan/TinyStories (train + validation, ~1.9 GB) from the Hugging Face Hub"),
    DatasetInfo("openwebtext", "OpenWebText (Skylion007/openwebtext), ~8M web pages, ~9B GPT-2 tokens",
                hf_path="Skylion007/openwebtext", val_rule="fraction", val_fraction=0.0005,
                download="Skylion007/openwebtext (~40 GB of text) from the Hugging Face Hub"),
    DatasetInfo("fineweb_edu_10b", "FineWeb-Edu sample-10BT (build-nanogpt's corpus), ~10B GPT-2 tokens",
                hf_path="HuggingFaceFW/fineweb-edu", hf_name="sample-10BT", val_rule="first_tokens", val_fraction=None,
                download="HuggingFaceFW/fineweb-edu, config sample-10BT (~28 GB parquet) from the Hugging Face Hub"),
    DatasetInfo("fineweb_edu_100b", "FineWeb-Edu sample-100BT, ~100B GPT-2 tokens",
                hf_path="HuggingFaceFW/fineweb-edu", hf_name="sample-100BT", val_rule="first_tokens", val_fraction=None,
                download="HuggingFaceFW/fineweb-edu, config sample-100BT (~280 GB parquet) from the Hugging Face Hub"),
    DatasetInfo("fineweb_10b", "FineWeb sample-10BT, ~10B GPT-2 tokens",
                hf_path="HuggingFaceFW/fineweb", hf_name="sample-10BT", val_rule="first_tokens", val_fraction=None,
                download="HuggingFaceFW/fineweb, config sample-10BT (~30 GB parquet) from the Hugging Face Hub"),
    DatasetInfo("pydocs", "Python's bundled documentation topics (pydoc_data.topics): offline quick-start corpus",
                val_rule="fraction", val_fraction=0.1, download="nothing (ships with Python)"),
    DatasetInfo("text", "local text files: each file is a document, its last 10% of characters held out for val",
                val_rule="chars", val_fraction=0.1, local_only=True),
    DatasetInfo("jsonl", "local JSON-lines files (one document per line, text in --field)",
                val_rule="fraction", val_fraction=0.1, local_only=True),
    # Conversations for supervised fine-tuning (gptlab.chat): rendered with the chat template, packed
    # into rows with a loss mask. Records are {"messages": [{"role", "content"}, ...]}.
    DatasetInfo("chat", "local conversations: JSON lines of {\"messages\": [{\"role\", \"content\"}, ...]}",
                layout="chat", val_rule="fraction", val_fraction=0.05, local_only=True),
    DatasetInfo("smoltalk", "SmolTalk (HuggingFaceTB/smoltalk, config all), ~1M chat conversations for SFT",
                layout="chat", hf_path="HuggingFaceTB/smoltalk", hf_name="all", hf_val_split="test",
                val_rule="hf_split", val_fraction=None,
                download="HuggingFaceTB/smoltalk, config all (train + test, ~4 GB parquet) from the Hugging Face Hub"),
]}


@dataclass
class Document:
    """A document as text pieces (concatenated they are the document) and, if the source fixes it, its split."""

    pieces: Iterable[str]
    split: str | None = None


def data_home() -> Path:
    """Root for prepared datasets and downloads: ``$GPTLAB_DATA_HOME`` or ``~/.cache/gptlab/data``."""
    env = os.environ.get(DATA_HOME_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gptlab" / "data"


def default_data_dir(name: str) -> Path:
    """Where ``gptlab prepare NAME`` writes when no ``--out`` is given."""
    return data_home() / name


def get_dataset(name: str) -> DatasetInfo:
    """Look up a named dataset; unknown names are an error listing the valid ones."""
    if name not in DATASETS:
        match = difflib.get_close_matches(name, list(DATASETS), n=1, cutoff=0.5)
        hint = f" (did you mean {match[0]!r}?)" if match else ""
        raise SourceError(f"unknown dataset {name!r}{hint}; choose one of: {', '.join(DATASETS)}")
    return DATASETS[name]


# ----------------------------------------------------------------------------- local files

def expand_input(spec: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """A file, a directory (its files, recursively, sorted) or a glob -> sorted list of files."""
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    out: list[Path] = []
    for s in specs:
        p = Path(s).expanduser()
        if p.is_file():
            out.append(p)
        elif p.is_dir():
            out.extend(sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith(".")))
        else:
            matches = sorted(Path(m) for m in globlib.glob(str(p), recursive=True) if Path(m).is_file())
            if not matches:
                raise SourceError(f"--input {s}: no such file, directory or glob match")
            out.extend(matches)
    if not out:
        raise SourceError(f"--input {spec}: no files found")
    return out


def is_safe_cut(text: str, i: int) -> bool:
    """True when GPT-2 tokenization of ``text[:i]`` + ``text[i:]`` equals that of ``text``.

    GPT-2's pre-tokenizer regex makes a newline between two non-space characters a pre-token of
    its own (``"\\n"``, or ``"\\r"`` + ``"\\n"`` for CRLF), and BPE never merges across pre-tokens;
    cutting right after the LF (or between CR and LF) therefore leaves every token unchanged, since
    the regex has no look-behind and ``\\s++$`` at a piece's end matches the same newline alone.
    """
    if not 2 <= i < len(text):
        return False
    if text[i - 1] == "\n":  # ...X\n|Y...
        return not text[i].isspace() and not text[i - 2].isspace()
    # ...X\r|\nY...
    return (text[i - 1] == "\r" and text[i] == "\n" and i + 1 < len(text) and not text[i + 1].isspace()
            and not text[i - 2].isspace())


def _safe_cut_at(text: str, j: int) -> int:
    """A safe cut next to the newline at ``text[j]``, or -1."""
    if is_safe_cut(text, j + 1):
        return j + 1
    return j if is_safe_cut(text, j) else -1


def _last_safe_cut(text: str, lo: int) -> int:
    j = text.rfind("\n", lo)
    while j >= lo:
        if (cut := _safe_cut_at(text, j)) > 0:
            return cut
        j = text.rfind("\n", lo, j)
    return -1


def _first_safe_cut(text: str, lo: int) -> int:
    j = text.find("\n", max(lo - 1, 0))
    while j >= 0:
        if (cut := _safe_cut_at(text, j)) > 0:
            return cut
        j = text.find("\n", j + 1)
    return -1


def iter_safe_pieces(blocks: Iterable[str], piece_chars: int | None = None) -> Iterator[str]:
    """Re-cut a stream of text blocks into pieces of about ``piece_chars`` at token-preserving cuts."""
    piece_chars = piece_chars or PIECE_CHARS
    buf = ""
    for block in blocks:
        buf += block
        while len(buf) >= 2 * piece_chars:
            cut = _last_safe_cut(buf[: 2 * piece_chars], piece_chars // 2)
            if cut <= 0:
                cut = _first_safe_cut(buf, 2 * piece_chars)
            if cut <= 0:
                break  # no safe cut yet: keep reading (a single huge line stays in one piece)
            yield buf[:cut]
            buf = buf[cut:]
    if buf:
        yield buf


def iter_text_pieces(text: str, piece_chars: int | None = None) -> Iterator[str]:
    """An in-memory text as token-preserving pieces."""
    piece_chars = piece_chars or PIECE_CHARS
    yield from iter_safe_pieces((text[i:i + piece_chars] for i in range(0, len(text), piece_chars)), piece_chars)


def _not_text(path: Path, offset: int, why: str) -> SourceError:
    return SourceError(f"{path}: not UTF-8 text ({why} near byte {offset:,}); pass text files only (a binary "
                       f"or differently encoded file cannot be tokenized as text)")


def _read_blocks(path: Path, start: int = 0, stop: int | None = None, block: int = 1 << 20) -> Iterator[str]:
    """Decode ``path``'s bytes ``[start, stop)`` as UTF-8 in blocks (incremental: no split characters).

    Bytes that are not UTF-8, and NUL characters (which text never holds), are a :class:`SourceError`
    naming the file: a binary file must not become a corpus of replacement characters.
    """
    import codecs

    dec = codecs.getincrementaldecoder("utf-8")(errors="strict")
    pos = start
    with open(path, "rb") as f:
        f.seek(start)
        left = None if stop is None else stop - start
        while left is None or left > 0:
            raw = f.read(block if left is None else min(block, left))
            if not raw:
                break
            if left is not None:
                left -= len(raw)
            try:
                text = dec.decode(raw)
            except UnicodeDecodeError as e:
                raise _not_text(path, pos + e.start, f"invalid byte 0x{raw[e.start]:02x}") from None
            if "\x00" in text:
                raise _not_text(path, pos + len(text[:text.index("\x00")].encode("utf-8")), "a NUL byte")
            pos += len(raw)
            if text:
                yield text
        try:
            tail = dec.decode(b"", final=True)
        except UnicodeDecodeError:
            raise _not_text(path, pos, "a truncated character at the end") from None
        if tail:
            yield tail


def _char_boundary(path: Path, pos: int) -> int:
    """Move byte offset ``pos`` forward to the start of a UTF-8 character."""
    with open(path, "rb") as f:
        f.seek(pos)
        data = f.read(4)
    k = 0
    while k < len(data) and (data[k] & 0xC0) == 0x80:
        k += 1
    return pos + k


def text_file_documents(paths: list[Path], val_fraction: float) -> Iterator[Document]:
    """``text`` layout: each file is one document; its last ``val_fraction`` of bytes (cut at a character) is val."""
    for p in paths:
        size = p.stat().st_size
        cut = _char_boundary(p, int(size * (1 - val_fraction))) if val_fraction > 0 else size
        yield Document(iter_safe_pieces(_read_blocks(p, 0, cut)), "train")
        if cut < size:
            yield Document(iter_safe_pieces(_read_blocks(p, cut)), "val")


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _lines(f: io.TextIOBase, path: Path) -> Iterator[tuple[int, str]]:
    """Numbered lines of a text file; undecodable bytes are a :class:`SourceError` naming the file."""
    lineno = 0
    try:
        for lineno, line in enumerate(f, 1):
            yield lineno, line
    except UnicodeDecodeError as e:
        raise SourceError(f"{path}:{lineno + 1}: not UTF-8 text (invalid byte 0x{e.object[e.start]:02x}); "
                          f"pass text files only") from None


def _doc_text(obj: Any, field_name: str, where: str) -> str:
    if not isinstance(obj, dict) or field_name not in obj:
        keys = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise SourceError(f"{where}: no field {field_name!r} (found {keys}); choose the text field with --field")
    text = obj[field_name]
    if not isinstance(text, str):
        raise SourceError(f"{where}: field {field_name!r} is {type(text).__name__}, not text")
    return text


def local_file_documents(paths: list[Path], field_name: str = "text") -> Iterator[str]:
    """Documents from local files: JSON lines (``field_name``), parquet (column ``field_name``), or a whole text file."""
    for doc in local_documents(paths, field_name):
        yield "".join(doc.pieces)


def local_documents(paths: list[Path], field_name: str = "text") -> Iterator[Document]:
    """As :func:`local_file_documents`, with a text file streamed in pieces rather than read whole."""
    for p in paths:
        name = p.name.lower()
        if name.endswith(JSON_EXTENSIONS):
            with _open_text(p) as f:
                for lineno, line in _lines(f, p):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise SourceError(f"{p}:{lineno}: not valid JSON ({e.msg}); expected one object per line") from None
                    yield Document((_doc_text(obj, field_name, f"{p}:{lineno}"),))
        elif name.endswith(PARQUET_EXTENSIONS):
            try:
                import pyarrow.parquet as pq
            except ImportError:  # pragma: no cover - comes with datasets
                raise SourceError(f"{p}: reading parquet needs pyarrow (pip install 'gptlab[data]')") from None
            pf = pq.ParquetFile(p)
            if field_name not in pf.schema_arrow.names:
                raise SourceError(f"{p}: no column {field_name!r} (columns: {pf.schema_arrow.names}); use --field")
            for batch in pf.iter_batches(columns=[field_name], batch_size=1024):
                yield from (Document((t,)) for t in batch.column(0).to_pylist() if t is not None)
        else:
            yield Document(iter_safe_pieces(_read_blocks(p)))


# ----------------------------------------------------------------------------- downloads

def _http_get(url: str, timeout: float = 60.0) -> Iterator[bytes]:
    """Stream ``url``'s body in chunks (tests replace this to stay offline)."""
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - fixed https URLs from the registry
        while chunk := r.read(1 << 20):
            yield chunk


def fetch_url(url: str, dest: Path, sha256: str, *, what: str) -> Path:
    """Download ``url`` to ``dest`` (cached: reused when its SHA-256 matches), checking the SHA-256."""
    from gptlab.data.shards import file_sha256

    if dest.is_file() and file_sha256(dest) == sha256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    from gptlab import fsio

    tmp = fsio.temp_name(dest, "part")  # honours the umask (a shared cache stays readable), hashes as it writes
    try:
        with fsio.HashingWriter(tmp, display=dest) as f:
            for chunk in _http_get(url):
                f.write(chunk)
        if f.hexdigest() != sha256:
            raise SourceError(f"{what}: download from {url} has sha256 {f.hexdigest()}, expected {sha256}; "
                              f"try again, or pass a verified copy with --input PATH")
        os.replace(tmp, dest)
    except (SourceError, fsio.DiskError):
        Path(tmp).unlink(missing_ok=True)
        raise
    except Exception as e:
        Path(tmp).unlink(missing_ok=True)
        raise SourceError(f"{what}: could not download {url} ({type(e).__name__}: {e}); "
                          f"pass a local copy with --input PATH") from None
    return dest


def _check_hub_reachable() -> None:
    """Fail in milliseconds when the Hub's host does not resolve, instead of after the Hub client's
    ~25 s of retries (skipped behind a proxy, where DNS is the proxy's business)."""
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except socket.gaierror as e:
        raise ConnectionError(f"cannot resolve {host}: {e.strerror or e}") from None


def load_hf_dataset(path: str, name: str | None, split: str, streaming: bool = True) -> Iterable[dict[str, Any]]:
    """``datasets.load_dataset`` (imported lazily); tests replace this function to stay offline."""
    import importlib.util

    if importlib.util.find_spec("datasets") is None:
        raise ImportError("datasets")
    _check_hub_reachable()  # before the (slow) datasets import
    import datasets

    return datasets.load_dataset(path, name=name, split=split, streaming=streaming)


def _offline_message(info: DatasetInfo, reason: str) -> str:
    return (f"{info.name}: cannot download {info.download} ({reason}); pass local files instead with "
            f"--input PATH|DIR|GLOB (.parquet or .jsonl[.gz] with a 'text' field, or .txt files)")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def open_hub_split(info: DatasetInfo, split: str, local: str, offline: Callable[[str], str]
                   ) -> Iterable[dict[str, Any]]:
    """``info``'s Hub ``split``, streamed. Without the ``datasets`` package the error says to pass ``local``
    instead; a download failure is ``offline(reason)``, one line."""
    try:
        return load_hf_dataset(info.hf_path or "", info.hf_name, split, streaming=True)
    except ImportError:
        raise SourceError(f"{info.name}: downloading needs the 'datasets' package (pip install 'gptlab[data]'), "
                          f"or pass {local}") from None
    except Exception as e:
        raise SourceError(offline(_first_line(e))) from None


def hf_documents(info: DatasetInfo, split: str, field_name: str = "text") -> Iterator[str]:
    """Stream one split of a Hub corpus as document texts, wrapping network/offline failures in one line."""
    ds = open_hub_split(info, split, "local files with --input PATH|DIR|GLOB", lambda why: _offline_message(info, why))
    it = iter(ds)
    n = 0
    while True:
        try:
            row = next(it)
        except StopIteration:
            return
        except Exception as e:
            raise SourceError(_offline_message(info, f"failed after {n} documents: {_first_line(e)}")) from None
        n += 1
        yield _doc_text(row, field_name, f"{info.hf_path} row {n}")


# ----------------------------------------------------------------------------- the one entry point

def _limit(it: Iterable[Any], max_docs: int | None) -> Iterator[Any]:
    return iter(it) if max_docs is None else itertools.islice(it, max_docs)


def shakespeare_text(info: DatasetInfo, input: str | os.PathLike | None) -> tuple[str, dict[str, Any]]:
    """The whole Tiny Shakespeare text: ``--input`` file(s), else the SHA-256-checked download (cached)."""
    if input is not None:
        paths = expand_input(input)
        text = "".join("".join(_read_blocks(p)) for p in paths)
        import hashlib

        sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
        return text, {"input": [str(p) for p in paths], "sha256": sha, "is_official_file": sha == info.sha256}
    dest = data_home() / "downloads" / (info.filename or f"{info.name}.txt")
    fetch_url(info.url or "", dest, info.sha256 or "", what=info.name)
    return dest.read_text(encoding="utf-8"), {"url": info.url, "sha256": info.sha256, "cache": str(dest)}


def open_source(info: DatasetInfo, *, input: str | os.PathLike | None = None, field_name: str = "text",
                val_fraction: float | None = None, max_docs: int | None = None,
                ) -> tuple[Callable[[], Iterator[Document]], dict[str, Any]]:
    """``(make_documents, source_info)``: a function returning a fresh document stream, and provenance.

    A function rather than an iterator because a char vocabulary needs a first pass over the corpus.
    Documents whose ``split`` is None are assigned by ``prepare`` with the dataset's ``val_rule``.
    """
    frac = info.val_fraction if val_fraction is None else val_fraction
    if info.local_only and input is None:
        raise SourceError(f"{info.name}: needs local files: pass --input PATH|DIR|GLOB")
    if info.layout == "text" and info.val_rule == "chars" and info.url:  # Tiny Shakespeare
        text, src = shakespeare_text(info, input)
        n = len(text)
        cut = int(n * (1 - (frac or 0.0)))  # nanoGPT: data[:int(n*0.9)] / data[int(n*0.9):]

        def make() -> Iterator[Document]:
            yield Document(iter_text_pieces(text[:cut]), "train")
            if cut < n:
                yield Document(iter_text_pieces(text[cut:]), "val")

        return make, {**src, "characters": n}
    if input is not None:
        paths = expand_input(input)
        src = {"input": [str(p) for p in paths]}
        if info.name == "text":
            return (lambda: _limit(text_file_documents(paths, frac or 0.0), max_docs)), src
        return (lambda: _limit(local_documents(paths, field_name), max_docs)), src
    if info.name == "pydocs":
        from pydoc_data.topics import topics

        keys = sorted(topics)
        src = {"module": "pydoc_data.topics", "topics": len(keys)}
        return (lambda: (Document((topics[k],)) for k in _limit(keys, max_docs))), src
    if info.hf_path:
        src = {"hf_path": info.hf_path, "hf_name": info.hf_name, "hf_split": info.hf_split}

        def make_hf() -> Iterator[Document]:
            if info.val_rule == "hf_split" and info.hf_val_split and val_fraction is None:
                for t in _limit(hf_documents(info, info.hf_val_split, field_name), max_docs):
                    yield Document((t,), "val")
                for t in _limit(hf_documents(info, info.hf_split, field_name), max_docs):
                    yield Document((t,), "train")
            else:
                for t in _limit(hf_documents(info, info.hf_split, field_name), max_docs):
                    yield Document((t,))

        return make_hf, src
    raise SourceError(f"{info.name}: no source configured")  # pragma: no cover


def open_chat_source(info: DatasetInfo, *, input: str | os.PathLike | None = None, max_docs: int | None = None,
                     ) -> tuple[Callable[[], Iterator[tuple[list[dict[str, str]], str, str | None]]], dict[str, Any]]:
    """``(make, source_info)`` for a chat dataset: ``make()`` yields ``(messages, where, split or None)``.

    ``where`` names the record for error messages (``FILE:LINE`` or ``hub-path split row N``); every
    conversation is validated (:func:`gptlab.chat.validate_messages`). Local input: JSON lines
    (``.jsonl[.gz]``) or parquet with a ``messages`` column (a Hub download kept on disk).
    """
    from gptlab.chat import conversation_from_json, read_conversations

    if input is None and info.local_only:
        raise SourceError(f"{info.name}: needs a local file of conversations: pass --input FILE.jsonl")
    if input is not None:
        paths = expand_input(input)

        def make_local() -> Iterator[tuple[list[dict[str, str]], str, str | None]]:
            for p in paths:
                if p.name.lower().endswith(PARQUET_EXTENSIONS):
                    import pyarrow.parquet as pq

                    pf = pq.ParquetFile(p)
                    if "messages" not in pf.schema_arrow.names:
                        raise SourceError(f"{p}: no column 'messages' (columns: {pf.schema_arrow.names})")
                    n = 0
                    for batch in pf.iter_batches(columns=["messages"], batch_size=1024):
                        for msgs in batch.column(0).to_pylist():
                            n += 1
                            yield conversation_from_json({"messages": msgs}, f"{p} row {n}"), f"{p} row {n}", None
                else:
                    for msgs, where in read_conversations(p):
                        yield msgs, where, None

        return (lambda: _limit(make_local(), max_docs)), {"input": [str(p) for p in paths]}

    def rows(split: str) -> Iterator[tuple[list[dict[str, str]], str]]:
        ds = open_hub_split(info, split, "a local copy with --input FILE.jsonl|DIR",
                            lambda why: f"{info.name}: cannot download {info.download} ({why}); pass a local copy "
                                        f"with --input FILE.jsonl|DIR (one {{\"messages\": [...]}} per line, or the "
                                        f"Hub's parquet files)")
        for n, row in enumerate(ds, 1):
            where = f"{info.hf_path} {split} row {n}"
            yield conversation_from_json(row, where), where

    def make_hf() -> Iterator[tuple[list[dict[str, str]], str, str | None]]:
        if info.hf_val_split:
            for msgs, where in _limit(rows(info.hf_val_split), max_docs):
                yield msgs, where, "val"
        for msgs, where in _limit(rows(info.hf_split), max_docs):
            yield msgs, where, "train"

    return make_hf, {"hf_path": info.hf_path, "hf_name": info.hf_name, "hf_split": info.hf_split}
