"""The HTTP face of :class:`gptlab.engine.Engine`: an OpenAI-compatible FastAPI app.

The engine decodes in its own thread (continuous batching); this module only turns HTTP requests into
engine rows and engine events into JSON or server-sent events, so the event loop never waits on a
forward pass. A request with ``n`` choices over ``P`` prompts is ``n * P`` rows, each retired on its own;
a client that goes away cancels its rows, which the engine drops within one decode step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, AsyncIterator, Callable, Iterable

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from gptlab.server import chat
from gptlab.server.metrics import ServerMetrics
from gptlab.server.protocol import (APIError, ChatCompletionRequest, CompletionRequest, check_completion,
                                    parse_json, stop_list, validate)

MAX_BODY_BYTES = 16 * 2 ** 20  # a full-context prompt as JSON token ids is well under 1 MB
PUBLIC_PATHS = frozenset({"/health", "/", "/favicon.ico"})  # never need the API key
RETRY_AFTER_S = 1


# --------------------------------------------------------------------------- state


class ServerState:
    """What the routes share: the engine (None while loading), limits, key, metrics."""

    def __init__(self, *, engine: Any = None, loader: Callable[[], Any] | None = None, api_key: str | None = None,
                 max_queue: int | None = None, shutdown_deadline_s: float = 30.0,
                 on_ready: Callable[[Any], None] | None = None,
                 on_load_error: Callable[[BaseException], None] | None = None) -> None:
        self.engine = engine
        self.loader = loader
        self.api_key = api_key.encode() if api_key else None
        self.max_queue = max_queue
        self.shutdown_deadline_s = shutdown_deadline_s
        self.on_ready, self.on_load_error = on_ready, on_load_error
        self.load_error: BaseException | None = None
        self.created = int(time.time())
        self.metrics = ServerMetrics(self.engine_stats)

    def engine_stats(self) -> dict[str, Any]:
        return self.engine.stats() if self.engine is not None else {}

    def require_engine(self) -> Any:
        if self.engine is None:
            why = f"failed to load: {self.load_error}" if self.load_error else "is still loading"
            raise APIError(503, f"the model {why}; retry when GET /health answers 200", type="server_error",
                           code="model_loading", headers={"Retry-After": str(RETRY_AFTER_S)})
        return self.engine

    def load(self) -> None:
        """Load and start the engine (in a thread: /health answers 503 meanwhile)."""
        try:
            engine = self.loader()
            engine.start()
        except BaseException as e:  # reported through /health and the serve command, never raised in a thread
            self.load_error = e
            if self.on_load_error:
                self.on_load_error(e)
            return
        self.engine = engine
        if self.on_ready:
            self.on_ready(engine)


# --------------------------------------------------------------------------- middleware


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


class GuardMiddleware:
    """Counts every response by endpoint and status, and checks the Bearer key (constant-time) when one is set.

    Pure ASGI (not BaseHTTPMiddleware) so streamed bodies and client disconnects pass through untouched.
    """

    def __init__(self, app: Any, state: ServerState, endpoints: frozenset[str]) -> None:
        self.app, self.state, self.endpoints = app, state, endpoints

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = path if path in self.endpoints else "other"  # bounded label set
        status_box: list[int] = []

        async def counting_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status_box.append(int(message["status"]))
            await send(message)

        try:
            key = self.state.api_key
            if key is not None and path not in PUBLIC_PATHS and scope.get("method") != "OPTIONS":
                given = dict(scope.get("headers") or []).get(b"authorization", b"")
                scheme, _, token = given.partition(b" ")
                if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), key):
                    err = APIError(401, "missing or incorrect API key: send the header 'Authorization: Bearer KEY' "
                                        "with the key given to gptlab serve", code="invalid_api_key",
                                   headers={"WWW-Authenticate": "Bearer"})
                    return await _error_response(err)(scope, receive, counting_send)
            await self.app(scope, receive, counting_send)
        except Exception:
            status_box.append(500)  # answered by Starlette's outermost error handler
            raise
        finally:
            # no status at all: the client left before an answer was started (nginx's 499)
            self.state.metrics.requests.labels(endpoint, str(status_box[0] if status_box else 499)).inc()


# --------------------------------------------------------------------------- engine rows


@dataclass
class Row:
    """One choice: a submitted engine request and what has come back from it."""

    index: int
    prompt: int                        # index into the request's prompts
    handle: Any = None                 # engine Request (None when max_tokens is 0: nothing to generate)
    ids: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    tops: list[dict[int, float] | None] = field(default_factory=list)
    finish_reason: str | None = None


_END = object()


async def run_rows(state: ServerState, rows: list[Row], t0: float) -> AsyncIterator[tuple[Row, Any]]:
    """(row, event) as the engine produces them, across all rows; records token metrics.

    Closing or cancelling this iterator (client gone, error) cancels every row still running.
    """
    m = state.metrics
    q: asyncio.Queue = asyncio.Queue()
    live = [r for r in rows if r.handle is not None]

    async def pump(row: Row) -> None:
        try:
            async for ev in row.handle.aevents():  # handed over by the engine thread, never blocking the loop
                q.put_nowait((row, ev))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which decides
            q.put_nowait((row, e))
        finally:
            q.put_nowait((row, _END))

    tasks = [asyncio.create_task(pump(r)) for r in live]
    last: dict[int, float] = {}
    remaining = len(live)
    try:
        while remaining:
            row, ev = await q.get()
            if ev is _END:
                remaining -= 1
                if row.finish_reason is None:
                    row.finish_reason = "stop"
                m.rows_finished.labels(row.finish_reason).inc()
                continue
            if isinstance(ev, BaseException):
                raise ev
            now = time.perf_counter()
            if getattr(ev, "token_id", None) is not None and ev.token_id >= 0:
                m.generation_tokens.inc()
                if row.index in last:
                    m.itl.observe(now - last[row.index])
                else:
                    m.ttft.observe(now - t0)
                last[row.index] = now
            if ev.finish_reason is not None:
                row.finish_reason = ev.finish_reason
            yield row, ev
    finally:
        cancel_unfinished(state, rows)
        for t in tasks:
            t.cancel()


def cancel_unfinished(state: ServerState, rows: list[Row]) -> None:
    """Cancel the rows still running (the client left, or a row failed): frees their batch slots."""
    for r in rows:
        if r.handle is not None and r.finish_reason is None:
            r.handle.cancel()
            r.finish_reason = "cancelled"
            state.metrics.rows_finished.labels("cancelled").inc()


async def until_disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


# --------------------------------------------------------------------------- completions


def check_model(engine: Any, name: str | None) -> None:
    if name is not None and name != engine.name:
        raise APIError(404, f"the model {name!r} does not exist here; this server serves {engine.name!r} "
                            "(see GET /v1/models)", param="model", code="model_not_found")


def encode_prompts(engine: Any, prompt: Any) -> tuple[list[list[int]], list[str]]:
    """Prompt token ids and texts from any of the four prompt shapes."""
    tok = engine.tokenizer
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], str)):
        texts = [prompt] if isinstance(prompt, str) else list(prompt)
        out = []
        for i, text in enumerate(texts):
            try:
                # "<|endoftext|>" in a prompt is the special token, as in OpenAI's completions API.
                ids = tok.encode(text, allow_special=True)
            except ValueError as e:  # e.g. a character outside a char-level vocabulary
                raise APIError(400, f"prompt{f'[{i}]' if len(texts) > 1 else ''}: {e}", param="prompt",
                               code="invalid_prompt") from None
            if not ids:
                if getattr(tok, "eot_id", None) is None:
                    raise APIError(400, "the prompt is empty and this model's tokenizer has no end-of-text token "
                                        "to start from; give at least one character", param="prompt",
                                   code="invalid_prompt")
                ids = [tok.eot_id]  # an empty prompt starts a new document, as GPT-2 was trained
            out.append(ids)
        return out, texts
    lists = [prompt] if isinstance(prompt[0], int) else list(prompt)
    vocab = int(getattr(tok, "vocab_size", 0) or 0)
    for i, ids in enumerate(lists):
        if not ids:
            raise APIError(400, f"prompt[{i}] is an empty token array", param="prompt", code="invalid_prompt")
        bad = next((t for t in ids if t < 0 or (vocab and t >= vocab)), None)
        if bad is not None:
            raise APIError(400, f"prompt token id {bad} is outside the vocabulary [0, {vocab})", param="prompt",
                           code="invalid_prompt")
    return lists, [tok.decode(ids) for ids in lists]


def token_budget(engine: Any, req: CompletionRequest, prompts: list[list[int]]) -> list[int]:
    """``max_tokens`` per prompt, or a 400 when prompt + completion do not fit the context."""
    ctx = int(engine.max_seq_len)
    out = []
    for ids in prompts:
        p = len(ids)
        want = req.max_tokens if req.max_tokens is not None else max(ctx - p, 0)
        # Scoring (max_tokens 0) may use the whole window; generating needs room for the new tokens.
        if p > ctx or (want > 0 and p + want > ctx):
            raise APIError(400, f"This model's maximum context length is {ctx} tokens, however you requested "
                                f"{p + want} tokens ({p} in your prompt; {want} for the completion). "
                                "Please reduce your prompt or completion length.",
                           param="max_tokens" if p < ctx else "prompt", code="context_length_exceeded")
        out.append(want)
    return out


def sampling_params(req: CompletionRequest, max_tokens: int, choice: int) -> Any:
    from gptlab.engine import SamplingParams

    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else float(req.temperature),
        top_k=req.top_k if req.top_k is not None and req.top_k > 0 else None,
        top_p=req.top_p if req.top_p is not None and req.top_p < 1.0 else None,
        # choice j of a seeded request uses seed + j: n > 1 gives n different samples, each reproducible
        seed=None if req.seed is None else req.seed + choice,
        stop=stop_list(req.stop),
        ignore_eot=req.ignore_eos,
        logprobs=req.logprobs,
    )


def submit_rows(state: ServerState, engine: Any, req: CompletionRequest, prompts: list[list[int]],
                budgets: list[int]) -> list[Row]:
    """One engine row per (prompt, choice); all or none (a 429 leaves nothing queued)."""
    from gptlab.engine import EngineFull, InvalidParams

    rows = [Row(index=i * req.n + j, prompt=i) for i in range(len(prompts)) for j in range(req.n)]
    n_live = sum(1 for r in rows if budgets[r.prompt] > 0)
    if state.max_queue is not None and n_live:
        if n_live > state.max_queue:
            raise APIError(400, f"this request needs {n_live} rows (prompts x n) but the server queues at most "
                                f"{state.max_queue}; send fewer prompts or a smaller n", param="n",
                           code="too_many_rows")
        queued = int(state.engine_stats().get("queue_len", 0) or 0)
        if queued + n_live > state.max_queue:
            raise _queue_full(queued)
    try:
        for r in rows:
            if budgets[r.prompt] > 0:
                r.handle = engine.submit(prompts[r.prompt], sampling_params(req, budgets[r.prompt], r.index % req.n))
    except BaseException as e:
        for r in rows:
            if r.handle is not None:
                r.handle.cancel()
        if isinstance(e, EngineFull):
            raise _queue_full(None) from None
        if isinstance(e, InvalidParams):
            raise _invalid(e) from None
        raise
    for r in rows:
        if r.handle is None:
            r.finish_reason = "length"
    return rows


def _invalid(e: Exception) -> APIError:
    from gptlab.engine import PromptTooLong

    code = "context_length_exceeded" if isinstance(e, PromptTooLong) else "invalid_value"
    return APIError(400, str(e), param=getattr(e, "param", None), code=code)


def _queue_full(queued: int | None) -> APIError:
    what = f"{queued} rows are waiting" if queued is not None else "the queue is full"
    return APIError(429, f"the server is at capacity ({what}); retry after {RETRY_AFTER_S}s",
                    type="rate_limit_error", code="rate_limit_exceeded",
                    headers={"Retry-After": str(RETRY_AFTER_S)})


def piece(engine: Any, token_id: int) -> str:
    return engine.tokenizer.decode([token_id])


async def prompt_scores(engine: Any, prompts: list[list[int]], top: int | None
                        ) -> list[tuple[list[float | None], list[dict[int, float] | None]]]:
    """Each prompt token's logprob given its prefix (the first has none) and the ``top`` most likely
    tokens there, computed off the event loop; nothing when ``top`` is None."""
    from gptlab.engine import InvalidParams

    out = []
    for ids in prompts:
        if top is None:
            out.append(([], []))
            continue
        try:
            lps, tops = await asyncio.to_thread(engine.score_top, ids, top)
        except InvalidParams as e:
            raise _invalid(e) from None
        out.append((lps, [None if t is None else dict(t) for t in tops]))
    return out


def logprobs_json(engine: Any, ids: list[int], lps: list[float | None], tops: list[dict[int, float] | None],
                  n_top: int, offset: int) -> dict[str, Any]:
    tokens = [piece(engine, t) for t in ids]
    offsets = []
    for s in tokens:
        offsets.append(offset)
        offset += len(s)

    def top_dict(top: dict[int, float] | None) -> dict[str, float] | None:
        if top is None:
            return None
        return {piece(engine, t): float(v) for t, v in sorted(top.items(), key=lambda kv: -kv[1])[:n_top]}

    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": [top_dict(t) for t in tops],
            "text_offset": offsets}


async def collect_rows(state: ServerState, rows: list[Row], t0: float, request: Request) -> bool:
    """Run ``rows`` to the end (non-streaming), filling each row's ids, logprobs, top logprobs and text.

    False when the client left first: cancelling the collector then cancels its rows. An engine failure
    surfaces as an exception (a 500)."""
    async def collect() -> None:
        async for row, ev in run_rows(state, rows, t0):
            if getattr(ev, "token_id", None) is not None and ev.token_id >= 0:
                row.ids.append(int(ev.token_id))
                row.logprobs.append(ev.logprob)
                row.tops.append(event_top(ev))
            row.text.append(ev.text or "")

    work = asyncio.create_task(collect())
    gone = asyncio.create_task(until_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
    if work.cancelled():
        return False
    work.result()
    return True


def event_top(ev: Any) -> dict[int, float] | None:
    return None if ev.top_logprobs is None else {int(t): float(v) for t, v in ev.top_logprobs}


async def completions(state: ServerState, request: Request) -> Response:
    t0 = time.perf_counter()
    engine = state.require_engine()
    body = parse_json(await read_body(request))
    req = validate(CompletionRequest, body)
    check_completion(req)
    check_model(engine, req.model)
    prompts, texts = encode_prompts(engine, req.prompt)
    budgets = token_budget(engine, req, prompts)
    want_scores = req.echo and req.logprobs is not None
    scores = await prompt_scores(engine, prompts, req.logprobs if want_scores else None)
    rows = submit_rows(state, engine, req, prompts, budgets)
    state.metrics.prompt_tokens.inc(sum(len(p) for p in prompts))
    cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    n_top = req.logprobs or 0

    def usage() -> dict[str, int]:
        done = sum(len(r.ids) for r in rows)
        pt = sum(len(p) for p in prompts)
        return {"prompt_tokens": pt, "completion_tokens": done, "total_tokens": pt + done}

    def echo_part(r: Row) -> tuple[str, dict[str, Any] | None]:
        text = texts[r.prompt] if req.echo else ""
        if not want_scores:
            return text, None
        lps, tops = scores[r.prompt]
        return text, logprobs_json(engine, prompts[r.prompt], lps, tops, n_top, 0)

    if req.stream:
        # The background task also covers a client that leaves before the stream's first chunk, when the
        # generator (whose cleanup cancels the rows) never started.
        return StreamingResponse(_stream(state, req, rows, t0, cid, created, engine, echo_part, usage, n_top),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                 background=BackgroundTask(cancel_unfinished, state, rows))

    if not await collect_rows(state, rows, t0, request):
        return Response(status_code=499)
    choices = []
    for r in rows:
        head, head_lp = echo_part(r)
        text = head + "".join(r.text)
        lp = None
        if req.logprobs is not None:
            gen = logprobs_json(engine, r.ids, [None if x is None else float(x) for x in r.logprobs], r.tops,
                                n_top, len(head))
            lp = gen if head_lp is None else {k: head_lp[k] + gen[k] for k in gen}
        choices.append({"index": r.index, "text": text, "logprobs": lp, "finish_reason": r.finish_reason})
    return JSONResponse({"id": cid, "object": "text_completion", "created": created, "model": engine.name,
                         "choices": choices, "usage": usage()})


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def sse_stream(state: ServerState, rows: list[Row], t0: float, base: dict[str, Any],
                     head: Callable[[], Iterable[str]], on_event: Callable[[Row, Any, bool], str | None],
                     usage: Callable[[], dict[str, Any]] | None) -> AsyncIterator[str]:
    """The server-sent events of a streamed completion or chat completion: ``head()``'s chunks (before any
    token), then ``on_event(row, event, has_token)``'s chunk per engine event (the token id is already in
    ``row.ids``), the usage chunk when ``usage`` is given, and ``[DONE]``. ``base``: the fields every chunk
    carries (id, object, created, model)."""
    events = run_rows(state, rows, t0)
    try:
        for line in head():
            yield line
        async for row, ev in events:
            has_token = getattr(ev, "token_id", None) is not None and ev.token_id >= 0
            if has_token:
                row.ids.append(int(ev.token_id))
            line = on_event(row, ev, has_token)
            if line is not None:
                yield line
        if usage is not None:
            yield _sse({**base, "choices": [], "usage": usage()})
    except Exception as e:  # noqa: BLE001 - headers are sent: report in-band, then end the stream
        yield _sse(APIError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error").body())
    finally:
        await events.aclose()
    yield "data: [DONE]\n\n"


def _stream(state: ServerState, req: CompletionRequest, rows: list[Row], t0: float, cid: str, created: int,
            engine: Any, echo_part: Callable, usage: Callable, n_top: int) -> AsyncIterator[str]:
    base = {"id": cid, "object": "text_completion", "created": created, "model": engine.name}

    def chunk(index: int, text: str, lp: Any, finish: str | None) -> str:
        return _sse({**base, "choices": [{"index": index, "text": text, "logprobs": lp, "finish_reason": finish}]})

    offsets: dict[int, int] = {}

    def head() -> Iterable[str]:
        for r in rows:
            text, lp = echo_part(r)
            offsets[r.index] = len(text)
            if text or r.handle is None:
                yield chunk(r.index, text, lp, r.finish_reason if r.handle is None else None)

    def on_event(row: Row, ev: Any, has_token: bool) -> str | None:
        text, lp = ev.text or "", None
        if req.logprobs is not None and has_token:
            lp = logprobs_json(engine, [int(ev.token_id)], [ev.logprob], [event_top(ev)], n_top, offsets[row.index])
        offsets[row.index] += len(text)
        # One chunk per token even when its text is held back (half a character, a possible stop
        # string): clients count tokens and time inter-token latency from the chunks.
        return chunk(row.index, text, lp, ev.finish_reason) if text or has_token or ev.finish_reason is not None \
            else None

    with_usage = req.stream_options is not None and req.stream_options.include_usage
    return sse_stream(state, rows, t0, base, head, on_event, usage if with_usage else None)


async def read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise APIError(413, f"request body of {declared} bytes exceeds the {MAX_BODY_BYTES} byte limit",
                       code="request_too_large")
    chunks, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > MAX_BODY_BYTES:
            raise APIError(413, f"request body exceeds the {MAX_BODY_BYTES} byte limit", code="request_too_large")
        chunks.append(part)
    return b"".join(chunks)


# --------------------------------------------------------------------------- app


def playground_html() -> str:
    return resources.files("gptlab.server").joinpath("static/playground.html").read_text(encoding="utf-8")


def model_info(engine: Any) -> dict[str, Any]:
    tok = engine.tokenizer
    return {"model": engine.name, "max_model_len": int(engine.max_seq_len),
            "chat_template": chat.chat_template(engine) is not None,
            "tokenizer": getattr(tok, "name", None), "vocab_size": getattr(tok, "vocab_size", None),
            "eot_token": None if getattr(tok, "eot_id", None) is None else tok.decode([tok.eot_id]),
            "device": str(getattr(engine, "device", "")),
            "dtype": str(getattr(engine, "dtype", "")).replace("torch.", ""),
            "max_batch": getattr(engine, "max_batch", None),
            "max_prefill_tokens": getattr(engine, "max_prefill_tokens", None)}


def create_app(state: ServerState) -> FastAPI:
    """The FastAPI app over ``state`` (the engine, or a loader run in a thread at startup)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if state.engine is None and state.loader is not None:
            threading.Thread(target=state.load, daemon=True, name="gptlab-load").start()
        yield
        if state.engine is not None:
            # uvicorn has already let open requests finish (its graceful timeout); stop the decode thread.
            await asyncio.to_thread(state.engine.shutdown, state.shutdown_deadline_s)

    app = FastAPI(title="gptlab", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gptlab = state

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return _error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        msg = {404: f"no such endpoint: {request.method} {request.url.path}",
               405: f"method {request.method} is not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        return _error_response(APIError(e.status_code, msg, code="not_found" if e.status_code == 404 else None,
                                        headers=dict(e.headers or {})))

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception) -> JSONResponse:
        # A bug must cost one request, never the server.
        return _error_response(APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error"))

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.engine is None:
            status = "error" if state.load_error else "loading"
            return JSONResponse({"status": status, **({"error": str(state.load_error)} if state.load_error else {})},
                                status_code=503)
        return JSONResponse({"status": "ok", "model": state.engine.name})

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        engine = state.require_engine()
        return JSONResponse({"object": "list", "data": [
            {"id": engine.name, "object": "model", "created": state.created, "owned_by": "gptlab",
             "max_model_len": int(engine.max_seq_len)}]})

    @app.get("/v1/info")
    async def info() -> JSONResponse:
        return JSONResponse(model_info(state.require_engine()))

    @app.post("/v1/completions")
    async def _completions(request: Request) -> Response:
        return await completions(state, request)

    @app.post("/v1/chat/completions")
    async def _chat(request: Request) -> Response:
        engine = state.require_engine()
        body = parse_json(await read_body(request))
        req = validate(ChatCompletionRequest, body)
        check_model(engine, req.model)
        return await chat.chat_completions(state, engine, req, body, request)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def playground() -> HTMLResponse:
        return HTMLResponse(playground_html())

    endpoints = frozenset(r.path for r in app.routes if hasattr(r, "path"))
    app.add_middleware(GuardMiddleware, state=state, endpoints=endpoints)
    return app
