"""Other projects' model files in and out: Hugging Face (one adapter per family), nanoGPT,
build-nanogpt and llm.c.

Every format maps to and from a :class:`gptlab.config.ModelConfig` plus a gptlab state dict; building
the network from them is :func:`gptlab.loading.materialize`'s job, the one place that does it. A
writer refuses a model unless mapping its config to the format and back gives the same
model-defining fields (:func:`round_trip_problems`), so a switch the format cannot hold -- including
one added to gptlab after the writer was written -- is an error, never a silently different model.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from gptlab.config import ModelConfig

# Fields that change how a model is trained or stored, not the function it computes.
NOT_MODEL_DEFINING = frozenset({"dropout", "init_std", "zero_init_proj", "pad_vocab_multiple"})


def model_defining(config: ModelConfig) -> dict[str, Any]:
    """The fields that fix the function a model computes, defaults resolved (``mlp_hidden=0`` means
    ``4 * n_embd`` for GELU, ...), so equal dicts mean equal networks for equal weights."""
    out = {f.name: getattr(config, f.name) for f in fields(config) if f.name not in NOT_MODEL_DEFINING}
    out["mlp_hidden"] = config.hidden_dim
    out["n_kv_head"] = config.kv_heads
    if config.mlp != "gelu":
        out.pop("gelu", None)  # the GELU form means nothing without a GELU
    if config.pos_emb != "rope":
        out.pop("rope_base", None)
    return out


def _fmt(v: Any) -> str:
    return ("true" if v else "false") if isinstance(v, bool) else repr(v)


def round_trip_problems(want: ModelConfig, got: ModelConfig) -> list[str]:
    """``name=WANT -> GOT`` for each model-defining field that differs between two configs."""
    a, b = model_defining(want), model_defining(got)
    return [f"{k}={_fmt(a.get(k))} -> {_fmt(b.get(k))}" for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]
