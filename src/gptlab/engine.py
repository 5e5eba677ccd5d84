"""The one way gptlab runs a model for generation: ``sample``, the trainer's samples, ``bench generate`` and
the HTTP server all go through :class:`Engine`.

Shape of the work (continuous batching, as vLLM/TGI do it, on one preallocated KV cache):

- every request owns one row ("slot") of the cache while it runs; running rows are kept packed in slots
  ``0..n-1`` (a retiring row's slot is refilled by moving the last row into it), so a decode step is one
  forward of ``n`` tokens, each at its own row's position (:class:`gptlab.model.KVCache`);
- between decode steps the scheduler admits every waiting request that fits: their prompts are prefilled
  together into free slots, in one forward per batch of similar-length prompts (left-padded to the
  batch's longest; see :meth:`Engine._prefill`), their first tokens sampled, then they join the next
  batched step; a row retires the moment it ends (stop
  string, end-of-text, ``max_tokens``, cancel), freeing its slot for the next waiting request;
- work is bounded by ``max_batch`` rows and ``max_cache_tokens`` reserved positions (prompt + max_tokens
  of every running row); ``max_queue`` bounds the waiting line (:class:`EngineFull` past it).

Every row samples with its own parameters and its own ``torch.Generator`` seeded per request, and the
logits of a row do not depend on the other rows, so a seeded request gives the same text whatever else
is running, and greedy decoding gives the same tokens alone or in a batch (up to floating-point
reduction order in batched kernels, which the tests check does not change a token on small models).

The scheduler runs in its own thread after :meth:`Engine.start` (the server); without it,
:meth:`Engine.generate` drives the same loop in the calling thread (``sample``, the trainer).
"""

from __future__ import annotations

import asyncio
import codecs
import collections
import dataclasses
import itertools
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Iterator, Sequence

import torch
import torch.nn.functional as F

from gptlab.errors import GptlabError
from gptlab.generate import logits_to_probs

FINISH_REASONS = ("stop", "length", "cancelled", "error")


class EngineFull(GptlabError):
    """The waiting line is full (``max_queue``): try again later (HTTP 429)."""


class InvalidParams(GptlabError, ValueError):
    """A request parameter is out of range; ``param`` names it (OpenAI's error ``param``)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class PromptTooLong(InvalidParams):
    """The prompt leaves no room to generate in the model's context window."""


@dataclass
class SamplingParams:
    """Per-request sampling parameters (the OpenAI completion fields the engine acts on)."""

    max_tokens: int = 16  # new tokens; 0 = none (scoring with echo); clipped to the context window
    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None  # per-request torch.Generator: the same text whatever else runs
    stop: Sequence[str] = ()  # stop strings, not included in the output text
    ignore_eot: bool = False  # default: stop at the tokenizer's end-of-text token (not in the text)
    logprobs: int | None = None  # None: none; k >= 0: each token's logprob and the top-k alternatives

    def validate(self) -> None:
        """Raise :class:`InvalidParams` naming the first bad field."""
        checks = (
            ("max_tokens", isinstance(self.max_tokens, int) and self.max_tokens >= 0, "an integer >= 0"),
            ("temperature", isinstance(self.temperature, (int, float)) and 0 <= self.temperature <= 100,
             "a number in [0, 100]"),
            ("top_k", self.top_k is None or (isinstance(self.top_k, int) and self.top_k >= 0),
             "an integer >= 0 (0 = off)"),
            ("top_p", self.top_p is None or (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1),
             "a number in (0, 1]"),
            ("seed", self.seed is None or isinstance(self.seed, int), "an integer"),
            ("stop", not isinstance(self.stop, str) and all(isinstance(s, str) and s for s in self.stop),
             "a list of non-empty strings"),
            ("logprobs", self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20),
             "an integer in [0, 20]"),
        )
        for name, ok, want in checks:
            if not ok:
                raise InvalidParams(f"{name}={getattr(self, name)!r}: must be {want}", param=name)


@dataclass
class TokenEvent:
    """One per generated token, in order; the last event of a request has ``finish_reason`` set.

    A request that ends without a new token (cancelled while waiting or between tokens, ``max_tokens=0``,
    an engine error) gets a final event with ``token_id`` None.
    """

    token_id: int | None
    text: str  # UTF-8-safe piece (incomplete characters and possible stop-string starts held back)
    logprob: float | None = None  # log-probability of token_id under the model (no temperature/top-k)
    top_logprobs: list[tuple[int, float]] | None = None  # the k most likely (token_id, logprob), k=logprobs
    finish_reason: str | None = None  # None while running; "stop", "length", "cancelled" or "error"


@dataclass
class Completion:
    """A finished request: what :meth:`Engine.generate` returns."""

    prompt_ids: list[int]
    token_ids: list[int]  # every generated token, the end-of-text token included when it ended the row
    text: str  # the generated text, stop string and end-of-text excluded
    finish_reason: str
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    error: str | None = None


_ids = itertools.count()


class Request:
    """A submitted request; thread-safe. Read its events with :meth:`events` (blocking) or :meth:`aevents`."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, max_tokens: int) -> None:
        self.id = f"req-{next(_ids)}"
        self.prompt_ids = prompt_ids
        self.params = params
        self.max_tokens = max_tokens  # after clipping to the context window
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.created = time.monotonic()
        self._events: list[TokenEvent] = []
        self._cond = threading.Condition()
        self._cancelled = False
        self._async: tuple[asyncio.AbstractEventLoop, asyncio.Queue] | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """Ask the engine to retire this request; it ends with ``finish_reason="cancelled"`` within one step."""
        self._cancelled = True

    def _push(self, ev: TokenEvent) -> None:
        with self._cond:
            self._events.append(ev)
            if ev.finish_reason is not None:
                self.finish_reason = ev.finish_reason
            if self._async is not None:
                loop, q = self._async
                try:
                    loop.call_soon_threadsafe(q.put_nowait, ev)
                except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
                    pass
            self._cond.notify_all()

    def events(self, timeout: float | None = None) -> Iterator[TokenEvent]:
        """Every event in order, blocking for the next; ends after the finishing event.

        ``timeout``: seconds to wait for each event before raising ``TimeoutError``.
        """
        i = 0
        while True:
            with self._cond:
                if i >= len(self._events) and not self._cond.wait_for(lambda: i < len(self._events), timeout):
                    raise TimeoutError(f"{self.id}: no event within {timeout}s")
                batch = self._events[i:]
            for ev in batch:
                i += 1
                yield ev
                if ev.finish_reason is not None:
                    return

    async def aevents(self) -> AsyncIterator[TokenEvent]:
        """:meth:`events` for asyncio: events are handed to the running loop by the engine thread."""
        q: asyncio.Queue = asyncio.Queue()
        with self._cond:
            for ev in self._events:
                q.put_nowait(ev)
            self._async = (asyncio.get_running_loop(), q)
        while True:
            ev = await q.get()
            yield ev
            if ev.finish_reason is not None:
                return

    def result(self, timeout: float | None = None) -> Completion:
        """Wait for the end and collect the events into a :class:`Completion`."""
        evs = list(self.events(timeout))
        toks = [ev for ev in evs if ev.token_id is not None]
        want_lp = self.params.logprobs is not None
        return Completion(
            prompt_ids=list(self.prompt_ids), token_ids=[ev.token_id for ev in toks],
            text="".join(ev.text for ev in evs), finish_reason=evs[-1].finish_reason,
            logprobs=[ev.logprob for ev in toks] if want_lp else None,
            top_logprobs=[ev.top_logprobs for ev in toks] if want_lp else None, error=self.error)


class TextAssembler:
    """Token ids -> text pieces, holding back incomplete UTF-8 (a BPE token can be half a character) and
    any tail that could be the start of a stop string; reports a completed stop string."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self.tok = tokenizer
        self.bytes_fn = getattr(tokenizer, "decode_bytes", None)
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stop = [s for s in stop if s]
        self.pending = ""

    def _decode(self, token_id: int) -> str:
        if self.tok is None:
            return ""
        if self.bytes_fn is None:
            return self.tok.decode([token_id])
        return self.utf8.decode(self.bytes_fn([token_id]))

    def push(self, token_id: int) -> tuple[str, bool]:
        """(text safe to emit now, whether a stop string completed: the text then ends before it)."""
        self.pending += self._decode(token_id)
        if not self.stop:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            out, self.pending = self.pending[:min(hits)], ""
            return out, True
        keep = 0  # longest tail of pending that is a proper prefix of some stop string
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.pending)), keep, -1):
                if self.pending.endswith(s[:n]):
                    keep = n
                    break
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        """Whatever is held back, at the end of a row that did not stop on a stop string."""
        tail = self.pending + (self.utf8.decode(b"", final=True) if self.bytes_fn is not None else "")
        self.pending = ""
        return tail


class _Row:
    """A running request: its cache slot, next position, last token and sampling state."""

    __slots__ = ("req", "pos", "last", "gen", "n_new", "text", "reserved")

    def __init__(self, req: Request, gen: torch.Generator, tokenizer) -> None:
        self.req = req
        self.pos = 0  # cache slots written: the last sampled token is fed back at this position
        self.last = -1
        self.gen = gen
        self.n_new = 0
        self.text = TextAssembler(tokenizer, req.params.stop)
        self.reserved = len(req.prompt_ids) + req.max_tokens


class Engine:
    """A model, its tokenizer and a continuous-batching scheduler over one KV cache (see the module docstring).

    Build one with :meth:`load` (any ``--init`` source) or directly from a model already in memory.
    """

    def __init__(self, model: torch.nn.Module, tokenizer=None, *, name: str = "model", max_batch: int = 16,
                 max_queue: int = 64, max_cache_tokens: int | None = None, max_seq_len: int | None = None,
                 compile: bool = False, use_kv_cache: bool = True, max_prefill_tokens: int | None = None) -> None:
        if max_batch < 1 or max_queue < 1:
            raise GptlabError(f"engine: max_batch ({max_batch}) and max_queue ({max_queue}) must be >= 1")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.config = model.config
        self.vocab_size = model.config.vocab_size
        self.max_seq_len = min(max_seq_len or model.config.block_size, model.config.block_size)
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_cache_tokens = max(max_cache_tokens or max_batch * self.max_seq_len, self.max_seq_len)
        self.use_kv_cache = use_kv_cache
        # Padded tokens in one batched prefill; a single prompt longer than this still runs, alone. On a CPU
        # prefill is compute-bound: one forward of 16 x 32 tokens costs about 16 of 32 tokens, and every row
        # waits for all of it (TTFT p50 worse than one by one); batches of ~128 tokens keep the saved weight
        # reads and let the first batch's tokens out early (gpt2, 16 x 32-token burst, 2 cores: p50 ~550 ms
        # vs ~700 one by one and ~870 all at once). A GPU runs a big batch in about the time of a small one.
        if max_prefill_tokens is None:
            max_prefill_tokens = 128 if self.device.type == "cpu" else 4096
        if max_prefill_tokens < 1:
            raise GptlabError(f"max_prefill_tokens={max_prefill_tokens}: must be >= 1")
        self.max_prefill_tokens = max_prefill_tokens
        self.eot_id = getattr(tokenizer, "eot_id", None)
        self.compiled = None
        if compile and use_kv_cache:
            from gptlab.generate import CompiledDecoder

            self.compiled = CompiledDecoder(model)
        self.cache = None
        self.rows: list[_Row] = []
        self.waiting: collections.deque[Request] = collections.deque()
        self._lock = threading.Lock()  # waiting line and counters
        self._wake = threading.Condition(self._lock)
        self.model_lock = threading.RLock()  # one forward at a time (scheduler, score)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._deadline: float | None = None
        self._seeds = random.SystemRandom()
        self.counters = collections.Counter()

    # ------------------------------------------------------------------ construction

    @classmethod
    def load(cls, src, *, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
             compile: bool = False, quantize: str | None = None, max_batch: int = 16, max_queue: int = 64,
             max_cache_tokens: int | None = None, max_seq_len: int | None = None,
             use_kv_cache: bool = True, max_prefill_tokens: int | None = None) -> "Engine":
        """An engine over any model source ``--init`` accepts (run dir, HF dir, Hub name), with its tokenizer."""
        from gptlab.kernels import apply_cpu_kernels
        from gptlab.loading import load_model
        from gptlab.runtime import resolve_device, resolve_dtype

        dev = resolve_device(device) if not isinstance(device, torch.device) else device
        dt = resolve_dtype(dtype, dev) if not isinstance(dtype, torch.dtype) else dtype
        model, tokenizer = load_model(src, device=dev, dtype=dt)
        if quantize:
            from gptlab.quantize import quantize_model

            quantize_model(model, quantize)
        apply_cpu_kernels(model)  # fp32 on CPU only; quantized layers are not nn.Linear and stay
        return cls(model, tokenizer, name=str(src), max_batch=max_batch, max_queue=max_queue,
                   max_cache_tokens=max_cache_tokens, max_seq_len=max_seq_len, compile=compile,
                   use_kv_cache=use_kv_cache, max_prefill_tokens=max_prefill_tokens)

    # ------------------------------------------------------------------ requests

    def _check(self, prompt_ids: Sequence[int], params: SamplingParams) -> tuple[list[int], int]:
        params.validate()
        ids = [int(i) for i in prompt_ids]
        if not ids:
            if self.eot_id is None:
                raise InvalidParams("prompt is empty and this model's tokenizer has no end-of-text token to start "
                                    "from; give at least one token", param="prompt")
            ids = [self.eot_id]  # an empty prompt starts a fresh document, as GPT-2 was trained
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise InvalidParams(f"prompt token id {bad} is outside the vocabulary (0..{self.vocab_size - 1})",
                                param="prompt")
        if len(ids) > self.max_seq_len or (len(ids) == self.max_seq_len and params.max_tokens > 0):
            raise PromptTooLong(f"prompt of {len(ids)} tokens leaves no room in the model's context of "
                                f"{self.max_seq_len} tokens; shorten it", param="prompt")
        return ids, min(params.max_tokens, self.max_seq_len - len(ids))

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams | None = None) -> Request:
        """Queue a request; raises :class:`InvalidParams` / :class:`PromptTooLong` for bad input and
        :class:`EngineFull` when ``max_queue`` requests are already waiting."""
        params = params or SamplingParams()
        ids, max_tokens = self._check(prompt_ids, params)
        req = Request(ids, dataclasses.replace(params, stop=tuple(params.stop)), max_tokens)
        with self._lock:
            if len(self.waiting) >= self.max_queue:
                self.counters["rejected"] += 1
                raise EngineFull(f"{len(self.waiting)} requests are already waiting (max_queue={self.max_queue}); "
                                 "retry later")
            self.waiting.append(req)
            self.counters["submitted"] += 1
            self._wake.notify_all()
        return req

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidParams("this model has no tokenizer: give the prompt as token ids", param="prompt")
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def generate(self, prompts: Sequence[str | Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[Completion]:
        """Submit every prompt (text or token ids) and wait for all; drives the loop itself when the
        scheduler thread is not started. ``params``: one for all prompts, or one per prompt (e.g. seeds).
        Prompts beyond ``max_queue`` wait their turn."""
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise InvalidParams(f"{len(prompts)} prompts but {len(params)} sampling parameter sets", param="params")
        todo = [self.encode(p) for p in prompts]
        for ids, p in zip(todo, params):
            self._check(ids, p)  # refuse the whole call before running any of it
        reqs: list[Request] = []
        for ids, p in zip(todo, params):
            while True:
                try:
                    reqs.append(self.submit(ids, p))
                    break
                except EngineFull:
                    if not self.running:
                        self.step()
                    else:
                        time.sleep(0.005)
        if not self.running:
            while not all(r.done for r in reqs):
                self.step()
        return [r.result() for r in reqs]

    def stream(self, req: Request) -> Iterator[TokenEvent]:
        """``req``'s events as they come; drives the loop itself when the scheduler thread is not started
        (closing the iterator early then cancels the request)."""
        if self.running:
            yield from req.events()
            return
        seen = 0
        try:
            while True:
                while seen >= len(req._events):
                    self.step()
                ev = req._events[seen]
                seen += 1
                yield ev
                if ev.finish_reason is not None:
                    return
        finally:
            if not req.done:
                req.cancel()
                while not req.done:
                    self.step()

    def stats(self) -> dict[str, Any]:
        """Numbers for /metrics: queue length, running rows, reserved cache tokens, request counters."""
        with self._lock:
            return {"queue_len": len(self.waiting), "running_rows": len(self.rows),
                    "cache_tokens_reserved": sum(r.reserved for r in self.rows),
                    "max_batch": self.max_batch, "max_cache_tokens": self.max_cache_tokens,
                    **dict(self.counters)}

    # ------------------------------------------------------------------ scoring

    @torch.no_grad()
    def score(self, ids: Sequence[int]) -> list[float | None]:
        """Log-probability of each token given its prefix (the first has none): ``echo`` + ``logprobs``."""
        return self.score_top(ids, 0)[0]

    @torch.no_grad()
    def score_top(self, ids: Sequence[int], k: int
                  ) -> tuple[list[float | None], list[list[tuple[int, float]] | None]]:
        """:meth:`score` plus, for each position, the ``k`` most likely (token_id, logprob) there."""
        ids, _ = self._check(ids, SamplingParams(max_tokens=0))
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        with self.model_lock:
            logits, _ = self.model(x)  # (1, T, V)
        lp = F.log_softmax(logits[0, :-1].float(), dim=-1)  # (T-1, V): predictions for tokens 1..T-1
        got = lp.gather(1, x[0, 1:, None])[:, 0].tolist()
        tops: list[list[tuple[int, float]] | None] = [None]
        if k > 0:
            v, i = lp.topk(k, dim=-1)
            tops += [list(zip(ii, vv)) for ii, vv in zip(i.tolist(), v.tolist())]
        else:
            tops += [[] for _ in got]
        return [None] + got, tops

    # ------------------------------------------------------------------ the scheduler

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start the scheduler thread (continuous batching) if it is not running."""
        if self.running:
            return
        self._stop.clear()
        self._deadline = None
        self._thread = threading.Thread(target=self._loop, name="gptlab-engine", daemon=True)
        self._thread.start()

    def shutdown(self, deadline_s: float = 10.0) -> None:
        """Stop admitting, let running rows finish for up to ``deadline_s`` seconds, cancel the rest, stop."""
        with self._lock:
            self._deadline = time.monotonic() + deadline_s
            self._stop.set()
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        while True:
            with self._lock:
                if self._stop.is_set():
                    for req in self.waiting:
                        req._push(TokenEvent(None, "", finish_reason="cancelled"))
                    self.waiting.clear()
                    if not self.rows:
                        return
                    if time.monotonic() > self._deadline:
                        for row in self.rows:
                            row.req.cancel()
                elif not self.rows and not self.waiting:
                    self._wake.wait(timeout=0.5)
                    continue
            self.step()

    def step(self) -> None:
        """One scheduler iteration: retire cancelled rows, admit (prefill) waiting requests, one decode step.
        An exception in a forward ends the affected requests with ``finish_reason="error"``, never the engine."""
        with self.model_lock, torch.no_grad():
            try:
                self._retire_cancelled()
                if not self._stop.is_set():
                    self._admit()
                if self.rows:
                    self._decode()
            except Exception as e:  # noqa: BLE001 - a bad step must not kill the server
                msg = f"{type(e).__name__}: {e}"
                for row in list(self.rows):
                    row.req.error = msg
                    self._finish(row, TokenEvent(None, "", finish_reason="error"))

    def _alloc(self, need: int) -> None:
        """Make sure the cache has at least ``need`` rows (grows by doubling, up to max_batch)."""
        have = 0 if self.cache is None else self.cache.batch_size
        if have >= need:
            return
        rows = self.max_batch if self.compiled is not None else min(self.max_batch, max(need, 2 * have, 1))
        cache = self.model.new_kv_cache(rows, max_seq_len=self.max_seq_len)
        if self.cache is not None:
            cache.k[:, :have].copy_(self.cache.k)
            cache.v[:, :have].copy_(self.cache.v)
        if self.compiled is not None:
            self.compiled.prepare_cache(cache)
        self.cache = cache

    def _retire_cancelled(self) -> None:
        with self._lock:
            gone = [r for r in self.waiting if r._cancelled]
            for req in gone:
                self.waiting.remove(req)
        for req in gone:
            req._push(TokenEvent(None, "", finish_reason="cancelled"))
        for row in [r for r in self.rows if r.req._cancelled]:
            self._finish(row, TokenEvent(None, row.text.flush(), finish_reason="cancelled"))

    def _admit(self) -> None:
        """Take every waiting request that fits (rows, cache tokens; first come first served, stopping at
        the first that does not fit) and prefill them in a few batched forwards, not one per prompt: under
        a burst the last request's first token would otherwise wait for every prefill before it."""
        new: list[_Row] = []
        while True:
            with self._lock:
                if not self.waiting or len(self.rows) + len(new) >= self.max_batch:
                    break
                req = self.waiting[0]
                reserved = sum(r.reserved for r in self.rows) + sum(r.reserved for r in new)
                if (self.rows or new) and reserved + len(req.prompt_ids) + req.max_tokens > self.max_cache_tokens:
                    break
                self.waiting.popleft()
            if req._cancelled:
                req._push(TokenEvent(None, "", finish_reason="cancelled"))
                continue
            seed = req.params.seed if req.params.seed is not None else self._seeds.getrandbits(63)
            gen = torch.Generator(device=self.device).manual_seed(seed)
            row = _Row(req, gen, self.tokenizer)
            self.counters["prompt_tokens"] += len(req.prompt_ids)
            if req.max_tokens == 0:
                req._push(TokenEvent(None, "", finish_reason="length"))
                continue
            new.append(row)
        for group in self._prefill_groups(new):
            self._prefill_and_emit(group)

    def _prefill_and_emit(self, rows: list[_Row]) -> None:
        """Prefill ``rows`` in one forward and sample their first tokens. If the forward fails, a lone row
        ends with ``error``; a batch is redone one row at a time, so one bad prompt does not fail the others
        (the failed forward wrote only into free slots, >= len(self.rows), which the redo rewrites)."""
        try:
            logits = self._prefill(rows)
        except Exception as e:  # noqa: BLE001
            if len(rows) > 1:
                for row in rows:
                    self._prefill_and_emit([row])
                return
            rows[0].req.error = f"{type(e).__name__}: {e}"
            rows[0].req._push(TokenEvent(None, "", finish_reason="error"))
            return
        self._emit(rows, logits)

    def _prefill_groups(self, rows: list[_Row]) -> list[list[_Row]]:
        """Split the rows to prefill into batches of similar prompt length.

        A batch is padded to its longest prompt, so one long prompt would make every short one pay for
        its length: sorted by length, a batch closes when it would hold more padding than prompt tokens
        or more than ``max_prefill_tokens`` padded tokens (a bound on one forward's memory and latency).
        Shorter batches go first: the cheapest first tokens come out soonest.
        """
        groups: list[list[_Row]] = []
        cur: list[_Row] = []
        real = 0
        for row in sorted(rows, key=lambda r: len(r.req.prompt_ids)):
            n = len(row.req.prompt_ids)
            padded = (len(cur) + 1) * n  # sorted: the newest prompt is the longest
            if cur and (padded > self.max_prefill_tokens or padded > 2 * (real + n)):
                groups.append(cur)
                cur, real = [], 0
            cur.append(row)
            real += n
        if cur:
            groups.append(cur)
        return groups

    def _prefill(self, rows: list[_Row]) -> torch.Tensor:
        """Fill free slots with the prompts' keys/values in one forward; the logits (n, V) of each row's
        last prompt token. The rows join ``self.rows`` only if the forward succeeds."""
        if not self.use_kv_cache:  # reference mode: each prompt alone, no cache, nothing padded
            logits = torch.cat([self.model(torch.tensor([r.req.prompt_ids], dtype=torch.long, device=self.device),
                                           last_only=True)[0][:, -1] for r in rows])
            self.rows.extend(rows)
            return logits
        lens = [len(r.req.prompt_ids) for r in rows]
        T = max(lens)
        self._alloc(len(self.rows) + len(rows))
        slot = len(self.rows)
        # Left-padded, so the last column is every row's last prompt token (``last_only``). A pad column
        # sits at a position past its row's prompt (L..T-1, distinct from 0..L-1 so the scatter into the
        # cache never writes one slot twice): a real token at p < L attends slots <= p only, so it never
        # sees a pad, and the row's own decode step at position q rewrites slot q before its query reads
        # it, so the pads' keys/values are overwritten before any query can attend them (KVCache.mask).
        x = torch.tensor([[0] * (T - n) + r.req.prompt_ids for r, n in zip(rows, lens)],
                         dtype=torch.long, device=self.device)
        pos = torch.tensor([list(range(n, T)) + list(range(n)) for n in lens], dtype=torch.long, device=self.device)
        logits, _ = self.model(x, kv_cache=self.cache.rows(slot, slot + len(rows)), input_pos=pos, kv_len=T,
                               last_only=True)
        for r, n in zip(rows, lens):
            r.pos = n
        self.rows.extend(rows)
        return logits[:, -1]

    def _decode(self) -> None:
        """One batched forward: every running row feeds its last token at its own position."""
        rows = self.rows
        if not self.use_kv_cache:  # reference mode: recompute each row's whole sequence
            logits = torch.cat([self.model(torch.tensor([r.req.prompt_ids + self._generated(r)],
                                                        device=self.device), last_only=True)[0][:, -1]
                                for r in rows])
            self._emit(list(rows), logits)
            return
        n = len(rows)
        if self.compiled is not None:  # fixed shapes: every slot, idle ones fed a dummy token at 0
            B = self.cache.batch_size
            toks = [r.last for r in rows] + [0] * (B - n)
            poss = [r.pos for r in rows] + [0] * (B - n)
        else:
            toks, poss = [r.last for r in rows], [r.pos for r in rows]
        x = torch.tensor(toks, dtype=torch.long, device=self.device)[:, None]
        pos = torch.tensor(poss, dtype=torch.long, device=self.device)[:, None]
        if self.compiled is not None:
            logits = self.compiled(x, self.cache, pos)[:n]
        else:
            logits, _ = self.model(x, kv_cache=self.cache.rows(0, n), input_pos=pos, kv_len=max(poss) + 1,
                                   last_only=True)
            logits = logits[:, -1]
        for r in rows:
            r.pos += 1
        self._emit(list(rows), logits)

    def _generated(self, row: _Row) -> list[int]:
        return [ev.token_id for ev in row.req._events if ev.token_id is not None]

    def _emit(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Sample one token per row from ``logits`` (n, V), send its event, retire rows that end."""
        logits = logits[:, : self.vocab_size].float()
        greedy = [i for i, r in enumerate(rows) if r.req.params.temperature == 0]
        toks = [0] * len(rows)
        if greedy:
            for i, t in zip(greedy, logits[greedy].argmax(-1).tolist()):
                toks[i] = t
        for i, r in enumerate(rows):
            p = r.req.params
            if p.temperature == 0:
                continue
            # One row at a time: a row's probabilities never depend on which other rows share the step.
            probs = logits_to_probs(logits[i:i + 1], p.temperature, p.top_k or None, p.top_p)
            toks[i] = int(torch.multinomial(probs, 1, generator=r.gen))
        want_lp = [i for i, r in enumerate(rows) if r.req.params.logprobs is not None]
        lps: dict[int, tuple[float, list[tuple[int, float]] | None]] = {}
        if want_lp:
            lp = F.log_softmax(logits[want_lp], dim=-1)
            for j, i in enumerate(want_lp):
                k = rows[i].req.params.logprobs
                top = None
                if k:
                    v, ix = lp[j].topk(k)
                    top = list(zip(ix.tolist(), v.tolist()))
                lps[i] = (float(lp[j, toks[i]]), top)
        for i, (r, t) in enumerate(zip(rows, toks)):
            r.n_new += 1
            r.last = t
            self.counters["generated_tokens"] += 1
            lp, top = lps.get(i, (None, None))
            p = r.req.params
            if t == self.eot_id and not p.ignore_eot:
                self._finish(r, TokenEvent(t, r.text.flush(), lp, top, "stop"))
                continue
            text, stopped = r.text.push(t)
            if stopped:
                self._finish(r, TokenEvent(t, text, lp, top, "stop"))
            elif r.n_new >= r.req.max_tokens:
                self._finish(r, TokenEvent(t, text + r.text.flush(), lp, top, "length"))
            else:
                r.req._push(TokenEvent(t, text, lp, top, None))

    def _finish(self, row: _Row, ev: TokenEvent) -> None:
        """Send the final event and free the row's slot (the last row moves into it: rows stay packed)."""
        row.req._push(ev)
        self.counters[f"finished_{ev.finish_reason}"] += 1
        i = self.rows.index(row)
        last = len(self.rows) - 1
        if i != last and self.use_kv_cache:
            moved = self.rows[last]
            n = moved.pos  # slots written so far by the moved row
            self.cache.k[:, i, :, :n].copy_(self.cache.k[:, last, :, :n])
            self.cache.v[:, i, :, :n].copy_(self.cache.v[:, last, :, :n])
        self.rows[i] = self.rows[last]
        self.rows.pop()
