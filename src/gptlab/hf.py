"""Hugging Face interop: GPT-2 / Llama / Qwen3 checkpoints in, the same formats out.

gptlab keeps HF GPT-2's parameter *names* but stores every projection as ``nn.Linear`` (out, in);
HF GPT-2 uses ``Conv1D`` whose weights are (in, out). The transposes live in this module only.

Architectures (see :func:`hf_architecture`):

- ``gpt2``: learned positions, LayerNorm, tanh-GELU MLP -> ``GPT2LMHeadModel``. A bias-free model
  (nanoGPT's ``bias=False``) is written with zero biases, which computes the same function; an untied
  head is written as ``lm_head.weight`` with ``tie_word_embeddings=false``.
- ``llama``: RoPE, RMSNorm, SwiGLU (optionally GQA, biases, untied head) -> ``LlamaForCausalLM``.
- ``qwen3``: the Llama shape plus per-head RMSNorm of queries and keys before RoPE -> ``Qwen3ForCausalLM``.

Anything else (e.g. learned positions with RMSNorm, ReLU^2) has no HF home and is refused with a
:class:`GptlabError`. gptlab's fused ``c_attn`` = [q; k; v] and ``c_fc`` = [gate; up] are split /
concatenated here; RoPE already uses HF's "rotate half" layout, so no q/k permutation is needed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch

from gptlab.config import ConfigError, ModelConfig
from gptlab.errors import GptlabError

# HF GPT-2 modules stored as Conv1D (in, out); gptlab's nn.Linear wants (out, in).
_CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Non-parameter buffers old checkpoints carry: causal masks (GPT-2), RoPE frequencies (Llama).
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")
ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}
GPTLAB_TOKENIZER_FILE = "gptlab_tokenizer.json"  # gptlab's own tokenizer spec, for lossless round trips


class HFFormatError(GptlabError, ValueError):
    """A Hugging Face checkpoint or config that gptlab cannot read; the message says why and how to fix it."""


def _list(keys: list[str], n: int = 6) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


# --------------------------------------------------------------------------- configs


def hf_architecture(config: ModelConfig) -> str:
    """The HF ``model_type`` that represents ``config`` exactly: ``gpt2``, ``llama`` or ``qwen3``.

    Raises :class:`GptlabError` naming the switch that no HF architecture can hold.
    """
    c = config
    if c.pos_emb == "learned":
        problems = []
        if c.norm != "layernorm":
            problems.append(f"norm={c.norm!r} (GPT-2 has layernorm)")
        if c.mlp != "gelu":
            problems.append(f"mlp={c.mlp!r} (GPT-2 has gelu)")
        if c.qk_norm:
            problems.append("qk_norm=true")
        if c.kv_heads != c.n_head:
            problems.append(f"n_kv_head={c.n_kv_head} (GPT-2 has no grouped-query attention)")
        if not problems:
            return "gpt2"
        raise GptlabError("no Hugging Face architecture holds learned positions with "
                          + "; ".join(problems) + ": export needs plain GPT-2, or RoPE + RMSNorm + SwiGLU (Llama/Qwen3)")
    problems = []
    if c.norm != "rmsnorm":
        problems.append(f"norm={c.norm!r} (Llama/Qwen3 use rmsnorm)")
    if c.mlp != "swiglu":
        problems.append(f"mlp={c.mlp!r} (Llama/Qwen3 use swiglu)")
    if c.qk_norm and c.bias:
        problems.append("bias=true with qk_norm (Qwen3 has no MLP biases)")
    if problems:
        raise GptlabError("no Hugging Face architecture holds RoPE with " + "; ".join(problems)
                          + ": export needs RoPE + RMSNorm + SwiGLU (Llama, or Qwen3 with qk_norm)")
    return "qwen3" if c.qk_norm else "llama"


def config_to_hf(config: ModelConfig, *, bos_id: int | None = None, eos_id: int | None = None,
                 dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The ``config.json`` dict of the HF architecture holding ``config`` (vocab padding dropped)."""
    arch = hf_architecture(config)
    c = config
    dt = str(dtype).removeprefix("torch.")
    common: dict[str, Any] = {"architectures": [ARCHITECTURES[arch]], "model_type": arch, "vocab_size": c.vocab_size,
                              "bos_token_id": bos_id, "eos_token_id": eos_id, "torch_dtype": dt, "dtype": dt,
                              "use_cache": True}
    if arch == "gpt2":
        return {**common, "n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd, "n_positions": c.block_size,
                "n_ctx": c.block_size, "n_inner": None if c.hidden_dim == 4 * c.n_embd else c.hidden_dim,
                "activation_function": "gelu_new", "layer_norm_epsilon": c.norm_eps,
                "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout,
                "initializer_range": c.init_std, "scale_attn_weights": True,
                "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
                "tie_word_embeddings": c.tie_embeddings}
    out = {**common, "hidden_size": c.n_embd, "intermediate_size": c.hidden_dim, "num_hidden_layers": c.n_layer,
           "num_attention_heads": c.n_head, "num_key_value_heads": c.kv_heads, "head_dim": c.head_dim,
           "hidden_act": "silu", "max_position_embeddings": c.block_size, "rms_norm_eps": c.norm_eps,
           # rope_theta for transformers 4.x, rope_parameters for 5.x; both say the same thing.
           "rope_theta": c.rope_base, "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_base},
           "rope_scaling": None, "attention_bias": c.bias, "attention_dropout": c.dropout,
           "initializer_range": c.init_std, "tie_word_embeddings": c.tie_embeddings}
    if arch == "llama":
        out.update(mlp_bias=c.bias, pretraining_tp=1)
    else:
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=c.n_layer)
    return out


def _require(hf: Mapping[str, Any], key: str, ok: Any, where: str, hint: str) -> None:
    value = hf.get(key, ok[0] if isinstance(ok, tuple) else ok)
    allowed = ok if isinstance(ok, tuple) else (ok,)
    if value not in allowed:
        raise HFFormatError(f"{where}: {key}={value!r} is not supported ({hint})")


def config_from_hf(hf: Mapping[str, Any], where: str = "config.json") -> ModelConfig:
    """Map an HF ``config.json`` dict (gpt2, llama or qwen3) to a :class:`ModelConfig`.

    Settings that change the math and that gptlab does not implement are errors, not silently dropped.
    """
    model_type = hf.get("model_type")
    try:
        if model_type == "gpt2":
            act = hf.get("activation_function", "gelu_new")
            if act not in ("gelu_new", "gelu_pytorch_tanh"):
                raise HFFormatError(f"{where}: activation_function={act!r} is not supported "
                                    "(gptlab's GPT-2 MLP is the tanh GELU, 'gelu_new')")
            _require(hf, "scale_attn_weights", True, where, "attention must be scaled by 1/sqrt(head size)")
            _require(hf, "scale_attn_by_inverse_layer_idx", False, where, "per-layer attention scaling")
            _require(hf, "add_cross_attention", False, where, "cross-attention")
            n_embd = int(hf.get("n_embd", 768))
            n_inner = hf.get("n_inner")
            return ModelConfig(
                block_size=int(hf.get("n_positions", 1024)), vocab_size=int(hf.get("vocab_size", 50257)),
                n_layer=int(hf.get("n_layer", 12)), n_head=int(hf.get("n_head", 12)), n_embd=n_embd,
                norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
                mlp_hidden=0 if n_inner in (None, 4 * n_embd) else int(n_inner),
                tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
                # Inference defaults: HF GPT-2 configs say 0.1, which is a training choice, not the model.
                dropout=0.0,
            )
        if model_type in ("llama", "qwen3"):
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
            if model_type == "llama" and bool(hf.get("mlp_bias", False)) != bias:
                raise HFFormatError(f"{where}: attention_bias={bias} but mlp_bias={hf.get('mlp_bias')}: "
                                    "gptlab has one bias switch for both")
            if model_type == "qwen3":
                if bias:
                    raise HFFormatError(f"{where}: attention_bias=true is not supported for qwen3")
                _require(hf, "use_sliding_window", False, where, "sliding-window attention")
            _require(hf, "pretraining_tp", 1, where, "tensor-parallel slicing of the head")
            n_kv = int(hf.get("num_key_value_heads") or n_head)
            return ModelConfig(
                block_size=int(hf.get("max_position_embeddings", 2048)), vocab_size=int(hf["vocab_size"]),
                n_layer=int(hf["num_hidden_layers"]), n_head=n_head, n_embd=n_embd,
                n_kv_head=0 if n_kv == n_head else n_kv, pos_emb="rope", rope_base=theta, norm="rmsnorm",
                norm_eps=float(hf.get("rms_norm_eps", 1e-6)), mlp="swiglu",
                mlp_hidden=int(hf["intermediate_size"]), qk_norm=model_type == "qwen3", bias=bias,
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)), dropout=0.0,
            )
    except KeyError as e:
        raise HFFormatError(f"{where}: missing key {e.args[0]!r} for model_type {model_type!r}") from None
    except ConfigError as e:
        raise HFFormatError(f"{where}: {e}") from None
    raise HFFormatError(f"{where}: model_type={model_type!r} is not supported; gptlab reads gpt2, llama and qwen3")


# --------------------------------------------------------------------------- state dicts


def to_hf_state_dict(state: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """gptlab state dict -> HF names/layouts for :func:`hf_architecture` (padded vocab rows dropped).

    Tied heads are left out (HF re-ties them on load, and safetensors refuses shared storage).
    """
    arch = hf_architecture(config)
    V = config.vocab_size
    out: dict[str, torch.Tensor] = {}
    if arch == "gpt2":
        for k, v in state.items():
            if k == "lm_head.weight" and config.tie_embeddings:
                continue
            if k.endswith(_CONV1D_SUFFIXES):
                v = v.t()
            elif k in ("transformer.wte.weight", "lm_head.weight"):
                v = v[:V]
            out[k] = v.contiguous()
        if not config.bias:  # GPT-2 always has biases: zeros make it compute the bias-free function
            ref = state["transformer.wte.weight"]
            C, widths = config.n_embd, {"ln_1": config.n_embd, "ln_2": config.n_embd,
                                        "attn.c_attn": 3 * config.n_embd, "attn.c_proj": config.n_embd,
                                        "mlp.c_fc": config.hidden_dim, "mlp.c_proj": config.n_embd}
            for i in range(config.n_layer):
                for name, n in widths.items():
                    out[f"transformer.h.{i}.{name}.bias"] = ref.new_zeros(n)
            out["transformer.ln_f.bias"] = ref.new_zeros(C)
        return out
    hs, nh, nkv, hid = config.head_dim, config.n_head, config.kv_heads, config.hidden_dim
    out["model.embed_tokens.weight"] = state["transformer.wte.weight"][:V]
    out["model.norm.weight"] = state["transformer.ln_f.weight"]
    if not config.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"][:V]
    for i in range(config.n_layer):
        g, h = f"transformer.h.{i}.", f"model.layers.{i}."
        out[h + "input_layernorm.weight"] = state[g + "ln_1.weight"]
        out[h + "post_attention_layernorm.weight"] = state[g + "ln_2.weight"]
        if config.qk_norm:
            out[h + "self_attn.q_norm.weight"] = state[g + "attn.q_norm.weight"]
            out[h + "self_attn.k_norm.weight"] = state[g + "attn.k_norm.weight"]
        params = ["weight"] + (["bias"] if config.bias else [])
        for p in params:
            q, k, v = state[g + f"attn.c_attn.{p}"].split([nh * hs, nkv * hs, nkv * hs], dim=0)
            out[h + f"self_attn.q_proj.{p}"], out[h + f"self_attn.k_proj.{p}"] = q, k
            out[h + f"self_attn.v_proj.{p}"] = v
            out[h + f"self_attn.o_proj.{p}"] = state[g + f"attn.c_proj.{p}"]
            gate, up = state[g + f"mlp.c_fc.{p}"].split([hid, hid], dim=0)
            out[h + f"mlp.gate_proj.{p}"], out[h + f"mlp.up_proj.{p}"] = gate, up
            out[h + f"mlp.down_proj.{p}"] = state[g + f"mlp.c_proj.{p}"]
    return {k: v.contiguous() for k, v in out.items()}


def _expected_hf_shapes(config: ModelConfig) -> dict[str, torch.Size]:
    from gptlab.model import GPT

    with torch.device("meta"):
        model = GPT(config)
    return {k: v.shape for k, v in to_hf_state_dict(model.state_dict(), config).items()}


def _normalise_hf_keys(state: Mapping[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """Drop non-parameter buffers; give OpenAI's original GPT-2 files (``h.0...``) the ``transformer.`` prefix."""
    out = {}
    for k, v in state.items():
        if k.endswith(_IGNORED_SUFFIXES):
            continue
        if arch == "gpt2" and not k.startswith(("transformer.", "lm_head.")):
            k = "transformer." + k
        out[k] = v
    return out


def from_hf_state_dict(state: Mapping[str, torch.Tensor], config: ModelConfig, *,
                       where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """HF state dict (gpt2 / llama / qwen3, per :func:`hf_architecture` of ``config``) -> gptlab state dict.

    Missing or unexpected keys and shape mismatches raise :class:`HFFormatError` naming them. Rows of a
    padded vocabulary (``config.pad_vocab_multiple``) are filled with zeros; they are never sampled.
    """
    arch = hf_architecture(config)
    sd = _normalise_hf_keys(state, arch)
    expected = _expected_hf_shapes(config)
    if config.tie_embeddings:
        sd.pop("lm_head.weight", None)  # a tied head may or may not be saved; wte is the one we keep
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing:
        raise HFFormatError(f"{where}: missing {len(missing)} {arch} weight(s): {_list(missing)}")
    if unexpected:
        raise HFFormatError(f"{where}: unexpected {len(unexpected)} key(s) for a {config.n_layer}-layer {arch} "
                            f"model: {_list(unexpected)}")
    bad = [f"{k} {tuple(sd[k].shape)} (expected {tuple(s)})" for k, s in expected.items() if sd[k].shape != s]
    if bad:
        raise HFFormatError(f"{where}: shape mismatch for {_list(bad, 3)}; does config.json match the weights?")

    Vp = config.padded_vocab_size

    def pad(t: torch.Tensor) -> torch.Tensor:
        if t.size(0) == Vp:
            return t
        return torch.cat([t, t.new_zeros(Vp - t.size(0), *t.shape[1:])])

    out: dict[str, torch.Tensor] = {}
    if arch == "gpt2":
        for k, v in sd.items():
            if k.endswith(_CONV1D_SUFFIXES):
                v = v.t()
            elif k == "transformer.wte.weight":
                v = pad(v)
            out[k] = v.contiguous()
        if not config.bias:  # only zero biases can be dropped without changing the function
            nonzero = [k for k in list(out) if k.endswith(".bias") and bool(out.pop(k).any())]
            if nonzero:
                raise HFFormatError(f"{where}: non-zero biases ({_list(nonzero, 3)}) for a bias=false config")
        head = out.get("lm_head.weight")
        out["lm_head.weight"] = out["transformer.wte.weight"] if config.tie_embeddings else pad(head)
        return out
    out["transformer.wte.weight"] = pad(sd["model.embed_tokens.weight"])
    out["transformer.ln_f.weight"] = sd["model.norm.weight"]
    out["lm_head.weight"] = out["transformer.wte.weight"] if config.tie_embeddings else pad(sd["lm_head.weight"])
    for i in range(config.n_layer):
        g, h = f"transformer.h.{i}.", f"model.layers.{i}."
        out[g + "ln_1.weight"] = sd[h + "input_layernorm.weight"]
        out[g + "ln_2.weight"] = sd[h + "post_attention_layernorm.weight"]
        if config.qk_norm:
            out[g + "attn.q_norm.weight"] = sd[h + "self_attn.q_norm.weight"]
            out[g + "attn.k_norm.weight"] = sd[h + "self_attn.k_norm.weight"]
        for p in ["weight"] + (["bias"] if config.bias else []):
            out[g + f"attn.c_attn.{p}"] = torch.cat([sd[h + f"self_attn.{n}_proj.{p}"] for n in "qkv"])
            out[g + f"attn.c_proj.{p}"] = sd[h + f"self_attn.o_proj.{p}"]
            out[g + f"mlp.c_fc.{p}"] = torch.cat([sd[h + f"mlp.gate_proj.{p}"], sd[h + f"mlp.up_proj.{p}"]])
            out[g + f"mlp.c_proj.{p}"] = sd[h + f"mlp.down_proj.{p}"]
    return {k: v.contiguous() for k, v in out.items()}


def build_model(config: ModelConfig, state: Mapping[str, torch.Tensor], device: torch.device | str = "cpu",
                dtype: torch.dtype | None = None):
    """A :class:`gptlab.model.GPT` holding gptlab ``state`` without a wasted random init (meta device)."""
    from gptlab.model import GPT, rope_cos_sin

    with torch.device("meta"):
        model = GPT(config)
    tensors = {k: v.to(device=device, dtype=dtype or v.dtype) for k, v in state.items()}
    if config.tie_embeddings:
        tensors.pop("lm_head.weight", None)
        model.load_state_dict(tensors, assign=True, strict=False)
        missing = set(model.state_dict()) - set(tensors) - {"lm_head.weight"}
        model.lm_head.weight = model.transformer.wte.weight  # assign=True replaced wte's Parameter: re-tie
    else:
        model.load_state_dict(tensors, assign=True, strict=False)
        missing = set(model.state_dict()) - set(tensors)
    if missing:
        raise HFFormatError(f"weights missing for {_list(sorted(missing))}")
    if config.pos_emb == "rope":  # non-persistent buffers are still on meta: rebuild them
        cos, sin = rope_cos_sin(config.block_size, config.head_dim, config.rope_base)
        model.rope_cos, model.rope_sin = cos.to(device), sin.to(device)
    return model.eval()


# --------------------------------------------------------------------------- files and the Hub


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
    from safetensors.torch import load_file

    d = Path(path)
    dev = str(device)
    if (d / "model.safetensors").is_file():
        return load_file(d / "model.safetensors", device=dev)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        out: dict[str, torch.Tensor] = {}
        for f in files:
            out.update(load_file(d / f, device=dev))
        return out
    if (d / "pytorch_model.bin").is_file():
        try:
            # weights_only: a .bin is a pickle; never run code from someone else's file.
            return torch.load(d / "pytorch_model.bin", map_location=dev, weights_only=True)
        except Exception as e:
            raise HFFormatError(f"{d / 'pytorch_model.bin'}: cannot be loaded safely ({type(e).__name__}); "
                                "convert it to model.safetensors") from None
    raise HFFormatError(f"{d}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin found")


def load_hf_dir(path: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
    """(GPT, ModelConfig) from a local HF model directory (gpt2, llama or qwen3)."""
    d = Path(path)
    config = config_from_hf(read_hf_config(d), where=str(d / "config.json"))
    state = from_hf_state_dict(read_hf_weights(d), config, where=str(d))
    return build_model(config, state, device, dtype), config


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


# --------------------------------------------------------------------------- export


def _char_tokenizer_files(tok, out: Path, block_size: int) -> None:
    """A ``tokenizers`` WordLevel tokenizer that splits text into characters: HF reads it as-is."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(tok.chars)}
    # No [UNK] in the vocabulary: an unknown character must fail loudly, as in gptlab.
    hft = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
    hft.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    hft.decoder = decoders.Fuse()  # join characters without the default spaces
    hft.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": block_size,
         "clean_up_tokenization_spaces": False}, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text("{}\n")


def _gpt2_tokenizer_files(out: Path, block_size: int) -> None:
    from gptlab.tokenizer import EOT_TEXT, gpt2_encoding, gpt2_vocab_files

    gpt2_encoding()  # verifies the files' SHA-256 before we copy them
    vocab_bpe, encoder_json = gpt2_vocab_files()
    # HF's vocab.json / merges.txt are OpenAI's encoder.json / vocab.bpe, byte for byte.
    shutil.copyfile(encoder_json, out / "vocab.json")
    shutil.copyfile(vocab_bpe, out / "merges.txt")
    special = {"bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT}
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "model_max_length": block_size, "add_prefix_space": False,
         "clean_up_tokenization_spaces": False, **special}, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def export_hf(model, tokenizer, out_dir: str | os.PathLike, *, overwrite: bool = False) -> dict[str, Any]:
    """Write ``model`` (and ``tokenizer``) as an HF directory that ``AutoModelForCausalLM`` /
    ``AutoTokenizer.from_pretrained`` load offline; returns a summary dict.

    GPT-2 archs -> GPT2LMHeadModel; RoPE+RMSNorm+SwiGLU -> LlamaForCausalLM (Qwen3ForCausalLM with
    qk_norm). GPT-2 BPE writes vocab.json/merges.txt; a char tokenizer writes a character-level
    ``tokenizer.json``. Either way ``gptlab_tokenizer.json`` keeps gptlab's own spec. The directory is
    built beside ``out_dir`` and renamed into place when complete.
    """
    from safetensors.torch import save_file

    from gptlab.tokenizer import GPT2Tokenizer, save_tokenizer

    config: ModelConfig = model.config
    arch = hf_architecture(config)  # refuse before writing anything
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise GptlabError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise GptlabError(f"--out {out}: directory exists and is not empty; pass --overwrite to replace it")
    if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
        raise GptlabError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only {config.vocab_size}")
    is_gpt2_bpe = isinstance(tokenizer, GPT2Tokenizer)
    eot = tokenizer.eot_id if tokenizer is not None else None

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        hf_state = to_hf_state_dict(state, config)
        dtype = next(iter(hf_state.values())).dtype
        hf_config = config_to_hf(config, bos_id=eot, eos_id=eot, dtype=dtype)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        gen = {"bos_token_id": eot, "eos_token_id": eot} if eot is not None else {}
        (tmp / "generation_config.json").write_text(json.dumps({"_from_model_config": True, **gen}, indent=2) + "\n")
        save_file(hf_state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            if is_gpt2_bpe:
                _gpt2_tokenizer_files(tmp, config.block_size)
            elif getattr(tokenizer, "name", None) == "char":
                _char_tokenizer_files(tokenizer, tmp, config.block_size)
            save_tokenizer(tokenizer, tmp / GPTLAB_TOKENIZER_FILE)
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": str(out), "architecture": ARCHITECTURES[arch], "model_type": arch,
            "params": sum(t.numel() for t in hf_state.values()),
            "tokenizer": tokenizer.spec()["type"] if tokenizer is not None else None,
            "files": sorted(p.name for p in out.iterdir())}


def to_hf_model(model):
    """An in-memory ``transformers`` model with ``model``'s weights (for comparisons and benchmarks)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config: ModelConfig = model.config
    hf_cfg = dict(config_to_hf(config))
    model_type = hf_cfg.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **hf_cfg)
    hf = AutoModelForCausalLM.from_config(cfg)
    state = to_hf_state_dict({k: v.detach() for k, v in model.state_dict().items()}, config)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" and not k.endswith(_IGNORED_SUFFIXES)]
    if missing or unexpected:  # pragma: no cover - a bug in the mapping
        raise HFFormatError(f"transformers model disagrees: missing {missing[:4]}, unexpected {unexpected[:4]}")
    if config.tie_embeddings:
        hf.tie_weights()
    p = next(model.parameters())
    return hf.to(device=p.device, dtype=p.dtype).eval()


def from_hf_model(hf_model, device: torch.device | str | None = None):
    """A gptlab GPT with the weights of an in-memory ``transformers`` gpt2/llama/qwen3 model."""
    config = config_from_hf(hf_model.config.to_dict(), where=type(hf_model).__name__)
    state = from_hf_state_dict(hf_model.state_dict(), config, where=type(hf_model).__name__)
    p = next(hf_model.parameters())
    return build_model(config, state, device or p.device, p.dtype)
