"""Hugging Face ``LlamaForCausalLM`` and ``Qwen3ForCausalLM``: RoPE, RMSNorm, SwiGLU, optional GQA.

Qwen3 is the Llama shape plus a per-head RMSNorm of queries and keys before RoPE (gptlab's
``qk_norm``). gptlab's fused ``c_attn`` = [q; k; v] and ``c_fc`` = [gate; up] are split and
concatenated here; RoPE already uses HF's "rotate half" layout, so no q/k permutation is needed.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from gptlab.config import ModelConfig
from gptlab.convert.hf_base import HFAdapter, HFFormatError, pad_rows, require


class LlamaAdapter(HFAdapter):
    model_type = "llama"
    architecture = "LlamaForCausalLM"
    ignored_suffixes = ("rotary_emb.inv_freq",)

    def problems(self, config: ModelConfig) -> list[str]:
        c, out = config, []
        if c.norm != "rmsnorm":
            out.append(f"norm={c.norm!r} (Llama/Qwen3 use rmsnorm)")
        if c.mlp != "swiglu":
            out.append(f"mlp={c.mlp!r} (Llama/Qwen3 use swiglu)")
        if c.qk_norm and c.bias:
            out.append("bias=true with qk_norm (Qwen3 has no MLP biases)")
        return out

    def config_to_hf(self, config: ModelConfig, common: dict[str, Any]) -> dict[str, Any]:
        c = config
        return {**common, "hidden_size": c.n_embd, "intermediate_size": c.hidden_dim, "num_hidden_layers": c.n_layer,
                "num_attention_heads": c.n_head, "num_key_value_heads": c.kv_heads, "head_dim": c.head_dim,
                "hidden_act": "silu", "max_position_embeddings": c.block_size, "rms_norm_eps": c.norm_eps,
                # rope_theta for transformers 4.x, rope_parameters for 5.x; both say the same thing.
                "rope_theta": c.rope_base, "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_base},
                "rope_scaling": None, "attention_bias": c.bias, "attention_dropout": c.dropout,
                "initializer_range": c.init_std, "tie_word_embeddings": c.tie_embeddings,
                **self.extra_config(c)}

    def extra_config(self, c: ModelConfig) -> dict[str, Any]:
        return {"mlp_bias": c.bias, "pretraining_tp": 1}

    def check_family(self, hf: Mapping[str, Any], bias: bool, where: str) -> None:
        if bool(hf.get("mlp_bias", False)) != bias:
            raise HFFormatError(f"{where}: attention_bias={bias} but mlp_bias={hf.get('mlp_bias')}: "
                                "gptlab has one bias switch for both")

    def config_from_hf(self, hf: Mapping[str, Any], where: str) -> ModelConfig:
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise HFFormatError(f"{where}: hidden_act={act!r} is not supported (gptlab's SwiGLU uses silu)")
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise HFFormatError(f"{where}: rope_type={rope_type!r} is not supported (only plain RoPE)")
        theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
        n_embd, n_head = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        head_dim = hf.get("head_dim") or n_embd // n_head
        if head_dim * n_head != n_embd:
            raise HFFormatError(f"{where}: head_dim={head_dim} * num_attention_heads={n_head} != "
                                f"hidden_size={n_embd} (gptlab needs head_dim = hidden_size / heads)")
        bias = bool(hf.get("attention_bias", False))
        self.check_family(hf, bias, where)
        require(hf, "pretraining_tp", 1, where, "tensor-parallel slicing of the head")
        n_kv = int(hf.get("num_key_value_heads") or n_head)
        return ModelConfig(
            block_size=int(hf.get("max_position_embeddings", 2048)), vocab_size=int(hf["vocab_size"]),
            n_layer=int(hf["num_hidden_layers"]), n_head=n_head, n_embd=n_embd,
            n_kv_head=0 if n_kv == n_head else n_kv, pos_emb="rope", rope_base=theta, norm="rmsnorm",
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)), mlp="swiglu",
            mlp_hidden=int(hf["intermediate_size"]), qk_norm=self.model_type == "qwen3", bias=bias,
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)), dropout=0.0,
        )

    @staticmethod
    def layer_names(config: ModelConfig, i: int
                    ) -> tuple[list[tuple[str, str]], list[tuple[str, list[str], list[int]]]]:
        """Layer ``i``'s tensor names, one table for both directions: ``(gptlab, HF)`` pairs that are the same
        tensor, and ``(gptlab, [HF, ...], rows)`` where gptlab's fused tensor is the HF ones concatenated
        along dim 0 (``rows`` each)."""
        g, h = f"transformer.h.{i}.", f"model.layers.{i}."
        hs, nh, nkv, hid = config.head_dim, config.n_head, config.kv_heads, config.hidden_dim
        same = [("ln_1.weight", "input_layernorm.weight"), ("ln_2.weight", "post_attention_layernorm.weight")]
        if config.qk_norm:
            same += [("attn.q_norm.weight", "self_attn.q_norm.weight"),
                     ("attn.k_norm.weight", "self_attn.k_norm.weight")]
        fused = []
        for p in ["weight"] + (["bias"] if config.bias else []):
            same += [(f"attn.c_proj.{p}", f"self_attn.o_proj.{p}"), (f"mlp.c_proj.{p}", f"mlp.down_proj.{p}")]
            fused += [(f"attn.c_attn.{p}", [f"self_attn.{n}_proj.{p}" for n in "qkv"], [nh * hs, nkv * hs, nkv * hs]),
                      (f"mlp.c_fc.{p}", [f"mlp.gate_proj.{p}", f"mlp.up_proj.{p}"], [hid, hid])]
        return ([(g + a, h + b) for a, b in same],
                [(g + a, [h + b for b in bs], rows) for a, bs, rows in fused])

    def to_hf(self, state: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
        V = config.vocab_size
        out = {"model.embed_tokens.weight": state["transformer.wte.weight"][:V],
               "model.norm.weight": state["transformer.ln_f.weight"]}
        if not config.tie_embeddings:
            out["lm_head.weight"] = state["lm_head.weight"][:V]
        for i in range(config.n_layer):
            same, fused = self.layer_names(config, i)
            out.update({theirs: state[ours] for ours, theirs in same})
            for ours, theirs, rows in fused:
                out.update(zip(theirs, state[ours].split(rows, dim=0)))
        return out

    def from_hf(self, sd: dict[str, torch.Tensor], config: ModelConfig, where: str) -> dict[str, torch.Tensor]:
        Vp = config.padded_vocab_size
        out = {"transformer.wte.weight": pad_rows(sd["model.embed_tokens.weight"], Vp),
               "transformer.ln_f.weight": sd["model.norm.weight"]}
        out["lm_head.weight"] = (out["transformer.wte.weight"] if config.tie_embeddings
                                 else pad_rows(sd["lm_head.weight"], Vp))
        for i in range(config.n_layer):
            same, fused = self.layer_names(config, i)
            out.update({ours: sd[theirs] for ours, theirs in same})
            for ours, theirs, _ in fused:
                out[ours] = torch.cat([sd[t] for t in theirs])
        return out


class Qwen3Adapter(LlamaAdapter):
    model_type = "qwen3"
    architecture = "Qwen3ForCausalLM"

    def extra_config(self, c: ModelConfig) -> dict[str, Any]:
        return {"use_sliding_window": False, "sliding_window": None, "max_window_layers": c.n_layer}

    def check_family(self, hf: Mapping[str, Any], bias: bool, where: str) -> None:
        if bias:
            raise HFFormatError(f"{where}: attention_bias=true is not supported for qwen3")
        require(hf, "use_sliding_window", False, where, "sliding-window attention")
