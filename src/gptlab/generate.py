"""Sampling, gpt-fast style: ``logits_to_probs`` -> ``sample`` -> ``decode_one_token`` -> ``generate``.

With the KV cache the prompt is run once (prefill), then each step feeds one token. Without it every
step re-runs the last ``block_size`` tokens (nanoGPT's loop). Both see exactly the same context, so they
produce the same tokens for greedy and seeded sampling:

- a prompt longer than ``block_size`` is left-truncated to its last ``block_size`` tokens (with a
  warning); the returned sequence still starts with the whole prompt;
- past the window the context slides: the cache is refilled with the last ``block_size`` tokens for
  each further token, which costs what the uncached loop costs (a full window per token).
"""

from __future__ import annotations

import codecs
import json
import sys
import time
import warnings
from typing import Iterator

import torch

from gptlab.errors import GptlabError


def logits_to_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                    top_p: float | None = None) -> torch.Tensor:
    """Next-token probabilities (..., V) in fp32 from logits (..., V).

    ``temperature`` > 0 divides the logits; ``top_k`` keeps the k largest (ties with the k-th kept);
    ``top_p`` keeps the smallest set of most likely tokens whose probability sums to at least ``top_p``
    (after temperature and top-k). Temperature 0 (greedy) is handled by :func:`sample`.
    """
    if temperature <= 0:
        raise ValueError("temperature must be > 0 here; sample() treats 0 as greedy")
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0 and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (..., 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        # Mass strictly before each token: a token is kept while that mass is still short of top_p,
        # so the most likely token always survives.
        before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop_sorted = before >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Token ids (B, 1) drawn from the last position's logits (B, V) or (B, T, V). Temperature 0: argmax."""
    if logits.dim() == 3:
        logits = logits[:, -1, :]
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = logits_to_probs(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, num_samples=1, generator=generator)


def decode_one_token(model, x: torch.Tensor, kv_cache=None, input_pos: torch.Tensor | None = None,
                     **sampling) -> torch.Tensor:
    """Run ``x`` (B, T) through ``model`` (advancing ``kv_cache`` if given, or writing it at
    ``input_pos`` on the static path) and sample the next ids (B, 1)."""
    logits, _ = model(x, kv_cache=kv_cache, input_pos=input_pos, last_only=True)  # (B, 1, V)
    return sample(logits, **sampling)


class CompiledDecoder:
    """A ``decode_fn`` for :func:`stream_generate` with ``static_cache=True``: the one-token forward
    compiled once with fixed shapes (``fullgraph``, no dynamic dims), sampling left eager.

    ``mode`` defaults to ``"reduce-overhead"`` on CUDA -- the step is captured as a CUDA graph and
    replayed, which removes the per-kernel launch cost that dominates batch-1 decoding of small
    models -- and to inductor's default elsewhere. It also hands out the KV caches
    (:meth:`new_kv_cache`): one per (batch, length), reused across ``generate`` calls, because a CUDA
    graph bakes in the cache's address (``mark_static_address``) and a fresh buffer would recompile.
    """

    def __init__(self, model, mode: str | None = None) -> None:
        self.device = next(model.parameters()).device
        self.mode = mode or ("reduce-overhead" if self.device.type == "cuda" else "default")
        self.fwd = torch.compile(model, mode=self.mode, fullgraph=True, dynamic=False)
        self._caches: dict[tuple[int, int, torch.dtype], object] = {}

    def new_kv_cache(self, model, batch_size: int, max_seq_len: int):
        dtype = next(model.parameters()).dtype
        key = (batch_size, max_seq_len, dtype)
        cache = self._caches.get(key)
        if cache is None:
            cache = model.new_kv_cache(batch_size, max_seq_len=max_seq_len)
            if self.device.type == "cuda":
                from torch._dynamo import mark_static_address

                mark_static_address(cache.k)
                mark_static_address(cache.v)
            self._caches[key] = cache
        cache.reset()  # rows past the position are masked out, so old contents never show
        return cache

    def __call__(self, model, x: torch.Tensor, kv_cache, input_pos: torch.Tensor | None = None,
                 **sampling) -> torch.Tensor:
        # Growing-cache and no-cache steps change shape: they stay eager. Sampling happens inside
        # decode_one_token, before the next replay overwrites a CUDA-graph output.
        return decode_one_token(model if input_pos is None else self.fwd, x, kv_cache, input_pos, **sampling)


@torch.no_grad()
def stream_generate(model, idx: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                    top_k: int | None = None, top_p: float | None = None,
                    generator: torch.Generator | None = None, use_kv_cache: bool = True,
                    stop_id: int | None = None, decode_fn=None, static_cache: bool = False
                    ) -> Iterator[torch.Tensor]:
    """Yield the next token ids (B,) one step at a time, continuing ``idx`` (B, T).

    With ``stop_id`` it stops once every row has produced it (rows that finished earlier keep
    yielding ``stop_id``). ``decode_fn`` replaces :func:`decode_one_token` for the one-token cached
    steps and the uncached loop (e.g. a compiled one); (re)fills of the cache always run eagerly.
    ``static_cache``: one-token steps take the static-shape path of :class:`~gptlab.model.KVCache`
    (positions as a tensor, the whole buffer under a mask), which :class:`CompiledDecoder` needs.
    """
    if idx.dim() != 2 or idx.size(1) == 0:
        raise GptlabError("generate: idx must be a non-empty (batch, tokens) tensor; give at least one prompt token")
    W = model.config.block_size
    if idx.size(1) > W:
        warnings.warn(f"prompt of {idx.size(1)} tokens is longer than the context window ({W}); "
                      f"the model sees only its last {W} tokens", stacklevel=3)
    step = decode_fn or decode_one_token
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    was_training = model.training
    model.eval()
    try:
        seq = idx
        B = idx.size(0)
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        cache = pos = None
        if use_kv_cache:
            S = min(W, idx.size(1) + max_new_tokens)
            make_cache = getattr(step, "new_kv_cache", None)
            cache = make_cache(model, B, S) if static_cache and make_cache else model.new_kv_cache(B, max_seq_len=S)
            if static_cache:
                # The position lives on the device and is bumped in place: no host-to-device copy per step.
                pos = torch.zeros(1, dtype=torch.long, device=idx.device)
        for i in range(max_new_tokens):
            if cache is None:
                nxt = step(model, seq[:, -W:], None, **sampling)
            elif i == 0 or cache.pos >= cache.max_seq_len:
                cache.reset()  # prefill, or the window is full: refill it with the last W tokens
                nxt = decode_one_token(model, seq[:, -W:], cache, **sampling)
                if pos is not None:
                    pos.fill_(cache.pos)
            elif pos is not None:
                # ``nxt`` (B, 1) is the token just appended; unlike a view of ``seq`` its strides do
                # not change with the length, so a compiled step is not re-specialised each token.
                nxt = step(model, nxt, cache, input_pos=pos, **sampling)
                cache.pos += 1
                pos.add_(1)
            else:
                nxt = step(model, seq[:, -1:], cache, **sampling)
            if stop_id is not None:
                nxt = torch.where(done[:, None], torch.full_like(nxt, stop_id), nxt)
                done |= nxt[:, 0] == stop_id
            seq = torch.cat([seq, nxt], dim=1)
            yield nxt[:, 0]
            if stop_id is not None and bool(done.all()):
                return
    finally:
        model.train(was_training)


def generate(model, idx: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
             use_kv_cache: bool = True, stop_id: int | None = None, decode_fn=None,
             static_cache: bool = False) -> torch.Tensor:
    """``idx`` (B, T) followed by up to ``max_new_tokens`` sampled tokens: (B, T + new).

    Temperature 0 is greedy. Pass a seeded ``torch.Generator`` (on the model's device) for
    reproducible sampling; see the module docstring for the context-window rules.
    """
    new = list(stream_generate(model, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                               generator=generator, use_kv_cache=use_kv_cache, stop_id=stop_id,
                               decode_fn=decode_fn, static_cache=static_cache))
    if not new:
        return idx
    return torch.cat([idx, torch.stack(new, dim=1)], dim=1)


# --------------------------------------------------------------------------- CLI


class TextStreamer:
    """Turns token ids into text pieces, holding back incomplete UTF-8 (a BPE token can be half a character)."""

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer
        self.bytes_fn = getattr(tokenizer, "decode_bytes", None)
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        if self.bytes_fn is None:
            return self.tok.decode([token_id])
        return self.utf8.decode(self.bytes_fn([token_id]))

    def flush(self) -> str:
        return "" if self.bytes_fn is None else self.utf8.decode(b"", final=True)


def read_prompt(prompt: str) -> str:
    """``--prompt`` value: literal text, or ``FILE:path`` for a file's contents."""
    if prompt.startswith("FILE:"):
        path = prompt[5:]
        try:
            with open(path, encoding="utf-8") as f:
                return f.read()
        except OSError as e:
            raise GptlabError(f"--prompt FILE:{path}: cannot read ({e.strerror})") from None
    return prompt


def encode_prompt(tokenizer, text: str) -> list[int]:
    ids = tokenizer.encode(text)
    if not ids:
        if tokenizer.eot_id is None:
            raise GptlabError("--prompt is empty and this tokenizer has no end-of-text token to start from; "
                              "give a prompt of at least one character")
        ids = [tokenizer.eot_id]  # an empty prompt starts a fresh document, as GPT-2 was trained
    return ids
