"""Typed configuration: dataclasses, presets, TOML files and ``--section.key=value`` overrides.

Precedence (lowest first): dataclass defaults < preset / TOML file < command-line overrides.
Unknown keys are errors that name the closest valid key; values are validated in ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import sys
import types
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


def _to_bool(v: Any) -> bool:
    if isinstance(v, bool) or (isinstance(v, int) and v in (0, 1)):
        return bool(v)
    word = v.lower() if isinstance(v, str) else None
    if word in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return word in ("1", "true", "yes", "on")
    raise ValueError(v)


def _to_int(v: Any) -> int:
    if isinstance(v, bool):
        raise ValueError(v)
    if isinstance(v, int):
        return v
    f = float(v.replace("_", "")) if isinstance(v, str) else v  # "1e6", "524_288"
    if isinstance(f, float) and f.is_integer():
        return int(f)
    raise ValueError(v)


def _to_float(v: Any) -> float:
    if isinstance(v, bool):
        raise ValueError(v)
    return float(v)


def _to_str(v: Any) -> str:
    if isinstance(v, (dict, list)):
        raise ValueError(v)
    return str(v)


# Scalar type -> (converter from TOML / JSON / command-line values, what the error says was expected).
_SCALARS: dict[Any, tuple[typing.Callable[[Any], Any], str]] = {
    bool: (_to_bool, "true/false"), int: (_to_int, "an integer"), float: (_to_float, "a number"),
    str: (_to_str, "a string"),
}


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert ``value`` (from TOML, JSON or a command-line string) to the annotated type ``tp``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):  # the configs use X | None only
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return coerce(value, inner, where)
    if origin in (list, tuple):
        if isinstance(value, str):  # "0.9,0.95"
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        out = [coerce(v, args[0] if args else Any, where) for v in value]
        return tuple(out) if origin is tuple else out
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table of keys, got {value!r}")
        return from_dict(tp, value, where)
    if tp in _SCALARS:
        convert, expected = _SCALARS[tp]
        try:
            return convert(value)
        except (TypeError, ValueError, AttributeError):
            raise ConfigError(f"{where}: expected {expected}, got {value!r}") from None
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
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not a TOML text file (byte {e.object[e.start]:#04x} at offset {e.start} is not "
                          "UTF-8); give a recipe name or a .toml text file") from None
    except IsADirectoryError:
        raise ConfigError(f"{p}: is a directory; give a recipe name or a .toml file") from None


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
    gelu: str = "tanh"  # GELU form of mlp="gelu": "tanh" (GPT-2, build-nanogpt, llm.c) | "erf" (exact; nanoGPT)
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
        choices = {"pos_emb": ("learned", "rope"), "norm": ("layernorm", "rmsnorm"), "mlp": ("gelu", "swiglu", "relu2"),
                   "gelu": ("tanh", "erf")}
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

# `--model.arch=NAME`: architecture switches only (sizes untouched).
ARCH_PRESETS: dict[str, dict[str, Any]] = {"gpt2": {}, "modern": MODERN_ARCH}

MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
    # A few-hundred-thousand-parameter model for tests.
    "tiny": dict(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=256),
    "modern": dict(n_layer=12, n_head=12, n_embd=768, **MODERN_ARCH),
}


# --------------------------------------------------------------------------- training
# The training config: one dataclass per TOML table ([model], [data], [optim], ...). Defaults are the
# GPT-2 124M recipe of build-nanogpt; gptlab/configs/*.toml hold the named recipes.


@dataclass
class TrainModelConfig(ModelConfig):
    """The ``[model]`` table: a :class:`ModelConfig` plus where its starting weights come from.

    ``vocab_size = 0`` (the default here) takes the vocabulary from the dataset's manifest.
    With ``init`` set, the architecture comes from that source and only ``dropout`` applies.
    """

    vocab_size: int = 0
    init: str = ""  # "" = random init; else a gptlab.loading.load_model source (gpt2, HF dir, run dir)

    def __post_init__(self) -> None:
        if self.vocab_size < 0:
            raise ConfigError(f"model.vocab_size must be >= 0 (0 = from the dataset), got {self.vocab_size}")
        auto = self.vocab_size == 0
        if auto:  # validate everything else with a placeholder vocabulary
            self.vocab_size = 1
        try:
            super().__post_init__()
        finally:
            if auto:
                self.vocab_size = 0

    def to_model_config(self, vocab_size: int | None = None) -> ModelConfig:
        """The plain :class:`ModelConfig` the network is built from."""
        d = {f.name: getattr(self, f.name) for f in fields(ModelConfig)}
        if vocab_size is not None:
            d["vocab_size"] = vocab_size
        if d["vocab_size"] < 1:
            raise ConfigError("model.vocab_size is 0 (from the dataset) but no dataset vocabulary is known")
        return ModelConfig(**d)


@dataclass
class TrainDataConfig:
    """The ``[data]`` table. ``dir`` empty = the dataset's default dir (prepared on first use)."""

    dir: str = ""  # prepared dataset directory (manifest.json), or a dir / glob of llm.c or .npy shards; --data
    val: str = ""  # glob of validation shards for a manifest-less --data ("" = files named *_val_*)
    dataset: str = "fineweb_edu_10b"  # name for automatic `gptlab prepare` when dir has no manifest
    input: str = ""  # local file/glob passed to prepare (e.g. tinyshakespeare.txt)
    tokenizer: str = ""  # tokenizer for automatic prepare ("" = the dataset's own)
    field: str = "text"
    val_fraction: float | None = None
    shuffle: bool = False  # False: read shards in order (build-nanogpt); True: seeded random order
    seed: int = 0
    # Chat datasets only: with no input, generate this synthetic task's conversations (gptlab.evals.chat).
    task: str = ""  # "" or "reverse"
    task_examples: int = 20_000


@dataclass
class OptimConfig:
    """The ``[optim]`` table: optimizer and learning-rate schedule (see ``gptlab.optim.lr_at``)."""

    optimizer: str = "adamw"  # "adamw" | "muon" (Muon on 2-D hidden weights, AdamW for the rest)
    lr: float = 6e-4
    min_lr: float | None = None  # absolute floor of the decay; None -> lr * min_lr_ratio
    min_lr_ratio: float = 0.1
    betas: tuple[float, ...] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1  # on >= 2-D tensors only (matmul weights and embeddings)
    grad_clip: float = 1.0  # 0 = off
    warmup_steps: int = 715
    decay: str = "cosine"  # "cosine" | "linear" | "constant" | "wsd"
    decay_steps: int = 0  # step where the decay reaches min_lr; 0 = schedule.max_steps
    wsd_decay_frac: float = 0.2  # wsd: fraction of decay_steps spent in the final linear cooldown
    fused: bool = True  # fused AdamW kernel where available (CUDA)
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.optimizer not in ("adamw", "muon"):
            raise ConfigError(f"optim.optimizer={self.optimizer!r}: expected adamw or muon")
        if self.decay not in ("cosine", "linear", "constant", "wsd"):
            raise ConfigError(f"optim.decay={self.decay!r}: expected cosine, linear, constant or wsd")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas={list(self.betas)}: expected two numbers in [0, 1), e.g. 0.9,0.95")
        self.betas = tuple(self.betas)
        for name in ("lr", "eps", "weight_decay", "grad_clip", "min_lr_ratio", "muon_lr", "muon_weight_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(f"optim.{name} must be >= 0, got {getattr(self, name)}")
        if self.min_lr is not None and self.min_lr > self.lr:
            raise ConfigError(f"optim.min_lr={self.min_lr} is above optim.lr={self.lr}")
        if self.warmup_steps < 0 or self.decay_steps < 0:
            raise ConfigError("optim.warmup_steps and optim.decay_steps must be >= 0")
        if not 0.0 <= self.wsd_decay_frac <= 1.0:
            raise ConfigError(f"optim.wsd_decay_frac must be in [0, 1], got {self.wsd_decay_frac}")

    @property
    def final_lr(self) -> float:
        return self.min_lr if self.min_lr is not None else self.lr * self.min_lr_ratio


@dataclass
class BatchConfig:
    """The ``[batch]`` table. Gradient accumulation = batch_tokens / (micro_batch * seq_len * world size)."""

    batch_tokens: int = 524_288  # 2**19 tokens per optimizer step, all ranks and micro-steps
    micro_batch: int = 64  # sequences per forward/backward on one rank
    seq_len: int = 0  # 0 = model.block_size

    def __post_init__(self) -> None:
        for name in ("batch_tokens", "micro_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"batch.{name} must be >= 1, got {getattr(self, name)}")
        if self.seq_len < 0:
            raise ConfigError(f"batch.seq_len must be >= 0 (0 = model.block_size), got {self.seq_len}")


@dataclass
class ScheduleConfig:
    """The ``[schedule]`` table."""

    max_steps: int = 19_073  # 10B tokens / 524,288 tokens per step

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ConfigError(f"schedule.max_steps must be >= 1, got {self.max_steps}")


@dataclass
class EvalConfig:
    """The ``[eval]`` table. ``*_every = 0`` turns that evaluation off; all also run at the last step."""

    eval_every: int = 250
    eval_tokens: int = 10_485_760  # build-nanogpt: 20 steps x 64 x 1024 on 8 GPUs; 0 = the whole val split
    sample_every: int = 250
    sample_prompt: str = "Hello, I'm a language model,"
    sample_tokens: int = 32
    num_samples: int = 2
    sample_temperature: float = 1.0
    sample_top_k: int = 50
    hellaswag_every: int = 0
    hellaswag_input: str = ""
    hellaswag_limit: int = 0  # 0 = all 10,042 validation examples
    chat_eval_every: int = 0  # held-out exact match of data.task (gptlab.evals.chat)
    chat_eval_n: int = 200  # held-out questions per chat evaluation

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0:
                raise ConfigError(f"eval.{f.name} must be >= 0, got {v}")


@dataclass
class CheckpointConfig:
    """The ``[checkpoint]`` table. A checkpoint is always written at the end and on a clean stop."""

    every: int = 1000  # 0 = only at the end / on stop
    keep_last: int = 2  # 0 = keep all
    keep_best: bool = True  # also keep the checkpoint with the lowest val loss

    def __post_init__(self) -> None:
        if self.every < 0 or self.keep_last < 0:
            raise ConfigError("checkpoint.every and checkpoint.keep_last must be >= 0")


@dataclass
class SystemConfig:
    """The ``[system]`` table."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps (under torchrun: cuda:LOCAL_RANK)
    dtype: str = "auto"  # auto (bf16 on GPUs that have it, fp16 + GradScaler on older ones, fp32 on CPU) | bf16 | fp16 | fp32
    compile: bool = False
    tf32: bool = True
    seed: int = 1337
    time_limit: float = 0.0  # minutes; 0 = none. Stops cleanly (checkpoint, exit 0)
    fsdp: bool = False  # FSDP2 (fully_shard) instead of DDP when world size > 1
    threads: int = 0  # torch CPU threads; 0 = torch's default

    def __post_init__(self) -> None:
        if self.dtype.lower() not in ("auto", "bf16", "bfloat16", "fp16", "float16", "fp32", "float32"):
            raise ConfigError(f"system.dtype={self.dtype!r}: expected auto, bf16, fp16 or fp32")
        if self.time_limit < 0:
            raise ConfigError(f"system.time_limit must be >= 0 minutes, got {self.time_limit}")


@dataclass
class LoggingConfig:
    """The ``[logging]`` table."""

    log_every: int = 1  # print a step line every N steps (metrics.jsonl gets every step)
    progress: bool = True  # tqdm bar on stderr
    wandb: bool = False
    wandb_project: str = "gptlab"
    wandb_run_name: str = ""
    tensorboard: bool = False

    def __post_init__(self) -> None:
        if self.log_every < 1:
            raise ConfigError(f"logging.log_every must be >= 1, got {self.log_every}")


@dataclass
class TrainConfig:
    """Everything ``gptlab train`` needs. Precedence: defaults < TOML (--config) < flags < --section.key=value."""

    name: str = "run"  # recipe name; the default run dir is runs/<name>
    out_dir: str = ""  # run directory; --out
    resume: str = ""  # "" (refuse to touch an existing run) | "auto" | "never" (start over) | "STEP"
    model: TrainModelConfig = field(default_factory=lambda: TrainModelConfig(pad_vocab_multiple=128))
    data: TrainDataConfig = field(default_factory=TrainDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    system: SystemConfig = field(default_factory=SystemConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        if self.resume not in ("", "auto", "never") and not str(self.resume).isdigit():
            raise ConfigError(f"resume={self.resume!r}: expected auto, never, or a checkpoint's step number")
        seq = self.seq_len
        if seq > self.model.block_size:
            raise ConfigError(f"batch.seq_len={seq} exceeds model.block_size={self.model.block_size}: "
                              f"lower batch.seq_len or raise model.block_size")

    @property
    def seq_len(self) -> int:
        return self.batch.seq_len or self.model.block_size

    def grad_accum_steps(self, world_size: int) -> int:
        """Micro-steps per optimizer step; an error naming workable values if it does not divide."""
        per_micro = self.batch.micro_batch * self.seq_len * world_size
        if self.batch.batch_tokens % per_micro:
            lo = max(per_micro, self.batch.batch_tokens // per_micro * per_micro)
            options = [f"batch.batch_tokens={lo}", f"batch.batch_tokens={lo + per_micro}"]
            divisors = [m for m in range(1, self.batch.micro_batch * 2 + 1)
                        if self.batch.batch_tokens % (m * self.seq_len * world_size) == 0]
            if divisors:
                options.append(f"batch.micro_batch={max(divisors)}")
            raise ConfigError(
                f"batch.batch_tokens={self.batch.batch_tokens} is not a multiple of micro_batch x seq_len x "
                f"world_size = {self.batch.micro_batch} x {self.seq_len} x {world_size} = {per_micro}; "
                f"use e.g. {' or '.join(options)}")
        return self.batch.batch_tokens // per_micro


def _recipe_path(name: str) -> Path:
    """A recipe name (gptlab/configs/NAME.toml) or a path to a TOML file."""
    p = Path(name)
    if p.suffix == ".toml" or p.exists() or os.sep in name:
        if not p.is_file():
            raise ConfigError(f"--config {name}: file not found")
        return p
    from importlib import resources

    base = resources.files("gptlab").joinpath("configs")
    cand = base.joinpath(f"{name}.toml")
    if not cand.is_file():
        names = sorted(q.name[:-5] for q in base.iterdir() if q.name.endswith(".toml"))
        raise ConfigError(f"--config {name}: no such recipe{closest(name, names)}; "
                          f"choose from {', '.join(names)} or give a .toml path")
    return Path(str(cand))


def load_recipe(name: str, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """The TOML dict of a recipe, with ``base = "other-recipe"`` expanded (the base first, this file wins)."""
    path = _recipe_path(name)
    data = load_toml(path)
    base = data.pop("base", None)
    if base:
        if base in _seen:
            raise ConfigError(f"{path}: recipes include each other in a loop ({' -> '.join(_seen + (base,))})")
        data = merge(load_recipe(base, _seen + (name,)), data)
    data.setdefault("name", Path(name).stem if path.suffix == ".toml" else name)
    return data


def set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    node = d
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value


def resolve_train_config(config: str | None = None, settings: dict[str, Any] | None = None,
                         overrides: typing.Iterable[str] = ()) -> TrainConfig:
    """Build a :class:`TrainConfig`: defaults < recipe/TOML < ``settings`` ({dotted key: value}, None
    skipped: what ``gptlab train``'s flags set) < ``--section.key=value`` overrides."""
    data: dict[str, Any] = load_recipe(config) if config else {}
    for key, value in (settings or {}).items():
        if value is not None:
            set_dotted(data, key, value)
    data = merge(data, parse_overrides(overrides))
    model = data.get("model")
    if isinstance(model, dict) and "arch" in model:
        # `model.arch` is a base for the architecture switches: keys set explicitly anywhere still win.
        model = dict(model)
        arch = str(model.pop("arch"))
        if arch not in ARCH_PRESETS:
            raise ConfigError(f"model.arch={arch!r}: expected one of {', '.join(ARCH_PRESETS)}{closest(arch, ARCH_PRESETS)}")
        data["model"] = {**ARCH_PRESETS[arch], **model}
    try:
        return from_dict(TrainConfig, data, "")
    except ConfigError as e:
        msg = str(e)
        raise ConfigError("config" + msg if msg.startswith(":") else msg) from None
