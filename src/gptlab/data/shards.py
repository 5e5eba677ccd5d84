"""Token shard files and the dataset manifest.

A shard is the llm.c / modded-nanogpt ``.bin`` layout, so their shards load here and ours there:
a header of 256 little-endian int32 (``[0]`` magic, ``[1]`` version, ``[2]`` token count, the rest 0),
then the tokens. GPT-2-sized vocabularies use uint16 tokens (magic 20240520, version 1); larger ones
use uint32 under llm.c's own LLaMA-3 magic/version (20240801, 7), so a reader can never mistake one
for the other. See https://github.com/karpathy/llm.c/blob/master/dev/data/data_common.py.

Shards from elsewhere need no manifest: a directory or glob of llm.c / modded-nanogpt ``.bin`` files,
or of build-nanogpt's ``.npy`` files (``np.save`` of a uint16 array), is read through
:func:`foreign_manifest`, which checks every header and takes the split from the file names
(``..._val_...``) or from a validation glob.

A chat dataset (``gptlab prepare chat``) also has a *loss-mask* file beside each token shard,
``NAME_SPLIT_NNNNNN.mask``: the same 256-int32 header with magic 20261202, version 1 and the token
count, then one uint8 per token, 1 where that token is a training target (assistant text) and 0
elsewhere. The shard's manifest entry names it (``"mask"``, ``"mask_sha256"``), and the manifest's
``"chat"`` object gives the row length: every ``seq_len`` tokens a new packed row starts.

``manifest.json`` beside the shards names the tokenizer, vocabulary size, EOT id and, per shard, its
split, token count and SHA-256. It is written last and atomically: a directory without a manifest is
not a dataset. It also carries the tokenizer's fingerprint, a fingerprint of the shard list (files,
splits, counts, hashes) and a ``checksum`` of everything else in it, so an edited manifest is refused.
:func:`verify_cached` checks the shards' hashes once per dataset (remembered by size and mtime).
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from gptlab.errors import GptlabError
from gptlab import fsio

HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MAGIC_U16, VERSION_U16 = 20240520, 1
MAGIC_U32, VERSION_U32 = 20240801, 7
MAGIC_MASK, VERSION_MASK = 20261202, 1
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "gptlab-token-shards"
MANIFEST_VERSION = 1
# The count lives in an int32 header slot.
MAX_SHARD_TOKENS = 2**31 - 1


class ShardError(GptlabError, ValueError):
    """A shard or manifest is missing, corrupt or inconsistent; the message names the file."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (GPT-2's 50,257 does), else uint32."""
    if vocab_size <= 0 or vocab_size > 2**32:
        raise ShardError(f"vocab_size {vocab_size} is out of range (1..2**32)")
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def _header_for(dtype: np.dtype, count: int) -> np.ndarray:
    header = np.zeros(HEADER_INTS, dtype="<i4")
    u16 = dtype == np.uint16
    header[0] = MAGIC_U16 if u16 else MAGIC_U32
    header[1] = VERSION_U16 if u16 else VERSION_U32
    header[2] = count
    return header


def write_shard(path: str | os.PathLike, tokens: Any, vocab_size: int) -> str:
    """Write ``tokens`` (any int array-like) as one shard, atomically; return its SHA-256 hex digest.

    Every id must be in ``[0, vocab_size)``: a bad id is an error here rather than a silent
    wrap-around to a wrong token when it is narrowed to uint16.
    """
    path = Path(path)
    dtype = token_dtype(vocab_size)
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    if arr.size > MAX_SHARD_TOKENS:
        raise ShardError(f"{path}: {arr.size} tokens exceed the format's {MAX_SHARD_TOKENS} per shard")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ShardError(f"{path}: tokens must be integers, got {arr.dtype}")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= vocab_size):
        bad = arr[(arr < 0) | (arr >= vocab_size)]
        raise ShardError(f"{path}: token id {bad[0].item()!r} is outside the vocabulary [0, {vocab_size})")
    data = np.ascontiguousarray(arr.astype(dtype.newbyteorder("<"), copy=False))
    header = _header_for(dtype, int(data.size))
    path.parent.mkdir(parents=True, exist_ok=True)
    # No copy of a 100M-token buffer: the header and a byte view of the tokens are written as they are.
    return fsio.write_atomic(path, [header.tobytes(), memoryview(data).cast("B")])


def write_mask(path: str | os.PathLike, mask: Any) -> str:
    """Write a loss mask (0/1 per token) as a mask file, atomically; return its SHA-256 hex digest."""
    path = Path(path)
    arr = np.asarray(mask).reshape(-1)
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 1):
        raise ShardError(f"{path}: a loss mask holds only 0 and 1")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (MAGIC_MASK, VERSION_MASK, arr.size)
    path.parent.mkdir(parents=True, exist_ok=True)
    return fsio.write_atomic(path, [header.tobytes(), np.ascontiguousarray(arr.astype(np.uint8)).tobytes()])


def read_mask(path: str | os.PathLike, count: int | None = None) -> np.ndarray:
    """Memory-map a mask file (uint8) after checking its magic, version, size and (if given) count."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            header = np.frombuffer(f.read(HEADER_BYTES), dtype="<i4")
    except FileNotFoundError:
        raise ShardError(f"{path}: loss-mask file not found (re-run gptlab prepare chat)") from None
    if header.size < HEADER_INTS or (int(header[0]), int(header[1])) != (MAGIC_MASK, VERSION_MASK):
        raise ShardError(f"{path}: not a loss-mask file (expected magic {MAGIC_MASK} version {VERSION_MASK})")
    n = int(header[2])
    if n < 0 or size != HEADER_BYTES + n:
        raise ShardError(f"{path}: mask file size {size} does not match its header's {n} entries (re-run gptlab prepare)")
    if count is not None and n != count:
        raise ShardError(f"{path}: mask has {n} entries but its token shard has {count} tokens")
    if n == 0:
        return np.zeros(0, dtype=np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r", offset=HEADER_BYTES, shape=(n,))


def _verify_mask(d: Path, entry: dict[str, Any], count: int, chat_row: int, check_hash: bool) -> None:
    """A chat shard's loss mask: plain file name, header, count equal to the shard's, whole rows, sha256, 0/1."""
    path = d / entry["file"]
    name = entry.get("mask")
    if name is None:
        raise ShardError(f"{path}: a chat dataset's shard has no loss mask in manifest.json; re-run gptlab prepare chat")
    if chat_row and (count < 1 or (count - 1) % chat_row):
        raise ShardError(f"{path}: {count} tokens is not whole rows of {chat_row} plus one; re-run gptlab prepare chat")
    if not isinstance(name, str) or Path(name).name != name:
        raise ShardError(f"{d / MANIFEST}: mask file {name!r} must be a plain file name inside the dataset directory")
    mpath = d / name
    mask = read_mask(mpath, count)
    if check_hash and file_sha256(mpath) != entry.get("mask_sha256"):
        raise ShardError(f"{mpath}: sha256 does not match manifest.json: the mask changed or is corrupt; "
                         f"re-run gptlab prepare chat")
    top = int(np.asarray(mask).max()) if mask.size else 0
    if top > 1:
        raise ShardError(f"{mpath}: a loss mask holds only 0 and 1, found {top}")


def _npy_header(path: Path) -> tuple[int, np.dtype]:
    """(count, dtype) of a build-nanogpt ``.npy`` shard: a 1-D uint16/uint32 array, no pickled objects."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise ShardError(f"{path}: shard file not found") from None
    except (ValueError, OSError) as e:
        raise ShardError(f"{path}: not a readable .npy token shard ({e})") from None
    if arr.ndim != 1 or arr.dtype.kind != "u" or arr.dtype.itemsize not in (2, 4):
        raise ShardError(f"{path}: a .npy shard must be a 1-D uint16 or uint32 array of token ids, "
                         f"got {arr.dtype} with shape {arr.shape}")
    return int(arr.shape[0]), arr.dtype


def read_header(path: str | os.PathLike) -> tuple[int, np.dtype]:
    """Check a shard's magic, version and file size; return ``(token_count, dtype)``.

    A ``.npy`` file (build-nanogpt's shards) is checked as a 1-D unsigned array instead."""
    path = Path(path)
    if path.suffix == ".npy":
        return _npy_header(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except FileNotFoundError:
        raise ShardError(f"{path}: shard file not found (re-run gptlab prepare)") from None
    if len(raw) < HEADER_BYTES:
        raise ShardError(f"{path}: truncated shard: {len(raw)} bytes, smaller than the {HEADER_BYTES}-byte header")
    header = np.frombuffer(raw, dtype="<i4")
    magic, version, count = int(header[0]), int(header[1]), int(header[2])
    if (magic, version) == (MAGIC_U16, VERSION_U16):
        dtype = np.dtype("<u2")
    elif (magic, version) == (MAGIC_U32, VERSION_U32):
        dtype = np.dtype("<u4")
    elif magic in (MAGIC_U16, MAGIC_U32):
        raise ShardError(f"{path}: unsupported shard version {version} for magic {magic} "
                         f"(expected {VERSION_U16} for uint16 or {VERSION_U32} for uint32 shards)")
    else:
        raise ShardError(f"{path}: bad magic number {magic}: not a token shard "
                         f"(expected {MAGIC_U16} or {MAGIC_U32})")
    if count < 0:
        raise ShardError(f"{path}: negative token count {count} in the header")
    want = HEADER_BYTES + count * dtype.itemsize
    if size != want:
        what = "truncated" if size < want else "has trailing bytes"
        raise ShardError(f"{path}: shard {what}: header says {count} tokens ({want} bytes) but the file has "
                         f"{size} bytes (re-run gptlab prepare)")
    return count, dtype


def read_shard(path: str | os.PathLike) -> np.memmap:
    """Memory-map a shard's tokens (read-only, uint16 or uint32) after checking its header and size."""
    count, dtype = read_header(path)
    if count == 0:
        return np.zeros(0, dtype=dtype)  # type: ignore[return-value]  # mmap cannot map 0 bytes
    if Path(path).suffix == ".npy":
        return np.load(path, mmap_mode="r", allow_pickle=False)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(count,))


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """SHA-256 of a whole file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_token_range(path: str | os.PathLike, vocab_size: int, chunk: int = 1 << 24) -> None:
    """Raise :class:`ShardError` if any token in the shard is ``>= vocab_size``."""
    tokens = read_shard(path)
    for start in range(0, tokens.size, chunk):
        block = np.asarray(tokens[start:start + chunk])
        top = int(block.max()) if block.size else -1
        if top >= vocab_size:
            where = start + int(np.argmax(block >= vocab_size))
            raise ShardError(f"{path}: token {int(tokens[where])} at token offset {where} is >= the vocabulary "
                             f"size {vocab_size} in manifest.json (wrong tokenizer or corrupt shard)")


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON to a temporary file in the same directory, fsync, then rename over ``path``."""
    fsio.write_json_atomic(path, obj)


def _canonical_sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
                          .encode("utf-8")).hexdigest()


def manifest_checksum(manifest: dict[str, Any]) -> str:
    """SHA-256 of the manifest's canonical JSON without its own ``checksum`` key."""
    return _canonical_sha({k: v for k, v in manifest.items() if k != "checksum"})


def data_fingerprint(shards: Iterable[dict[str, Any]]) -> str:
    """Identity of a dataset's content: its shard files, their splits, counts and hashes, in order."""
    return _canonical_sha([[s["file"], s["split"], int(s["tokens"]), s["sha256"]] for s in shards])


def build_manifest(*, dataset: str, tokenizer_spec: dict[str, Any], vocab_size: int, eot_id: int | None,
                   shards: Iterable[dict[str, Any]], source: dict[str, Any] | None = None,
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest dict (see module docstring); ``shards`` are ``{"file","split","tokens","sha256"}``."""
    from gptlab import __version__
    from gptlab.tokenizer import fingerprint

    shards = [dict(s) for s in shards]
    splits: dict[str, dict[str, int]] = {}
    for s in shards:
        sp = splits.setdefault(s["split"], {"tokens": 0, "shards": 0})
        sp["tokens"] += int(s["tokens"])
        sp["shards"] += 1
    dtype = token_dtype(vocab_size)
    manifest = {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "dataset": dataset,
        "tokenizer": tokenizer_spec,
        "tokenizer_fingerprint": fingerprint(tokenizer_spec),
        "data_fingerprint": data_fingerprint(shards),
        "vocab_size": int(vocab_size),
        "eot_id": eot_id,
        "dtype": dtype.name,
        "shard_header": {"ints": HEADER_INTS, "magic": int(_header_for(dtype, 0)[0]),
                         "version": int(_header_for(dtype, 0)[1])},
        "splits": splits,
        "shards": shards,
        "source": source or {},
        "gptlab_version": __version__,
    }
    if extra:
        manifest.update(extra)
    return manifest


def write_manifest(data_dir: str | os.PathLike, manifest: dict[str, Any]) -> Path:
    """Atomically write ``manifest.json`` into ``data_dir`` (do this after every shard is complete)."""
    path = Path(data_dir) / MANIFEST
    from gptlab.tokenizer import fingerprint

    manifest = {k: v for k, v in manifest.items() if k != "checksum"}
    manifest.update(tokenizer_fingerprint=fingerprint(manifest["tokenizer"]),
                    data_fingerprint=data_fingerprint(manifest["shards"]))
    write_json_atomic(path, {**manifest, "checksum": manifest_checksum(manifest)})
    return path


def read_manifest(data_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and sanity-check ``DIR/manifest.json``; raise :class:`ShardError` naming the problem."""
    d = Path(data_dir)
    path = d / MANIFEST if d.is_dir() or not d.name.endswith(".json") else d
    if not path.is_file():
        if not Path(data_dir).exists():
            raise ShardError(f"{data_dir}: dataset directory not found (create it with: gptlab prepare NAME --out {data_dir})")
        raise ShardError(f"{path}: no manifest.json, so this is not a prepared dataset (an interrupted "
                         f"gptlab prepare leaves none; run it again)")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ShardError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); re-run gptlab prepare") from None
    if not isinstance(m, dict):
        raise ShardError(f"{path}: expected a JSON object")
    if m.get("format") != MANIFEST_FORMAT or m.get("format_version") != MANIFEST_VERSION:
        raise ShardError(f"{path}: unknown manifest format {m.get('format')!r} version {m.get('format_version')!r} "
                         f"(expected {MANIFEST_FORMAT!r} version {MANIFEST_VERSION})")
    for key in ("tokenizer", "vocab_size", "eot_id", "shards"):
        if key not in m:
            raise ShardError(f"{path}: missing key {key!r}; re-run gptlab prepare")
    if not isinstance(m["shards"], list) or not all(
            isinstance(s, dict) and {"file", "split", "tokens", "sha256"} <= set(s) for s in m["shards"]):
        raise ShardError(f"{path}: 'shards' must be a list of {{file, split, tokens, sha256}} objects")
    for s in m["shards"]:
        if Path(s["file"]).name != s["file"]:
            raise ShardError(f"{path}: shard file {s['file']!r} must be a plain file name inside the dataset directory")
    if "checksum" in m and m["checksum"] != manifest_checksum(m):
        raise ShardError(f"{path}: its checksum does not match its content: the manifest was edited or is "
                         f"corrupt; re-run gptlab prepare")
    from gptlab.tokenizer import fingerprint

    for key, want in (("tokenizer_fingerprint", lambda: fingerprint(m["tokenizer"])),
                      ("data_fingerprint", lambda: data_fingerprint(m["shards"]))):
        if key in m and m[key] != want():
            raise ShardError(f"{path}: {key} does not match the manifest's {key.split('_')[0]} entries "
                             f"(edited by hand?); re-run gptlab prepare")
    return m


def shard_paths(data_dir: str | os.PathLike, split: str, manifest: dict[str, Any] | None = None) -> list[Path]:
    """Paths of ``split``'s shards in manifest order (a manifest-less set's entries carry their own path)."""
    m = manifest if manifest is not None else open_manifest(data_dir)
    return [Path(s["path"]) if s.get("path") else Path(data_dir) / s["file"] for s in m["shards"]
            if s["split"] == split]


# --------------------------------------------------------------------------- shards without a manifest

SHARD_SUFFIXES = (".bin", ".npy")
_VAL_NAME = re.compile(r"(^|[_.-])val([_.-]|$)")
_GLOB_CHARS = re.compile(r"[*?\[]")
# Token width -> (tokenizer spec, vocabulary, EOT id) for shards that do not say: llm.c writes uint16
# only for GPT-2 (magic 20240520) and uint32 for LLaMA-3 (20240801), which gptlab has no tokenizer for.
_GPT2 = ({"type": "gpt2"}, 50257, 50256)


def is_glob(spec: str | os.PathLike) -> bool:
    return bool(_GLOB_CHARS.search(str(spec)))


def is_val_name(path: str | os.PathLike) -> bool:
    """llm.c / modded-nanogpt / build-nanogpt name their validation shards ``*_val_*`` (``tiny_shakespeare_val.bin``)."""
    return bool(_VAL_NAME.search(Path(path).stem))


def foreign_shard_files(d: str | os.PathLike) -> list[Path]:
    """Token shard files in ``d`` (``*.bin``, ``*.npy``; hidden files skipped) that a manifest there does not list."""
    d = Path(d)
    if not d.is_dir():
        return []
    listed: set[str] = set()
    if (d / MANIFEST).is_file():
        try:
            listed = {s.get("file") for s in json.loads((d / MANIFEST).read_text(encoding="utf-8"))["shards"]}
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, OSError):
            listed = set()
    return sorted(p for p in d.iterdir() if p.suffix in SHARD_SUFFIXES and p.is_file()
                  and not p.name.startswith(".") and p.name not in listed)


def _expand(spec: str) -> list[Path]:
    p = Path(spec).expanduser()
    if p.is_dir():
        return foreign_shard_files(p)
    return sorted(Path(x) for x in globlib.glob(str(p)) if Path(x).suffix in SHARD_SUFFIXES and Path(x).is_file())


def foreign_manifest(spec: str | os.PathLike, val: str | os.PathLike | None = None) -> dict[str, Any]:
    """A manifest-shaped dict for llm.c / modded-nanogpt ``.bin`` or build-nanogpt ``.npy`` shards without
    ``manifest.json``: ``spec`` is their directory or a glob; the val split is ``val`` (a glob) when given,
    else the files named ``*_val_*`` (with a glob naming ``train``, its ``val`` twin too). Every header
    is checked; entries carry absolute paths and no SHA-256 (nothing recorded one)."""
    spec = str(spec)
    files = _expand(spec)
    if not files:
        raise ShardError(f"{spec}: no .bin or .npy token shards found (and no manifest.json): pass a prepared "
                         f"dataset directory, a directory of llm.c / build-nanogpt shards, or a glob of them")
    if val:
        val_files = _expand(str(val))
        if not val_files:
            raise ShardError(f"--data.val {val}: matches no .bin or .npy shard")
    else:
        val_files = [f for f in files if is_val_name(f)]
        if not val_files and is_glob(spec) and "train" in Path(spec).name:
            val_files = [f for f in _expand(str(Path(spec).parent / Path(spec).name.replace("train", "val")))
                         if is_val_name(f)]
    val_set = {f.resolve() for f in val_files}
    train_files = [f for f in files if f.resolve() not in val_set]
    entries, dtypes = [], {}
    for split, group in (("train", train_files), ("val", val_files)):
        for f in group:
            count, dtype = read_header(f)
            dtypes.setdefault(dtype.itemsize, f)
            entries.append({"file": f.name, "path": str(f.resolve()), "split": split, "tokens": count,
                            "sha256": None})
    if len(dtypes) > 1:
        raise ShardError(f"{spec}: mixes uint16 shards ({dtypes[2]}) and uint32 shards ({dtypes[4]}); "
                         f"they come from different tokenizers")
    if 4 in dtypes:
        raise ShardError(f"{dtypes[4]}: uint32 (LLaMA-3) shards: gptlab has no tokenizer for them; use GPT-2 "
                         f"(uint16) shards or prepare the text with gptlab prepare")
    spec_tok, vocab, eot = _GPT2
    return build_manifest(dataset=f"shards:{spec}", tokenizer_spec=spec_tok, vocab_size=vocab, eot_id=eot,
                          shards=entries, source={"shards": spec, "val": str(val) if val else None,
                                                  "manifest": False})


def split_source(data: str | os.PathLike, split: str, val: str | os.PathLike | None = None) -> Path | list[Path]:
    """What a :class:`gptlab.data.loader.TokenLoader` reads for ``split``: a prepared dataset dir as it is,
    or the files of ``split`` of a manifest-less shard set (:func:`foreign_manifest`)."""
    p = Path(data).expanduser()
    if p.is_dir() and (p / MANIFEST).is_file():
        return p
    return shard_paths(data, split, foreign_manifest(data, val))


def open_manifest(data: str | os.PathLike, val: str | os.PathLike | None = None) -> dict[str, Any]:
    """The manifest of a prepared dataset dir, or :func:`foreign_manifest` for a glob or a directory of
    shards that has none. ``val`` (a glob) applies to the latter only."""
    p = Path(data).expanduser()
    if p.is_dir() and (p / MANIFEST).is_file():
        if val:
            raise ShardError(f"--data.val {val}: {p} is a prepared dataset with its own val split; drop --data.val")
        return read_manifest(p)
    if is_glob(data) or (p.is_dir() and foreign_shard_files(p)):
        return foreign_manifest(data, val)
    return read_manifest(p)  # its error says what is missing


def verify_dataset(data_dir: str | os.PathLike, *, check_hash: bool = True, check_tokens: bool = True) -> dict[str, Any]:
    """Re-check a prepared dataset: every shard's header, size, count vs manifest, SHA-256 and token range.

    Returns a summary ``{"dir", "ok", "dataset", "vocab_size", "splits": {split: {"tokens", "shards"}},
    "shards_checked", "checked": [...]}``; the first problem raises :class:`ShardError` naming the file.
    """
    d = Path(data_dir)
    m = open_manifest(data_dir)
    vocab = int(m["vocab_size"])
    chat_row = int((m.get("chat") or {}).get("seq_len") or 0)
    splits: dict[str, dict[str, int]] = {}
    for s in m["shards"]:
        path = Path(s["path"]) if s.get("path") else d / s["file"]
        count, dtype = read_header(path)
        if count != int(s["tokens"]):
            raise ShardError(f"{path}: header has {count} tokens but manifest.json says {s['tokens']}")
        if dtype != token_dtype(vocab):
            raise ShardError(f"{path}: {dtype.name} tokens but the vocabulary size {vocab} needs {token_dtype(vocab).name}")
        if check_hash and s["sha256"] is not None:  # manifest-less shards have none to compare
            got = file_sha256(path)
            if got != s["sha256"]:
                raise ShardError(f"{path}: sha256 {got} does not match manifest.json ({s['sha256']}): the file "
                                 f"changed or is corrupt; re-run gptlab prepare")
        if check_tokens:
            check_token_range(path, vocab)
        if "mask" in s or chat_row:
            _verify_mask(d, s, count, chat_row, check_hash)
        sp = splits.setdefault(s["split"], {"tokens": 0, "shards": 0})
        sp["tokens"] += count
        sp["shards"] += 1
    hashed = check_hash and all(s["sha256"] is not None for s in m["shards"])
    checked = [c for c, on in (("header", True), ("sha256", hashed), ("token_range", check_tokens),
                               ("loss_mask", any("mask" in s for s in m["shards"]))) if on]
    return {"dir": str(d), "ok": True, "dataset": m.get("dataset"), "vocab_size": vocab, "splits": splits,
            "shards_checked": len(m["shards"]), "checked": checked}


def _verified_cache_path(data_dir: Path) -> Path:
    from gptlab.data.sources import data_home

    key = hashlib.sha256(str(data_dir.resolve()).encode("utf-8")).hexdigest()[:24]
    return data_home() / ".verified" / f"{key}.json"


def verify_cached(data_dir: str | os.PathLike, manifest: dict[str, Any] | None = None) -> int:
    """:func:`verify_dataset` (hashes and token range) of every shard not verified before in its current
    form (same size, mtime and inode); remembered under ``$GPTLAB_DATA_HOME/.verified``. Returns the number
    of shards hashed now (0 when all were verified before)."""
    d = Path(data_dir)
    m = manifest if manifest is not None else read_manifest(d)
    if not any(s.get("sha256") for s in m["shards"]):
        return 0  # llm.c / build-nanogpt shards without a manifest: no hash was ever recorded to check
    vocab = int(m["vocab_size"])
    chat_row = int((m.get("chat") or {}).get("seq_len") or 0)
    cache_path = _verified_cache_path(d)
    try:
        cache = json.loads(cache_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cache = {}
    fresh: dict[str, Any] = {}
    hashed = 0
    for s in m["shards"]:
        path = d / s["file"]
        try:
            st = path.stat()
        except FileNotFoundError:
            raise ShardError(f"{path}: shard file not found (re-run gptlab prepare)") from None
        key = [st.st_size, st.st_mtime_ns, st.st_ino, s["sha256"], vocab]
        if "mask" in s:
            try:
                mst = (d / s["mask"]).stat()
            except (FileNotFoundError, TypeError):
                raise ShardError(f"{d / str(s['mask'])}: loss-mask file not found (re-run gptlab prepare chat)") from None
            key += [mst.st_size, mst.st_mtime_ns, mst.st_ino, s.get("mask_sha256")]
        if cache.get(s["file"]) != key:
            count, dtype = read_header(path)
            if count != int(s["tokens"]):
                raise ShardError(f"{path}: header has {count} tokens but manifest.json says {s['tokens']}")
            got = file_sha256(path)
            if got != s["sha256"]:
                raise ShardError(f"{path}: sha256 {got} does not match manifest.json ({s['sha256']}): the file "
                                 f"changed or is corrupt; re-run gptlab prepare")
            check_token_range(path, vocab)
            if "mask" in s or chat_row:
                _verify_mask(d, s, count, chat_row, True)
            hashed += 1
        fresh[s["file"]] = key
    if hashed or fresh != cache:
        try:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            fsio.write_json_atomic(cache_path, fresh)
        except OSError:
            pass  # a read-only cache only costs a re-check next time
    return hashed


def write_synthetic_dataset(data_dir: str | os.PathLike, *, train_tokens: int, val_tokens: int = 0,
                            vocab_size: int = 50257, shard_tokens: int = 100_000_000, seed: int = 0,
                            tokenizer_spec: dict[str, Any] | None = None) -> dict[str, Any]:
    """A dataset of uniformly random tokens (for benchmarks and tests); returns its manifest.

    The tokenizer spec defaults to GPT-2's, so ``vocab_size`` should stay 50257 unless one is given.
    """
    d = Path(data_dir)
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    dtype = token_dtype(vocab_size)
    entries = []
    for split, total in (("train", train_tokens), ("val", val_tokens)):
        for i, start in enumerate(range(0, total, shard_tokens)):
            n = min(shard_tokens, total - start)
            name = f"synthetic_{split}_{i:06d}.bin"
            sha = write_shard(d / name, rng.integers(0, vocab_size, n, dtype=dtype), vocab_size)
            entries.append({"file": name, "split": split, "tokens": n, "sha256": sha})
    manifest = build_manifest(dataset="synthetic", tokenizer_spec=tokenizer_spec or {"type": "gpt2"},
                              vocab_size=vocab_size, eot_id=50256 if tokenizer_spec is None else None,
                              shards=entries, source={"synthetic": True, "seed": seed})
    write_manifest(d, manifest)
    return manifest
