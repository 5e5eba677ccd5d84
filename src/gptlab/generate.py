"""Sampling helpers, gpt-fast style: ``logits_to_probs`` -> ``sample`` -> ``forward_step`` / ``decode_one_token``.

Generation itself (prefill, batched cached decode steps, stopping, streaming) is :mod:`gptlab.engine`'s
job; :func:`generate` here is a thin tensor-in, tensor-out caller of it for scripts and tests.
"""

from __future__ import annotations

import time

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


def forward_step(model, x: torch.Tensor, kv_cache, input_pos: torch.Tensor, kv_len: int | None = None
                 ) -> torch.Tensor:
    """Run ``x`` (B, T) at positions ``input_pos`` (B, T) through ``model``, writing ``kv_cache``; the
    logits (B, V) of the last position."""
    logits, _ = model(x, kv_cache=kv_cache, input_pos=input_pos, kv_len=kv_len, last_only=True)  # (B, 1, V)
    return logits[:, -1]


def decode_one_token(model, x: torch.Tensor, kv_cache, input_pos: torch.Tensor, kv_len: int | None = None,
                     **sampling) -> torch.Tensor:
    """One cached step with the same sampling for every row: the next ids (B, 1)."""
    return sample(forward_step(model, x, kv_cache, input_pos, kv_len), **sampling)


class CompiledDecoder:
    """The one-token cached forward compiled once with fixed shapes (``fullgraph``, no dynamic dims,
    attention over the whole cache buffer), for :class:`gptlab.engine.Engine` with ``compile=True``;
    sampling stays eager.

    ``mode`` defaults to ``"reduce-overhead"`` on CUDA -- the step is captured as a CUDA graph and
    replayed, which removes the per-kernel launch cost that dominates small-batch decoding -- and to
    inductor's default elsewhere. A CUDA graph bakes in the cache's address, so the engine keeps one
    cache and marks it with :meth:`prepare_cache`.
    """

    def __init__(self, model, mode: str | None = None) -> None:
        self.device = next(model.parameters()).device
        self.mode = mode or ("reduce-overhead" if self.device.type == "cuda" else "default")
        self.fwd = torch.compile(model, mode=self.mode, fullgraph=True, dynamic=False)
        self.compile_seconds = 0.0  # wall time of each shape's first call: compiling, mostly
        self._seen: set[tuple[int, ...]] = set()

    def prepare_cache(self, cache) -> None:
        if self.device.type == "cuda":
            from torch._dynamo import mark_static_address

            mark_static_address(cache.k)
            mark_static_address(cache.v)

    def __call__(self, x: torch.Tensor, kv_cache, input_pos: torch.Tensor) -> torch.Tensor:
        # Clone: the next replay of a CUDA graph overwrites its output buffer.
        shape = (*x.shape, kv_cache.max_seq_len)
        if shape in self._seen:
            return forward_step(self.fwd, x, kv_cache, input_pos, None).clone()
        t0 = time.perf_counter()
        out = forward_step(self.fwd, x, kv_cache, input_pos, None).clone()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.compile_seconds += time.perf_counter() - t0
        self._seen.add(shape)
        return out


def generate(model, idx: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             use_kv_cache: bool = True, compile: bool = False) -> torch.Tensor:
    """``idx`` (B, T) followed by ``max_new_tokens`` sampled tokens: (B, T + new), through the engine.

    Temperature 0 is greedy. With ``seed`` row i samples with a generator seeded ``seed + i``; rows never
    stop early (no tokenizer, so no end-of-text), and the context window must hold T + new tokens.
    """
    from gptlab.engine import Engine, SamplingParams

    if idx.dim() != 2 or idx.size(1) == 0:
        raise GptlabError("generate: idx must be a non-empty (batch, tokens) tensor; give at least one prompt token")
    W = model.config.block_size
    if idx.size(1) + max_new_tokens > W:
        raise GptlabError(f"generate: {idx.size(1)} prompt + {max_new_tokens} new tokens exceed the context "
                          f"window (block_size={W})")
    was_training = model.training
    engine = Engine(model, None, max_batch=idx.size(0), max_queue=idx.size(0), compile=compile,
                    use_kv_cache=use_kv_cache)
    try:
        reqs = [engine.submit(row, SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                                  top_p=top_p, seed=None if seed is None else seed + i))
                for i, row in enumerate(idx.tolist())]
        while not all(r.done for r in reqs):
            engine.step()
        out = [r.result() for r in reqs]
    finally:
        model.train(was_training)
    for c in out:
        if c.error:
            raise GptlabError(f"generate: {c.error}")
    new = torch.tensor([c.token_ids for c in out], dtype=torch.long, device=idx.device).view(idx.size(0), -1)
    return torch.cat([idx, new], dim=1)


# --------------------------------------------------------------------------- CLI


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
