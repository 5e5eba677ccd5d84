"""Typed configuration: dataclasses, presets, TOML files and ``--section.key=value`` overrides.

Precedence (lowest first): dataclass defaults < preset / TOML file < command-line overrides.
Unknown keys are errors that name the closest valid key; values are validated in ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import sys
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


from gptlab.errors import GptlabError


class ConfigError(GptlabError, ValueError):
    """A configuration value or key is wrong; the message names it and says how to fix it."""


T = TypeVar("T")


def closest(name: str, options: typing.Iterable[str]) -> str:
    """A ``did you mean`` hint for ``name`` among ``options`` (empty string when nothing is close)."""
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert ``value`` (from TOML, JSON or a command-line string) to the annotated type ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: cannot be {value!r}")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()] if value.strip() else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        out = [coerce(v, inner, where) for v in value]
        return tuple(out) if origin is tuple else out
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value.replace("_", ""))
            except ValueError:
                raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
            if f.is_integer():
                return int(f)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table of keys, got {value!r}")
        return from_dict(tp, value, where)
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build dataclass ``cls`` from a (possibly nested) dict; unknown keys are errors."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls) if f.init]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"{where}: unknown key {key!r}{closest(key, names)}")
        kwargs[key] = coerce(value, hints[key], f"{where}.{key}" if where else key)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}" if where and not str(e).startswith(where) else str(e)) from None


def to_dict(obj: Any) -> dict[str, Any]:
    """A JSON-ready dict of a (nested) config dataclass."""
    return dataclasses.asdict(obj)


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge, ``update`` winning."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def load_toml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a TOML file, with errors that name the file."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: invalid TOML: {e}") from None


def parse_overrides(items: typing.Iterable[str]) -> dict[str, Any]:
    """Turn ``["model.n_layer=4", "lr=1e-3"]`` into a nested dict of strings."""
    out: dict[str, Any] = {}
    for item in items:
        s = item[2:] if item.startswith("--") else item
        if "=" not in s:
            raise ConfigError(f"override {item!r}: expected --section.key=value")
        key, value = s.split("=", 1)
        key = key.strip().replace("-", "_")
        if not key:
            raise ConfigError(f"override {item!r}: empty key")
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p!r} is both a value and a section")
        node[parts[-1]] = value
    return out


# --------------------------------------------------------------------------- model


def round_up(x: int, multiple: int) -> int:
    return ((x + multiple - 1) // multiple) * multiple


@dataclass
class ModelConfig:
    """The network's shape and architecture switches. Defaults are GPT-2 124M."""

    block_size: int = 1024  # context length
    vocab_size: int = 50257  # real vocabulary; ids >= vocab_size never occur
    pad_vocab_multiple: int = 1  # pad the embedding/head rows to a multiple (128 -> 50304) for speed
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear layers and LayerNorms
    # --- architecture switches (GPT-2 values by default) ---
    pos_emb: str = "learned"  # "learned" (GPT-2) | "rope"
    rope_base: float = 10000.0
    norm: str = "layernorm"  # "layernorm" | "rmsnorm"
    norm_eps: float = 1e-5
    mlp: str = "gelu"  # "gelu" (tanh approximation) | "swiglu" | "relu2"
    mlp_hidden: int = 0  # 0: 4*n_embd for gelu/relu2, 8/3*n_embd rounded up to 64 for swiglu
    qk_norm: bool = False  # RMSNorm of queries and keys per head (as Qwen3)
    n_kv_head: int = 0  # 0: same as n_head; fewer = grouped-query attention
    tie_embeddings: bool = True  # lm_head shares wte's weight
    zero_init_proj: bool = False  # zero-init residual output projections (modded-nanogpt)
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "pad_vocab_multiple"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"model.n_embd={self.n_embd} must be divisible by model.n_head={self.n_head}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
        choices = {"pos_emb": ("learned", "rope"), "norm": ("layernorm", "rmsnorm"), "mlp": ("gelu", "swiglu", "relu2")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"model.{name}={getattr(self, name)!r}: expected one of {', '.join(allowed)}")
        if self.n_kv_head < 0 or (self.n_kv_head and self.n_head % self.n_kv_head):
            raise ConfigError(
                f"model.n_kv_head={self.n_kv_head} must divide model.n_head={self.n_head} (0 = same as n_head)"
            )
        if self.pos_emb == "rope" and self.head_dim % 2:
            raise ConfigError(f"RoPE needs an even head size, got n_embd/n_head = {self.head_dim}")
        if self.mlp_hidden < 0:
            raise ConfigError(f"model.mlp_hidden must be >= 0, got {self.mlp_hidden}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def padded_vocab_size(self) -> int:
        return round_up(self.vocab_size, self.pad_vocab_multiple)

    @property
    def hidden_dim(self) -> int:
        if self.mlp_hidden:
            return self.mlp_hidden
        if self.mlp == "swiglu":
            return round_up(int(8 * self.n_embd / 3), 64)
        return 4 * self.n_embd

    @property
    def is_gpt2(self) -> bool:
        """True when the architecture is plain GPT-2 (Hugging Face GPT2LMHeadModel can hold it)."""
        return (
            self.pos_emb == "learned" and self.norm == "layernorm" and self.mlp == "gelu" and self.bias
            and not self.qk_norm and self.kv_heads == self.n_head and self.tie_embeddings
            and self.hidden_dim == 4 * self.n_embd
        )

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        if name not in MODEL_PRESETS:
            raise ConfigError(f"unknown model preset {name!r}{closest(name, MODEL_PRESETS)}; "
                              f"choose from {', '.join(MODEL_PRESETS)}")
        return from_dict(cls, {**MODEL_PRESETS[name], **overrides}, "model")

    def to_json(self) -> str:
        return json.dumps(to_dict(self), indent=2)


# Architecture switches of the `modern` preset (see README: RoPE, RMSNorm, SwiGLU, QK-norm, untied head).
MODERN_ARCH: dict[str, Any] = dict(
    pos_emb="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True, bias=False, tie_embeddings=False,
    zero_init_proj=True,
)

MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
    # A few-hundred-thousand-parameter model for tests.
    "tiny": dict(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=256),
    "modern": dict(n_layer=12, n_head=12, n_embd=768, **MODERN_ARCH),
}
