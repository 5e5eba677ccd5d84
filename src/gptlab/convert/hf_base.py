"""The Hugging Face adapter contract, the registry of families, and reading HF model directories.

An adapter maps one HF family (``model_type``) both ways: ``config.json`` <-> :class:`ModelConfig`
and HF state dict <-> gptlab state dict. :func:`adapter_for_config` picks the family for an export
and refuses it unless the config survives the trip there and back (:func:`gptlab.convert.round_trip_problems`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from gptlab.config import ConfigError, ModelConfig
from gptlab.convert import round_trip_problems
from gptlab.errors import GptlabError


GPTLAB_TOKENIZER_FILE = "gptlab_tokenizer.json"  # gptlab's own tokenizer spec in an exported dir: lossless round trips


class HFFormatError(GptlabError, ValueError):
    """A Hugging Face checkpoint or config that gptlab cannot read; the message says why and how to fix it."""


def short_list(keys: list[str], n: int = 6) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def require(hf: Mapping[str, Any], key: str, ok: Any, where: str, hint: str) -> None:
    """``hf[key]`` (absent: the first allowed value) must be one of ``ok``; else an :class:`HFFormatError`."""
    value = hf.get(key, ok[0] if isinstance(ok, tuple) else ok)
    allowed = ok if isinstance(ok, tuple) else (ok,)
    if value not in allowed:
        raise HFFormatError(f"{where}: {key}={value!r} is not supported ({hint})")


def pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` with zero rows appended up to ``rows`` (padded vocabulary rows are never sampled)."""
    if t.size(0) >= rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.size(0), *t.shape[1:])])


class HFAdapter:
    """One Hugging Face family. Subclasses set the names and implement the four mappings."""

    model_type: str = ""
    architecture: str = ""
    # Non-parameter buffers old checkpoints carry (causal masks, RoPE frequencies): dropped on import.
    ignored_suffixes: tuple[str, ...] = ()

    def problems(self, config: ModelConfig) -> list[str]:
        """Known reasons this family cannot hold ``config`` (for a helpful message; the round trip is the guarantee)."""
        return []

    def stored_config(self, config: ModelConfig) -> ModelConfig:
        """The config the exported files describe: ``config`` itself unless the family stores an
        equivalent form (GPT-2 always has biases: a bias-free model is written with zero biases)."""
        return config

    def config_to_hf(self, config: ModelConfig, common: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def config_from_hf(self, hf: Mapping[str, Any], where: str) -> ModelConfig:
        raise NotImplementedError

    def to_hf(self, state: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
        """gptlab state dict -> HF names and layouts (padded vocab rows dropped, a tied head left out)."""
        raise NotImplementedError

    def from_hf(self, sd: dict[str, torch.Tensor], config: ModelConfig, where: str) -> dict[str, torch.Tensor]:
        """HF state dict, already checked against :meth:`to_hf`'s keys and shapes -> gptlab state dict."""
        raise NotImplementedError

    def normalise_keys(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in state.items() if not k.endswith(self.ignored_suffixes)}


def _adapters() -> dict[str, HFAdapter]:
    from gptlab.convert.hf_gpt2 import GPT2Adapter
    from gptlab.convert.hf_llama import LlamaAdapter, Qwen3Adapter

    return {a.model_type: a for a in (GPT2Adapter(), LlamaAdapter(), Qwen3Adapter())}


def adapters() -> dict[str, HFAdapter]:
    """``model_type`` -> adapter for every family gptlab reads and writes."""
    global _ADAPTERS
    if _ADAPTERS is None:
        _ADAPTERS = _adapters()
    return _ADAPTERS


_ADAPTERS: dict[str, HFAdapter] | None = None


def _common(config: ModelConfig, adapter: HFAdapter, bos_id: int | None, eos_id: int | None,
            dtype: torch.dtype) -> dict[str, Any]:
    dt = str(dtype).removeprefix("torch.")
    return {"architectures": [adapter.architecture], "model_type": adapter.model_type,
            "vocab_size": config.vocab_size, "bos_token_id": bos_id, "eos_token_id": eos_id,
            "torch_dtype": dt, "dtype": dt, "use_cache": True}


def adapter_for_config(config: ModelConfig) -> HFAdapter:
    """The family that holds ``config`` exactly; a :class:`GptlabError` naming what would change otherwise."""
    fams = adapters()
    if config.pos_emb == "learned":
        adapter, label = fams["gpt2"], "learned positions"
    else:
        adapter, label = fams["qwen3" if config.qk_norm else "llama"], "RoPE"
    known = adapter.problems(config)
    if known:
        raise GptlabError(f"no Hugging Face architecture holds {label} with " + "; ".join(known)
                          + (": export needs plain GPT-2, or RoPE + RMSNorm + SwiGLU (Llama/Qwen3)"
                             if adapter.model_type == "gpt2" else
                             ": export needs RoPE + RMSNorm + SwiGLU (Llama, or Qwen3 with qk_norm)"))
    hf = adapter.config_to_hf(config, _common(config, adapter, None, None, torch.float32))
    try:
        back = adapter.config_from_hf(hf, f"{adapter.model_type} config")
    except GptlabError as e:
        raise GptlabError(f"no Hugging Face architecture holds this model: {e}") from None
    changed = round_trip_problems(adapter.stored_config(config), back)
    if changed:
        raise GptlabError(f"no Hugging Face architecture holds this model: {adapter.architecture} would change "
                          + ", ".join(changed) + "; export refused rather than writing a different model")
    return adapter


def hf_architecture(config: ModelConfig) -> str:
    """The HF ``model_type`` that represents ``config`` exactly: ``gpt2``, ``llama`` or ``qwen3``."""
    return adapter_for_config(config).model_type


def config_to_hf(config: ModelConfig, *, bos_id: int | None = None, eos_id: int | None = None,
                 dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The ``config.json`` dict of the HF family holding ``config`` (vocab padding dropped)."""
    adapter = adapter_for_config(config)
    return adapter.config_to_hf(config, _common(config, adapter, bos_id, eos_id, dtype))


def config_from_hf(hf: Mapping[str, Any], where: str = "config.json") -> ModelConfig:
    """An HF ``config.json`` dict (gpt2, llama or qwen3) as a :class:`ModelConfig`.

    Settings that change the math and that gptlab does not implement are errors, not silently dropped.
    """
    model_type = hf.get("model_type")
    adapter = adapters().get(model_type)  # type: ignore[arg-type]
    if adapter is None:
        raise HFFormatError(f"{where}: model_type={model_type!r} is not supported; gptlab reads "
                            + ", ".join(adapters()))
    try:
        return adapter.config_from_hf(hf, where)
    except KeyError as e:
        raise HFFormatError(f"{where}: missing key {e.args[0]!r} for model_type {model_type!r}") from None
    except ConfigError as e:
        raise HFFormatError(f"{where}: {e}") from None


def to_hf_state_dict(state: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """gptlab state dict -> HF names/layouts (padded vocab rows dropped; a tied head left out, since
    HF re-ties it on load and safetensors refuses shared storage)."""
    out = adapter_for_config(config).to_hf(state, config)
    return {k: v.contiguous() for k, v in out.items()}


def expected_hf_shapes(config: ModelConfig) -> dict[str, torch.Size]:
    """HF key -> shape of the weights a ``config`` model has in its family (built on the meta device)."""
    from gptlab.model import GPT

    with torch.device("meta"):
        model = GPT(config)
    return {k: v.shape for k, v in to_hf_state_dict(model.state_dict(), config).items()}


def from_hf_state_dict(state: Mapping[str, torch.Tensor], config: ModelConfig, *,
                       where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """HF state dict (family per :func:`adapter_for_config` of ``config``) -> gptlab state dict.

    Missing or unexpected keys and shape mismatches raise :class:`HFFormatError` naming them. Rows of a
    padded vocabulary (``config.pad_vocab_multiple``) are filled with zeros; they are never sampled.
    """
    adapter = adapter_for_config(config)
    arch = adapter.model_type
    sd = adapter.normalise_keys(state)
    expected = expected_hf_shapes(config)
    if config.tie_embeddings:
        sd.pop("lm_head.weight", None)  # a tied head may or may not be saved; wte is the one we keep
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing:
        raise HFFormatError(f"{where}: missing {len(missing)} {arch} weight(s): {short_list(missing)}")
    if unexpected:
        raise HFFormatError(f"{where}: unexpected {len(unexpected)} key(s) for a {config.n_layer}-layer {arch} "
                            f"model: {short_list(unexpected)}")
    bad = [f"{k} {tuple(sd[k].shape)} (expected {tuple(s)})" for k, s in expected.items() if sd[k].shape != s]
    if bad:
        raise HFFormatError(f"{where}: shape mismatch for {short_list(bad, 3)}; does config.json match the weights?")
    out = adapter.from_hf(sd, config, where)
    return {k: v.contiguous() for k, v in out.items()}


# --------------------------------------------------------------------------- directories


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path) / "config.json"
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HFFormatError(f"{p}: not found; a Hugging Face model directory needs config.json") from None
    except json.JSONDecodeError as e:
        raise HFFormatError(f"{p}: not valid JSON ({e.msg} at line {e.lineno})") from None


def read_hf_weights(path: str | os.PathLike, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of an HF model dir: ``model.safetensors``, sharded safetensors, or (safely) ``pytorch_model.bin``."""
    from gptlab.fsio import read_safetensors

    d = Path(path)
    dev = str(device)
    if (d / "model.safetensors").is_file():
        return read_safetensors(d / "model.safetensors", device=dev)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise HFFormatError(f"{index}: not a safetensors index (no weight_map of file names)") from None
        root = d.resolve()
        for f in files:
            if not isinstance(f, str) or (d / f).resolve().parent != root:
                raise HFFormatError(f"{index}: weight file {f!r} is outside the model directory; an index may only "
                                    f"name files beside it")
        out: dict[str, torch.Tensor] = {}
        for f in files:
            out.update(read_safetensors(d / f, device=dev))
        return out
    if (d / "pytorch_model.bin").is_file():
        try:
            # weights_only: a .bin is a pickle; never run code from someone else's file.
            return torch.load(d / "pytorch_model.bin", map_location=dev, weights_only=True)
        except Exception as e:
            raise HFFormatError(f"{d / 'pytorch_model.bin'}: cannot be loaded safely ({type(e).__name__}); "
                                "convert it to model.safetensors") from None
    raise HFFormatError(f"{d}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin found")


def read_hf_dir(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(config, gptlab state dict) of a local HF model directory (gpt2, llama or qwen3)."""
    d = Path(path)
    config = config_from_hf(read_hf_config(d), where=str(d / "config.json"))
    return config, from_hf_state_dict(read_hf_weights(d), config, where=str(d))
