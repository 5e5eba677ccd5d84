"""Hugging Face export, and in-memory conversion to ``transformers`` models.

The mappings live in :mod:`gptlab.convert` (one adapter per family: GPT-2, Llama, Qwen3); reading HF
directories, the Hub and in-memory ``transformers`` models is :mod:`gptlab.loading`'s job. An export is
refused unless the model's config survives the trip to the family's ``config.json`` and back unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from gptlab import fsio
from gptlab.config import ModelConfig
from gptlab.convert.hf_base import (  # noqa: F401 - the public mapping API, re-exported
    GPTLAB_TOKENIZER_FILE, HFFormatError, adapter_for_config, config_from_hf, config_to_hf, from_hf_state_dict, hf_architecture,
    read_hf_weights, to_hf_state_dict,
)
from gptlab.errors import GptlabError

ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}


# --------------------------------------------------------------------------- export


def _chat_tokenizer_config(tok) -> dict[str, Any]:
    """For a tokenizer with the chat template's turn tokens: those tokens as HF added tokens (special:
    never split, skipped by ``skip_special_tokens``) and the template as Jinja, so transformers'
    ``apply_chat_template`` gives gptlab's ids. Empty for other tokenizers."""
    from gptlab.chat import ChatTemplate, has_chat_tokens
    from gptlab.tokenizer import special_tokens

    if not has_chat_tokens(tok):
        return {}
    added = {str(i): {"content": name, "lstrip": False, "rstrip": False, "normalized": False,
                      "single_word": False, "special": True}
             for name, i in sorted(special_tokens(tok).items(), key=lambda kv: kv[1])}
    return {"added_tokens_decoder": added, "chat_template": ChatTemplate.for_tokenizer(tok).jinja()}


def _char_tokenizer_files(tok, out: Path, block_size: int) -> None:
    """A ``tokenizers`` WordLevel tokenizer that splits text into characters: HF reads it as-is."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    from gptlab.tokenizer import special_tokens

    vocab = {c: i for i, c in enumerate(tok.chars)}
    # No [UNK] in the vocabulary: an unknown character must fail loudly, as in gptlab.
    hft = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
    hft.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    hft.decoder = decoders.Fuse()  # join characters without the default spaces
    # Chat turn tokens follow the characters, in id order (they take the next free ids).
    hft.add_special_tokens([AddedToken(name, special=True, normalized=False)
                            for name, _ in sorted(special_tokens(tok).items(), key=lambda kv: kv[1])])
    hft.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": block_size,
         "clean_up_tokenization_spaces": False, **_chat_tokenizer_config(tok)}, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text("{}\n")


def _gpt2_tokenizer_files(out: Path, block_size: int, tok=None) -> None:
    from gptlab.tokenizer import EOT_TEXT, gpt2_encoding, gpt2_vocab_files

    gpt2_encoding()  # verifies the files' SHA-256 before we copy them
    vocab_bpe, encoder_json = gpt2_vocab_files()
    # HF's vocab.json / merges.txt are OpenAI's encoder.json / vocab.bpe, byte for byte.
    shutil.copyfile(encoder_json, out / "vocab.json")
    shutil.copyfile(vocab_bpe, out / "merges.txt")
    special = {"bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT}
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "model_max_length": block_size, "add_prefix_space": False,
         "clean_up_tokenization_spaces": False, **special, **_chat_tokenizer_config(tok)}, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def export_hf(model, tokenizer, out_dir: str | os.PathLike, *, overwrite: bool = False) -> dict[str, Any]:
    """Write ``model`` (and ``tokenizer``) as an HF directory that ``AutoModelForCausalLM`` /
    ``AutoTokenizer.from_pretrained`` load offline; returns a summary dict.

    GPT-2 archs -> GPT2LMHeadModel; RoPE+RMSNorm+SwiGLU -> LlamaForCausalLM (Qwen3ForCausalLM with
    qk_norm). GPT-2 BPE writes vocab.json/merges.txt; a char tokenizer writes a character-level
    ``tokenizer.json``. Either way ``gptlab_tokenizer.json`` keeps gptlab's own spec. The directory is
    built beside ``out_dir`` under its lock and swapped in whole when complete (:func:`gptlab.fsio.replace_dir`:
    a kill leaves the old or the new export, never neither); files in ``out_dir`` that no export writes stay.
    """
    config: ModelConfig = model.config
    arch = hf_architecture(config)  # refuse before writing anything
    if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
        raise GptlabError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only {config.vocab_size}")
    out = fsio.guard_out_dir(out_dir, "--out", is_export_dir, "export")
    with fsio.DirLock(out, "export directory"):
        fsio.recover_swap(out)
        fsio.remove_leftovers(out)
        if out.is_dir() and any(out.iterdir()) and not overwrite:
            raise GptlabError(f"--out {out}: directory exists and is not empty; pass --overwrite to replace it")
        tmp = fsio.temp_name(out)
        tmp.mkdir(parents=True)
        try:
            hf_state = _write_export(model, tokenizer, config, tmp)
            own = set(EXPORT_FILES) | set(_export_marker(out).get("files", []))
            fsio.replace_dir(tmp, out, lambda name: name in own)
        finally:
            if tmp.exists():  # a failed export leaves --out as it was and nothing beside it
                fsio.remove_dir(tmp)
    return {"out": str(out), "architecture": ARCHITECTURES[arch], "model_type": arch,
            "params": sum(t.numel() for t in hf_state.values()),
            "tokenizer": tokenizer.spec()["type"] if tokenizer is not None else None,
            "files": sorted(p.name for p in out.iterdir())}


# Every file an export may write; exports also list theirs in EXPORT_MARKER.
EXPORT_MARKER = "gptlab_export.json"
EXPORT_FILES = ("config.json", "generation_config.json", "model.safetensors", "vocab.json", "merges.txt",
                "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", GPTLAB_TOKENIZER_FILE,
                "tokenizer.tiktoken", EXPORT_MARKER)


def _export_marker(d: Path) -> dict[str, Any]:
    try:
        m = json.loads((d / EXPORT_MARKER).read_text(encoding="utf-8"))
        return m if isinstance(m, dict) else {}
    except (OSError, ValueError):
        return {}


def is_export_dir(d: Path) -> bool:
    """A directory ``export`` may replace: one it wrote (its marker, or only files an export writes)."""
    return bool(_export_marker(d)) or all(p.name in EXPORT_FILES for p in d.iterdir())


def _write_export(model, tokenizer, config: ModelConfig, tmp: Path) -> dict[str, torch.Tensor]:
    """Write every file of an export into ``tmp``; return the HF state dict written."""
    from safetensors.torch import save as st_save

    from gptlab.tokenizer import GPT2Tokenizer, fingerprint, save_tokenizer

    eot = tokenizer.eot_id if tokenizer is not None else None
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    hf_state = to_hf_state_dict(state, config)
    dtype = next(iter(hf_state.values())).dtype
    hf_config = config_to_hf(config, bos_id=eot, eos_id=eot, dtype=dtype)
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    gen = {"bos_token_id": eot, "eos_token_id": eot} if eot is not None else {}
    (tmp / "generation_config.json").write_text(json.dumps({"_from_model_config": True, **gen}, indent=2) + "\n")
    # Through fsio: a full disk is one line naming the file and the space needed.
    fsio.write_file(tmp / "model.safetensors", st_save(hf_state, metadata={"format": "pt"}))
    if tokenizer is not None:
        if isinstance(tokenizer, GPT2Tokenizer):
            _gpt2_tokenizer_files(tmp, config.block_size, tokenizer)
        elif getattr(tokenizer, "name", None) == "char":
            _char_tokenizer_files(tokenizer, tmp, config.block_size)
        elif getattr(tokenizer, "name", None) == "bpe":
            from gptlab.tokenizer import write_hf_tokenizer

            write_hf_tokenizer(tokenizer, tmp, model_max_length=config.block_size)
            chat = _chat_tokenizer_config(tokenizer)
            if chat:  # its turn tokens are already added tokens of tokenizer.json: only the template is new
                cfg_path = tmp / "tokenizer_config.json"
                cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
                cfg_path.write_text(json.dumps({**cfg, "chat_template": chat["chat_template"]}, indent=2) + "\n",
                                    encoding="utf-8")
        save_tokenizer(tokenizer, tmp / GPTLAB_TOKENIZER_FILE)
    marker = {"format": "gptlab-export", "files": sorted(p.name for p in tmp.iterdir()) + [EXPORT_MARKER],
              "tokenizer_fingerprint": fingerprint(tokenizer) if tokenizer is not None else None}
    (tmp / EXPORT_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    for p in tmp.iterdir():
        fsio.fsync_file(p)
    return hf_state


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
    adapter = adapter_for_config(config)
    missing = [k for k in missing if k != "lm_head.weight" and not k.endswith(adapter.ignored_suffixes)]
    if missing or unexpected:  # pragma: no cover - a bug in the mapping
        raise HFFormatError(f"transformers model disagrees: missing {missing[:4]}, unexpected {unexpected[:4]}")
    if config.tie_embeddings:
        hf.tie_weights()
    p = next(model.parameters())
    return hf.to(device=p.device, dtype=p.dtype).eval()
