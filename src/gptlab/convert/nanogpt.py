"""nanoGPT and build-nanogpt checkpoints in.

Both projects name parameters as Hugging Face GPT-2 does and store projections as ``nn.Linear``
(out, in), exactly as gptlab, so the state dict maps one to one; only the configs differ:

- nanoGPT's ``ckpt.pt`` is a dict with ``model`` (state dict, sometimes with torch.compile's
  ``_orig_mod.`` prefix), ``model_args`` (n_layer, n_head, n_embd, block_size, bias, vocab_size,
  dropout), ``iter_num``, ``best_val_loss``, ``config`` and ``optimizer``. Its MLP uses the exact
  (erf) GELU. A character-level run has ``meta.pkl`` (``vocab_size``, ``stoi``, ``itos``) in its
  dataset dir ``data/<config['dataset']>/``.
- build-nanogpt's ``log/model_NNNNN.pt`` is a dict with ``model``, ``config`` (a ``GPTConfig``
  dataclass object: block_size, vocab_size, n_layer, n_head, n_embd), ``step`` and ``val_loss``;
  its GELU is the tanh form and it always has biases.

Both train GPT-2 BPE models with the vocabulary padded to 50,304 rows; that is read as a 50,257-token
model whose embedding has 50,304 rows (``pad_vocab_multiple=64``), so the tokenizer is GPT-2's and
padded ids are never sampled. Those projects' losses include the padded columns in the softmax;
gptlab's exclude them (see README), so their logits agree exactly and their losses differ slightly.
Files are read with :func:`gptlab.convert.safe_pickle.load_torch_file`: no code in them runs.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from gptlab.config import ConfigError, ModelConfig
from gptlab.convert.safe_pickle import ConfigRecord, load_plain_pickle, load_torch_file
from gptlab.errors import GptlabError

GPT2_VOCAB, GPT2_PADDED = 50257, 50304
_STEP_FILE = re.compile(r"^model_(\d+)\.pt$")


class ForeignCheckpointError(GptlabError):
    """A nanoGPT / build-nanogpt file gptlab cannot map; the message names the file and the key."""


def find_checkpoint(d: Path) -> Path | None:
    """nanoGPT's ``ckpt.pt`` in a run dir, or build-nanogpt's newest ``model_NNNNN.pt`` in a log dir."""
    if (d / "ckpt.pt").is_file():
        return d / "ckpt.pt"
    steps = [(int(m.group(1)), p) for p in d.glob("model_*.pt") if (m := _STEP_FILE.match(p.name))]
    return max(steps)[1] if steps else None


def _state(raw: Any, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise ForeignCheckpointError(f"{path}: 'model' is not a state dict of tensors")
    out = {}
    for k, v in raw.items():
        k = k.removeprefix("_orig_mod.")  # saved from a torch.compile'd module
        if k.endswith(".attn.bias") and v.dim() == 4:  # the causal-mask buffer of old torch versions
            continue
        out[k] = v
    if out.get("lm_head.weight") is not None and "transformer.wte.weight" in out:
        if not torch.equal(out["lm_head.weight"], out["transformer.wte.weight"]):
            raise ForeignCheckpointError(f"{path}: lm_head.weight differs from transformer.wte.weight, but "
                                         f"nanoGPT models tie them; the file is not a nanoGPT GPT")
        out.pop("lm_head.weight")
    return out


def _vocab(stored: int, tokenizer: Any | None) -> tuple[int, int, Any | None]:
    """(vocab_size, pad_vocab_multiple, tokenizer) for a stored embedding of ``stored`` rows."""
    from gptlab.tokenizer import GPT2Tokenizer

    if tokenizer is not None:
        n = tokenizer.vocab_size
        return n, (stored if stored > n else 1), tokenizer
    if stored == GPT2_PADDED:
        return GPT2_VOCAB, 64, GPT2Tokenizer()
    if stored == GPT2_VOCAB:
        return GPT2_VOCAB, 1, GPT2Tokenizer()
    return stored, 1, None


def _meta_pkl(ckpt: Path, dataset: str | None) -> Path | None:
    """nanoGPT's sample.py reads ``data/<dataset>/meta.pkl`` from the working dir; a run dir beside
    ``data/`` (nanoGPT's own layout) or a copy next to the checkpoint are found too."""
    cands = [ckpt.parent / "meta.pkl"]
    if dataset and "/" not in dataset and ".." not in dataset:
        cands += [Path.cwd() / "data" / dataset / "meta.pkl", ckpt.parent.parent / "data" / dataset / "meta.pkl"]
    return next((p for p in cands if p.is_file()), None)


def char_tokenizer_from_meta(path: Path):
    """The character vocabulary of a nanoGPT ``meta.pkl`` as a gptlab CharTokenizer (ids kept)."""
    from gptlab.tokenizer import CharTokenizer

    meta = load_plain_pickle(path)
    try:
        itos, n = meta["itos"], int(meta["vocab_size"])
        chars = [itos[i] for i in range(n)]
        return CharTokenizer(chars)
    except (KeyError, TypeError, ValueError, GptlabError) as e:
        raise ForeignCheckpointError(f"{path}: not a nanoGPT character vocabulary ({type(e).__name__}: {e}); "
                                     f"expected vocab_size and itos for ids 0..vocab_size-1") from None


def read_checkpoint(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor], Any | None, dict[str, Any]]:
    """(config, gptlab state dict, tokenizer or None, info) of a nanoGPT or build-nanogpt checkpoint file."""
    p = Path(path)
    ck = load_torch_file(p)
    if not isinstance(ck, dict) or "model" not in ck:
        raise ForeignCheckpointError(f"{p}: a PyTorch file without a 'model' state dict: not a nanoGPT / "
                                     f"build-nanogpt checkpoint")
    state = _state(ck["model"], p)
    stored_vocab = int(state["transformer.wte.weight"].shape[0]) if "transformer.wte.weight" in state else 0
    try:
        if "model_args" in ck:  # nanoGPT
            args = ck["model_args"]
            run_cfg = ck.get("config") if isinstance(ck.get("config"), dict) else {}
            meta = _meta_pkl(p, run_cfg.get("dataset"))
            tok = char_tokenizer_from_meta(meta) if meta else None
            vocab, pad, tok = _vocab(int(args["vocab_size"]), tok)
            config = ModelConfig(block_size=int(args["block_size"]), vocab_size=vocab, pad_vocab_multiple=pad,
                                 n_layer=int(args["n_layer"]), n_head=int(args["n_head"]), n_embd=int(args["n_embd"]),
                                 bias=bool(args.get("bias", True)), gelu="erf", dropout=0.0)
            info = {"format": "nanogpt", "iter_num": ck.get("iter_num"), "meta_pkl": str(meta) if meta else None}
            best = ck.get("best_val_loss")
            info["best_val_loss"] = float(best) if best is not None else None
        elif isinstance(ck.get("config"), ConfigRecord):  # build-nanogpt
            f = ck["config"].fields()
            vocab, pad, tok = _vocab(int(f.get("vocab_size", stored_vocab)), None)
            config = ModelConfig(block_size=int(f["block_size"]), vocab_size=vocab, pad_vocab_multiple=pad,
                                 n_layer=int(f["n_layer"]), n_head=int(f["n_head"]), n_embd=int(f["n_embd"]),
                                 bias=True, gelu="tanh", dropout=0.0)
            info = {"format": "build-nanogpt", "step": ck.get("step"), "val_loss": ck.get("val_loss")}
        else:
            raise ForeignCheckpointError(f"{p}: has 'model' but neither nanoGPT's 'model_args' nor build-nanogpt's "
                                         f"'config' object; cannot tell the architecture")
    except KeyError as e:
        raise ForeignCheckpointError(f"{p}: config has no {e.args[0]!r}") from None
    except ConfigError as e:
        raise ForeignCheckpointError(f"{p}: {e}") from None
    if config.padded_vocab_size != stored_vocab:
        raise ForeignCheckpointError(f"{p}: transformer.wte.weight has {stored_vocab} rows but the config says "
                                     f"{config.padded_vocab_size} tokens")
    return config, state, tok, info
