"""Hugging Face ``GPT2LMHeadModel``: learned positions, LayerNorm, GELU MLP.

gptlab keeps HF GPT-2's parameter *names* but stores projections as ``nn.Linear`` (out, in); HF
GPT-2's ``Conv1D`` weights are (in, out), so the four projection matrices are transposed here. A
bias-free model (nanoGPT's ``bias=False``) is written with zero biases, which computes the same
function; an untied head is written as ``lm_head.weight`` with ``tie_word_embeddings=false``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping

import torch

from gptlab.config import ModelConfig
from gptlab.convert.hf_base import HFAdapter, HFFormatError, pad_rows, require, short_list

# HF GPT-2 modules stored as Conv1D (in, out).
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# gptlab's GELU form -> HF activation_function, and back (gelu_pytorch_tanh is the same tanh form).
_ACT = {"tanh": "gelu_new", "erf": "gelu"}
_FROM_ACT = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "erf"}


class GPT2Adapter(HFAdapter):
    model_type = "gpt2"
    architecture = "GPT2LMHeadModel"
    ignored_suffixes = (".attn.bias", ".attn.masked_bias")

    def problems(self, config: ModelConfig) -> list[str]:
        c, out = config, []
        if c.norm != "layernorm":
            out.append(f"norm={c.norm!r} (GPT-2 has layernorm)")
        if c.mlp != "gelu":
            out.append(f"mlp={c.mlp!r} (GPT-2 has gelu)")
        if c.qk_norm:
            out.append("qk_norm=true")
        if c.kv_heads != c.n_head:
            out.append(f"n_kv_head={c.n_kv_head} (GPT-2 has no grouped-query attention)")
        return out

    def stored_config(self, config: ModelConfig) -> ModelConfig:
        return replace(config, bias=True)

    def config_to_hf(self, config: ModelConfig, common: dict[str, Any]) -> dict[str, Any]:
        c = config
        return {**common, "n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd, "n_positions": c.block_size,
                "n_ctx": c.block_size, "n_inner": None if c.hidden_dim == 4 * c.n_embd else c.hidden_dim,
                "activation_function": _ACT[c.gelu], "layer_norm_epsilon": c.norm_eps,
                "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout,
                "initializer_range": c.init_std, "scale_attn_weights": True,
                "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
                "tie_word_embeddings": c.tie_embeddings}

    def config_from_hf(self, hf: Mapping[str, Any], where: str) -> ModelConfig:
        act = hf.get("activation_function", "gelu_new")
        if act not in _FROM_ACT:
            raise HFFormatError(f"{where}: activation_function={act!r} is not supported "
                                "(gptlab's GPT-2 MLP is GELU: 'gelu_new' (tanh form) or 'gelu' (exact))")
        require(hf, "scale_attn_weights", True, where, "attention must be scaled by 1/sqrt(head size)")
        require(hf, "scale_attn_by_inverse_layer_idx", False, where, "per-layer attention scaling")
        require(hf, "add_cross_attention", False, where, "cross-attention")
        n_embd = int(hf.get("n_embd", 768))
        n_inner = hf.get("n_inner")
        return ModelConfig(
            block_size=int(hf.get("n_positions", 1024)), vocab_size=int(hf.get("vocab_size", 50257)),
            n_layer=int(hf.get("n_layer", 12)), n_head=int(hf.get("n_head", 12)), n_embd=n_embd,
            norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), gelu=_FROM_ACT[act],
            mlp_hidden=0 if n_inner in (None, 4 * n_embd) else int(n_inner),
            tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
            # Inference defaults: HF GPT-2 configs say 0.1, which is a training choice, not the model.
            dropout=0.0,
        )

    def normalise_keys(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Also gives OpenAI's original GPT-2 files (``h.0...``) the ``transformer.`` prefix."""
        out = {}
        for k, v in super().normalise_keys(state).items():
            out[k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k] = v
        return out

    def to_hf(self, state: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
        V = config.vocab_size
        out: dict[str, torch.Tensor] = {}
        for k, v in state.items():
            if k == "lm_head.weight" and config.tie_embeddings:
                continue
            if k.endswith(CONV1D_SUFFIXES):
                v = v.t()
            elif k in ("transformer.wte.weight", "lm_head.weight"):
                v = v[:V]
            out[k] = v
        if not config.bias:  # GPT-2 always has biases: zeros make it compute the bias-free function
            ref = state["transformer.wte.weight"]
            widths = {"ln_1": config.n_embd, "ln_2": config.n_embd, "attn.c_attn": 3 * config.n_embd,
                      "attn.c_proj": config.n_embd, "mlp.c_fc": config.hidden_dim, "mlp.c_proj": config.n_embd}
            for i in range(config.n_layer):
                for name, n in widths.items():
                    out[f"transformer.h.{i}.{name}.bias"] = ref.new_zeros(n)
            out["transformer.ln_f.bias"] = ref.new_zeros(config.n_embd)
        return out

    def from_hf(self, sd: dict[str, torch.Tensor], config: ModelConfig, where: str) -> dict[str, torch.Tensor]:
        Vp = config.padded_vocab_size
        out: dict[str, torch.Tensor] = {}
        for k, v in sd.items():
            if k.endswith(CONV1D_SUFFIXES):
                v = v.t()
            elif k == "transformer.wte.weight":
                v = pad_rows(v, Vp)
            out[k] = v
        if not config.bias:  # only zero biases can be dropped without changing the function
            nonzero = [k for k in list(out) if k.endswith(".bias") and bool(out.pop(k).any())]
            if nonzero:
                raise HFFormatError(f"{where}: non-zero biases ({short_list(nonzero, 3)}) for a bias=false config")
        head = out.get("lm_head.weight")
        out["lm_head.weight"] = out["transformer.wte.weight"] if config.tie_embeddings else pad_rows(head, Vp)
        return out
