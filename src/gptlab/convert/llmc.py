"""llm.c's GPT-2 model file (``gpt2_124M.bin``, ``gpt2_124M_bf16.bin``, the checkpoints its trainer writes).

Layout (llm.c ``train_gpt2.py`` ``write_model``): a header of 256 little-endian int32 -- ``[0]``
magic 20240326, ``[1]`` version (3: fp32 tensors, 5: bf16 tensors), ``[2]`` max sequence length,
``[3]`` vocab size, ``[4]`` layers, ``[5]`` heads, ``[6]`` channels, ``[7]`` padded vocab size --
then the tensors back to back, each layer's tensor of a kind stacked over layers: wte (Vp, C),
wpe (T, C), ln_1 w/b, c_attn w (3C, C) / b, attn c_proj w/b, ln_2 w/b, c_fc w (4C, C) / b,
mlp c_proj w (C, 4C) / b, ln_f w/b. Matrices are ``nn.Linear`` (out, in) as in gptlab. The model is
GPT-2: tanh GELU, biases, tied head, LayerNorm eps 1e-5; the padded vocab rows are zeros and llm.c's
softmax covers the real vocabulary only, as gptlab's does.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptlab.config import ConfigError, ModelConfig
from gptlab.convert import round_trip_problems
from gptlab.errors import GptlabError

MAGIC = 20240326
VERSIONS = {3: torch.float32, 5: torch.bfloat16}
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
# Other llm.c files a user may pass by mistake: say what they are.
_OTHER_MAGICS = {20240327: "an llm.c debug state (gpt2_124M_debug_state.bin), not a model",
                 20240328: "an llm.c tokenizer file, not a model",
                 20240520: "a token shard (data), not a model; pass it to --data",
                 20240801: "a token shard (data), not a model; pass it to --data"}


class LlmcFormatError(GptlabError, ValueError):
    """An llm.c model file that is not what its header says, or a model llm.c cannot hold."""


def _layout(c: ModelConfig, Vp: int) -> list[tuple[str, tuple[int, ...]]]:
    """(gptlab name with {i} for the layer, per-layer shape) in file order."""
    C, T = c.n_embd, c.block_size
    per_layer = [("ln_1.weight", (C,)), ("ln_1.bias", (C,)), ("attn.c_attn.weight", (3 * C, C)),
                 ("attn.c_attn.bias", (3 * C,)), ("attn.c_proj.weight", (C, C)), ("attn.c_proj.bias", (C,)),
                 ("ln_2.weight", (C,)), ("ln_2.bias", (C,)), ("mlp.c_fc.weight", (4 * C, C)),
                 ("mlp.c_fc.bias", (4 * C,)), ("mlp.c_proj.weight", (C, 4 * C)), ("mlp.c_proj.bias", (C,))]
    return ([("transformer.wte.weight", (Vp, C)), ("transformer.wpe.weight", (T, C))]
            + [("transformer.h.{i}." + n, s) for n, s in per_layer]
            + [("transformer.ln_f.weight", (C,)), ("transformer.ln_f.bias", (C,))])


def _pad_multiple(vocab: int, padded: int) -> int:
    for m in (1, 64, 128):
        if -(-vocab // m) * m == padded:
            return m
    return padded  # round_up(vocab, padded) == padded for any padded >= vocab


def config_from_header(header: np.ndarray, where: str = "llm.c file") -> ModelConfig:
    T, V, L, H, C, Vp = (int(x) for x in header[2:8])
    if Vp < V:
        raise LlmcFormatError(f"{where}: padded vocab size {Vp} is smaller than the vocab size {V}")
    try:
        return ModelConfig(block_size=T, vocab_size=V, pad_vocab_multiple=_pad_multiple(V, Vp), n_layer=L,
                           n_head=H, n_embd=C, gelu="tanh", bias=True, tie_embeddings=True, norm_eps=1e-5,
                           dropout=0.0)
    except ConfigError as e:
        raise LlmcFormatError(f"{where}: header describes no valid GPT-2 ({e})") from None


def header_for(config: ModelConfig, version: int, padded_vocab: int) -> np.ndarray:
    h = np.zeros(HEADER_INTS, dtype="<i4")
    h[:8] = [MAGIC, version, config.block_size, config.vocab_size, config.n_layer, config.n_head, config.n_embd,
             padded_vocab]
    return h


def llmc_padded_vocab(config: ModelConfig) -> int:
    """llm.c pads the vocabulary to a multiple of 128 (50,257 -> 50,304); a model padded that way keeps its rows."""
    return -(-config.vocab_size // 128) * 128


def check_exportable(config: ModelConfig) -> None:
    """Refuse a model llm.c cannot hold: its config must survive the trip to the header and back
    (a bias-free model is written with zero biases, which computes the same function)."""
    back = config_from_header(header_for(config, 3, llmc_padded_vocab(config)), "llm.c header")
    changed = round_trip_problems(replace(config, bias=True), back)
    if changed:
        raise LlmcFormatError("llm.c's GPT-2 cannot hold this model: it would change " + ", ".join(changed)
                              + " (llm.c has learned positions, LayerNorm eps 1e-5, tanh GELU with a 4x MLP, "
                              "biases and a tied head); export refused")


def is_llmc_model(path: str | os.PathLike) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return len(head) == 4 and int.from_bytes(head, "little") == MAGIC


def read_model(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """(config, gptlab state dict, info) of an llm.c model file (version 3 fp32 or 5 bf16)."""
    p = Path(path)
    size = p.stat().st_size
    with open(p, "rb") as f:
        header = np.frombuffer(f.read(HEADER_BYTES), dtype="<i4")
    if header.size < HEADER_INTS:
        raise LlmcFormatError(f"{p}: truncated: smaller than the {HEADER_BYTES}-byte header")
    magic, version = int(header[0]), int(header[1])
    if magic != MAGIC:
        raise LlmcFormatError(f"{p}: magic {magic} is {_OTHER_MAGICS.get(magic, 'not an llm.c model file')} "
                              f"(llm.c models start with {MAGIC})")
    if version not in VERSIONS:
        raise LlmcFormatError(f"{p}: llm.c model version {version} is not supported (3: fp32, 5: bf16, both with a "
                              f"padded vocab; re-export it with llm.c's train_gpt2.py)")
    config = config_from_header(header, str(p))
    dtype, Vp = VERSIONS[version], int(header[7])
    layout = _layout(config, Vp)
    counts = [int(np.prod(s)) * (config.n_layer if "{i}" in n else 1) for n, s in layout]
    item = 4 if dtype == torch.float32 else 2
    want = HEADER_BYTES + sum(counts) * item
    if size != want:
        raise LlmcFormatError(f"{p}: {size} bytes but the header describes {want} (a {config.n_layer}-layer, "
                              f"{config.n_embd}-wide model in {'fp32' if item == 4 else 'bf16'}): truncated or not "
                              f"this model")
    raw = np.fromfile(p, dtype="<f4" if item == 4 else "<i2", offset=HEADER_BYTES)
    flat = torch.from_numpy(raw.copy())
    if item == 2:
        flat = flat.view(torch.bfloat16)
    state: dict[str, torch.Tensor] = {}
    off = 0
    for (name, shape), n in zip(layout, counts):
        chunk = flat[off:off + n]
        off += n
        if "{i}" in name:
            for i, t in enumerate(chunk.view(config.n_layer, *shape).unbind(0)):
                state[name.format(i=i)] = t.clone()
        else:
            state[name] = chunk.view(*shape).clone()
    return config, state, {"format": "llmc", "version": version, "padded_vocab_size": Vp}


def write_model(model: torch.nn.Module, path: str | os.PathLike, *, dtype: str = "float32",
                overwrite: bool = False) -> dict[str, Any]:
    """Write ``model`` as an llm.c model file (version 3 for float32, 5 for bfloat16), atomically."""
    config: ModelConfig = model.config
    check_exportable(config)
    version = {"float32": 3, "bfloat16": 5}.get(dtype)
    if version is None:
        raise LlmcFormatError(f"--dtype {dtype}: llm.c model files are float32 (version 3) or bfloat16 (version 5)")
    out = Path(path)
    if out.is_dir():
        raise LlmcFormatError(f"--out {out}: is a directory; llm.c's model is one file (e.g. {out}/gpt2_124M.bin)")
    if out.exists() and not overwrite:
        raise LlmcFormatError(f"--out {out}: exists; pass --overwrite to replace it")
    state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    V, Vp, C = config.vocab_size, llmc_padded_vocab(config), config.n_embd
    wte = state["transformer.wte.weight"]
    if wte.size(0) != Vp:  # llm.c's padding is zero rows; keep the model's own rows when it is padded the same way
        wte = torch.cat([wte[:V], wte.new_zeros(Vp - V, C)])
    state["transformer.wte.weight"] = wte
    for i in range(config.n_layer):  # bias-free models: zero biases compute the same function
        for name, n in (("ln_1", C), ("ln_2", C), ("attn.c_attn", 3 * C), ("attn.c_proj", C), ("mlp.c_fc", 4 * C),
                        ("mlp.c_proj", C)):
            state.setdefault(f"transformer.h.{i}.{name}.bias", wte.new_zeros(n))
    state.setdefault("transformer.ln_f.bias", wte.new_zeros(C))
    tdt = VERSIONS[version]
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    n_params = 0
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header_for(config, version, Vp).tobytes())
            for name, _shape in _layout(config, Vp):
                names = [name.format(i=i) for i in range(config.n_layer)] if "{i}" in name else [name]
                for k in names:
                    t = state[k].to(tdt).contiguous()
                    n_params += t.numel()
                    arr = t.view(torch.int16).numpy() if tdt == torch.bfloat16 else t.numpy()
                    f.write(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {"out": str(out), "format": "llmc", "version": version, "dtype": dtype, "params": n_params,
            "padded_vocab_size": Vp, "bytes": out.stat().st_size}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
