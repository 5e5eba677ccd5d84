"""One entry point for every model source a user can type after ``--init``.

Accepted forms, tried in this order:

1. a gptlab run dir (has ``checkpoints/``) or checkpoint dir (has ``meta.json``) -> the newest
   complete checkpoint, through :func:`gptlab.checkpoint.load_model_from_checkpoint`;
2. a Hugging Face model dir (``config.json`` with ``model_type`` gpt2, llama or qwen3), including
   the dirs ``gptlab export`` writes;
3. a Hub name: ``gpt2``, ``gpt2-medium``, ``gpt2-large``, ``gpt2-xl`` (or an ``owner/name`` repo id),
   downloaded once into the huggingface_hub cache.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

from gptlab.errors import GptlabError

ACCEPTED = ("a Hub name (gpt2, gpt2-medium, gpt2-large, gpt2-xl), a Hugging Face model directory "
            "(config.json + model.safetensors), or a gptlab run / checkpoint directory")


def _hf_tokenizer(d: Path, vocab_size: int):
    """The tokenizer of an HF dir: gptlab's own spec when exported by gptlab, GPT-2 BPE when its vocab is GPT-2's."""
    from gptlab.hf import GPTLAB_TOKENIZER_FILE
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
                  stacklevel=3)
    return None


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


def load_model(src: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
    """(GPT in eval mode, Tokenizer or None) from ``src`` (see the module docstring for the accepted forms).

    ``dtype`` casts the weights (e.g. ``torch.bfloat16`` for inference); None keeps the stored dtype.
    """
    from gptlab import hf

    device = torch.device(device)
    s = str(src)
    p = Path(s).expanduser()
    if p.is_dir():
        if _is_gptlab_run(p):
            from gptlab.checkpoint import load_model_from_checkpoint

            model, tokenizer, _meta = load_model_from_checkpoint(p, device=device)
            if dtype is not None:
                model = model.to(dtype)
            return model.eval(), tokenizer
        if (p / "config.json").is_file():
            model, config = hf.load_hf_dir(p, device, dtype)
            return model, _hf_tokenizer(p, config.vocab_size)
        raise GptlabError(f"--init {s}: directory has neither config.json (Hugging Face) nor checkpoints/ or "
                          f"meta.json (gptlab); expected {ACCEPTED}")
    if p.exists():
        raise GptlabError(f"--init {s}: is a file; pass its directory instead ({ACCEPTED})")
    if s in hf.HUB_REPOS or (s.count("/") == 1 and not s.startswith((".", "/", "~"))):
        d = hf.hub_download(s)
        model, config = hf.load_hf_dir(d, device, dtype)
        return model, _hf_tokenizer(d, config.vocab_size)
    raise GptlabError(f"--init {s}: not found; expected {ACCEPTED}")
