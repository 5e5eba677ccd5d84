"""One entry point for every model source a user can type after ``--init``, and the one way a
model is built from saved weights (:func:`materialize`).

Accepted forms, tried in this order:

1. a gptlab run dir (has ``checkpoints/``) or checkpoint dir (has ``meta.json``) -> the newest
   complete checkpoint;
2. a Hugging Face model dir (``config.json`` with ``model_type`` gpt2, llama or qwen3), including
   the dirs ``gptlab export`` writes;
3. a nanoGPT run dir or its ``ckpt.pt`` (with ``meta.pkl``'s character vocabulary when present), a
   build-nanogpt log dir (its newest ``model_NNNNN.pt``) or checkpoint file (:mod:`gptlab.convert.nanogpt`);
4. an llm.c model file (``gpt2_124M.bin``; version 3 fp32 or 5 bf16, :mod:`gptlab.convert.llmc`);
5. a Hub name: ``gpt2``, ``gpt2-medium``, ``gpt2-large``, ``gpt2-xl`` (or an ``owner/name`` repo id),
   downloaded once into the huggingface_hub cache.

Pickled files (nanoGPT, build-nanogpt) are read without running any code in them
(:mod:`gptlab.convert.safe_pickle`).

Each form is read into a :class:`Source` (config, gptlab state dict, tokenizer); :func:`materialize`
then builds the network on the meta device and assigns the weights, so no random init is ever
computed for a model whose weights are about to be replaced (a 1.5B model would spend minutes on it).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import torch

from gptlab.config import ModelConfig
from gptlab.errors import GptlabError

ACCEPTED = ("a Hub name (gpt2, gpt2-medium, gpt2-large, gpt2-xl), a Hugging Face model directory "
            "(config.json + model.safetensors), a gptlab run / checkpoint directory, a nanoGPT run dir or ckpt.pt, "
            "a build-nanogpt log dir or model_NNNNN.pt, or an llm.c model .bin")


class LoadError(GptlabError):
    """Saved weights that do not fit the model their config describes."""


@dataclass
class Source:
    """A model read from disk, not yet built: its config, gptlab-named weights and tokenizer."""

    config: ModelConfig
    state: dict[str, torch.Tensor]
    tokenizer: Any | None
    kind: str  # "gptlab", "hf", "hub", ...
    where: str
    meta: dict[str, Any] = field(default_factory=dict)


def materialize(config: ModelConfig, state: Mapping[str, torch.Tensor], *, device: torch.device | str = "cpu",
                dtype: torch.dtype | None = None, where: str = "checkpoint"):
    """A :class:`gptlab.model.GPT` of ``config`` holding ``state`` (gptlab names; a tied head may be absent).

    The network is created on the meta device and the tensors are assigned, so nothing is
    initialised twice. ``dtype`` casts floating-point weights (None keeps what was saved). Missing or
    unexpected keys and shape mismatches raise :class:`LoadError` naming them.
    """
    from gptlab.model import GPT

    with torch.device("meta"):
        model = GPT(config)
    want = model.state_dict()
    tied = config.tie_embeddings
    keys = set(state) - ({"lm_head.weight"} if tied else set())
    missing = sorted(k for k in want if k not in keys and not (tied and k == "lm_head.weight"))
    unexpected = sorted(keys - set(want))
    if missing or unexpected:
        raise LoadError(f"{where}: weights do not match the model (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
    bad = [f"{k} {tuple(state[k].shape)} (expected {tuple(want[k].shape)})" for k in keys
           if state[k].shape != want[k].shape]
    if bad:
        raise LoadError(f"{where}: shape mismatch for {', '.join(sorted(bad)[:3])}")
    device = torch.device(device)
    tensors = {k: state[k].to(device=device, dtype=dtype if dtype is not None and state[k].is_floating_point()
                                else state[k].dtype) for k in keys}
    model.load_state_dict(tensors, assign=True, strict=False)
    if tied:  # assign=True replaced wte's Parameter: re-tie
        model.lm_head.weight = model.transformer.wte.weight
    if config.pos_emb == "rope":  # non-persistent buffers are still on meta: rebuild them
        from gptlab.model import rope_cos_sin

        cos, sin = rope_cos_sin(config.block_size, config.head_dim, config.rope_base)
        model.rope_cos, model.rope_sin = cos.to(device), sin.to(device)
    return model.eval()


# --------------------------------------------------------------------------- tokenizers


def _hf_tokenizer(d: Path, vocab_size: int):
    """The tokenizer of an HF dir: gptlab's own spec when exported by gptlab, GPT-2 BPE when its vocab is GPT-2's."""
    from gptlab.convert.hf_base import GPTLAB_TOKENIZER_FILE
    from gptlab.tokenizer import GPT2_VOCAB_SIZE, GPT2Tokenizer, gpt2_vocab_files, load_tokenizer

    if (d / GPTLAB_TOKENIZER_FILE).is_file():
        return load_tokenizer(d / GPTLAB_TOKENIZER_FILE)
    vocab = d / "vocab.json"
    if vocab.is_file():
        try:
            same = json.loads(vocab.read_text(encoding="utf-8")) == json.loads(
                gpt2_vocab_files()[1].read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            same = False
        if same:
            return GPT2Tokenizer()
    elif vocab_size == GPT2_VOCAB_SIZE and not (d / "tokenizer.json").is_file():
        return GPT2Tokenizer()  # bare GPT-2-sized weights: the only vocabulary of that size gptlab knows
    warnings.warn(f"{d}: tokenizer is not GPT-2's and was not written by gptlab; loading the model without one",
                  stacklevel=5)
    return None


def _checkpoint_tokenizer(ckpt: Path, meta: dict[str, Any]):
    from gptlab.tokenizer import from_spec, load_tokenizer

    spec = meta.get("tokenizer")
    run_tok = ckpt.parent.parent / "tokenizer.json"
    if spec:
        return from_spec(spec, search=[ckpt.parent.parent, ckpt])  # a trained BPE's ranks: in the run dir
    if run_tok.is_file():
        return load_tokenizer(run_tok)
    return None


# --------------------------------------------------------------------------- sources


def _is_gptlab_run(d: Path) -> bool:
    if (d / "checkpoints").is_dir() or (d / "meta.json").is_file():
        return True
    cfg = d / "config.json"
    if cfg.is_file():
        try:
            data = json.loads(cfg.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return False
        return isinstance(data, dict) and "model" in data and "model_type" not in data
    return False


def read_gptlab_checkpoint(path: str | os.PathLike) -> Source:
    """A gptlab run dir (its newest checkpoint that verifies) or checkpoint dir; ``meta`` is its meta.json.

    The checkpoint is pinned while it is read, so a training run pruning it meanwhile cannot pull it away;
    a newer one that is damaged or being deleted is skipped with a warning saying why.
    """
    from gptlab.checkpoint import (
        CHECKPOINTS, COMPLETE, CheckpointError, is_complete, load_model_state, load_newest, pinned, read_checksums,
        read_meta,
    )
    from gptlab.config import from_dict

    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such run or checkpoint directory")

    def load(ckpt: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        sums = read_checksums(ckpt)
        return read_meta(ckpt, sums), load_model_state(ckpt, "cpu", sums)

    if (p / "meta.json").is_file() or (p / "model.safetensors").is_file():
        if not is_complete(p):
            raise CheckpointError(f"{p}: checkpoint is incomplete (no {COMPLETE} marker: its save was "
                                  f"interrupted); use an older checkpoint or the run dir")
        with pinned(p):
            ckpt, (meta, state) = p, load(p)
    else:
        found = load_newest(p, load)
        if found is None:
            raise CheckpointError(f"{p}: no complete checkpoint in {p / CHECKPOINTS} "
                                  f"(train longer, or check that the run saved one)")
        ckpt, (meta, state) = found
    model_cfg = meta.get("model_config")
    if model_cfg is None:
        raise CheckpointError(f"{ckpt / 'meta.json'}: no model_config; not a gptlab checkpoint")
    config = from_dict(ModelConfig, model_cfg, "model")
    return Source(config, state, _checkpoint_tokenizer(ckpt, meta), "gptlab", str(ckpt), meta)


def read_hf(path: str | os.PathLike, kind: str = "hf") -> Source:
    from gptlab.convert.hf_base import read_hf_dir

    d = Path(path)
    config, state = read_hf_dir(d)
    return Source(config, state, _hf_tokenizer(d, config.vocab_size), kind, str(d))


def read_foreign_checkpoint(path: str | os.PathLike) -> Source:
    """A nanoGPT ``ckpt.pt`` or build-nanogpt ``model_NNNNN.pt`` file."""
    from gptlab.convert.nanogpt import read_checkpoint

    config, state, tok, info = read_checkpoint(path)
    return Source(config, state, tok, info["format"], str(path), info)


def read_llmc(path: str | os.PathLike) -> Source:
    """An llm.c model file; its vocabulary is GPT-2's when it has GPT-2's size."""
    from gptlab.convert.llmc import read_model
    from gptlab.tokenizer import GPT2_VOCAB_SIZE, GPT2Tokenizer

    config, state, info = read_model(path)
    tok = GPT2Tokenizer() if config.vocab_size == GPT2_VOCAB_SIZE else None
    return Source(config, state, tok, "llmc", str(path), info)


HUB_REPOS = {name: f"openai-community/{name}" for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}
_HUB_FILES = ["config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
              "model-*.safetensors", "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json"]


def hub_download(name: str) -> Path:
    """Local snapshot dir of a Hub model (cached by huggingface_hub; only the files gptlab needs)."""
    repo = HUB_REPOS.get(name, name)
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise GptlabError(f"--init {name}: downloading needs huggingface_hub: pip install 'gptlab[hf]'") from None
    try:
        try:  # the cache first: no network round trip when it is already here
            cached = Path(snapshot_download(repo, allow_patterns=_HUB_FILES, local_files_only=True))
            if (cached / "config.json").is_file() and any(cached.glob("model*.safetensors")):
                return cached
        except Exception:
            pass  # not cached (or only partly): download below
        return Path(snapshot_download(repo, allow_patterns=_HUB_FILES))
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise GptlabError(f"--init {name}: could not download {repo} from the Hugging Face Hub ({reason}); "
                          f"connect to the internet (and unset HF_HUB_OFFLINE), or download it elsewhere and "
                          f"pass the local directory") from None


def read_source(src: str | os.PathLike) -> Source:
    """Read ``src`` (see the module docstring for the accepted forms) without building the model."""
    s = str(src)
    p = Path(s).expanduser()
    if p.is_dir():
        if _is_gptlab_run(p):
            return read_gptlab_checkpoint(p)
        if (p / "config.json").is_file():
            return read_hf(p)
        from gptlab.convert.nanogpt import find_checkpoint

        ckpt = find_checkpoint(p)
        if ckpt is not None:
            return read_foreign_checkpoint(ckpt)
        raise GptlabError(f"--init {s}: directory has neither config.json (Hugging Face), checkpoints/ or "
                          f"meta.json (gptlab), ckpt.pt (nanoGPT) nor model_NNNNN.pt (build-nanogpt); "
                          f"expected {ACCEPTED}")
    if p.is_file():
        from gptlab.convert.llmc import is_llmc_model

        if is_llmc_model(p):
            return read_llmc(p)
        if p.suffix in (".pt", ".pth", ".ckpt"):
            return read_foreign_checkpoint(p)
        raise GptlabError(f"--init {s}: is a file gptlab does not read as a model; pass its directory for a "
                          f"Hugging Face or gptlab model ({ACCEPTED})")
    if p.exists():
        raise GptlabError(f"--init {s}: is neither a file nor a directory; expected {ACCEPTED}")
    if s.count("/") == 1 and p.parent.is_dir():
        # `exp/a` where `exp/` is a local directory: a missing local path, not a Hub repo id.
        raise GptlabError(f"--init {s}: not found ({p.parent}/ exists but has no {p.name!r}); expected {ACCEPTED}")
    if s in HUB_REPOS or (s.count("/") == 1 and not s.startswith((".", "/", "~"))):
        return read_hf(hub_download(s), kind="hub")
    raise GptlabError(f"--init {s}: not found; expected {ACCEPTED}")


def load_model(src: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype | None = None, *,
               overrides: Mapping[str, Any] | None = None):
    """(GPT in eval mode, Tokenizer or None) from ``src`` (see the module docstring for the accepted forms).

    ``dtype`` casts the weights (e.g. ``torch.bfloat16`` for inference); None keeps the stored dtype.
    ``overrides`` replaces config fields that do not change the weights' shapes (e.g. ``dropout``).
    """
    source = read_source(src)
    config = replace(source.config, **overrides) if overrides else source.config
    return materialize(config, source.state, device=device, dtype=dtype, where=source.where), source.tokenizer


def from_hf_model(hf_model, device: torch.device | str | None = None):
    """A gptlab GPT with the weights of an in-memory ``transformers`` gpt2/llama/qwen3 model."""
    from gptlab.convert.hf_base import config_from_hf, from_hf_state_dict

    where = type(hf_model).__name__
    config = config_from_hf(hf_model.config.to_dict(), where=where)
    state = from_hf_state_dict(hf_model.state_dict(), config, where=where)
    p = next(hf_model.parameters())
    return materialize(config, state, device=device or p.device, dtype=p.dtype, where=where)


def load_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu"):
    """``(GPT, Tokenizer | None, meta)`` from a gptlab run dir (its newest complete checkpoint) or checkpoint dir."""
    source = read_gptlab_checkpoint(path)
    model = materialize(source.config, source.state, device=device, where=source.where)
    return model, source.tokenizer, source.meta
