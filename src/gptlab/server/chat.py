"""``POST /v1/chat/completions``: the one place chat lives in the server.

Models without a chat template answer 400. A model with one (its tokenizer carries the turn tokens of
:mod:`gptlab.chat`) renders ``messages`` through that template into prompt ids -- the same ids
``gptlab chat``, ``sample --chat`` and transformers' ``apply_chat_template`` give -- and then runs
exactly the completion path (:func:`gptlab.server.app.submit_rows` / :func:`~gptlab.server.app.run_rows`)
with the template's end-of-turn tokens as extra stop strings. Responses follow OpenAI's chat format:
``chat.completion`` objects, or ``chat.completion.chunk`` server-sent events (one per generated token,
the first carrying the role) ending with ``data: [DONE]``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, AsyncIterator, Iterable, Optional

from gptlab.server.protocol import APIError, ChatCompletionRequest, SamplingRequest, validate


class ChatBody(SamplingRequest):
    """The chat request's fields gptlab acts on (OpenAI's chat completions, plus vLLM's ``top_k``)."""

    messages: list[Any]
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = None


def chat_template(engine: Any) -> Any | None:
    """The model's :class:`gptlab.chat.ChatTemplate`, or None when it has none (the playground hides its chat
    view then)."""
    from gptlab.chat import ChatTemplate, has_chat_tokens

    tok = getattr(engine, "tokenizer", None)
    return ChatTemplate.for_tokenizer(tok) if has_chat_tokens(tok) else None


def _messages(raw: list[Any]) -> list[dict[str, str]]:
    """OpenAI messages -> validated ``{role, content}`` (content parts of type text are joined)."""
    from gptlab.chat import ChatError, validate_messages

    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise APIError(400, f"messages[{i}] must be an object with 'role' and 'content'", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(400, f"messages[{i}].content: only text parts are supported by this model",
                               param="messages")
            content = "".join(p["text"] for p in content)
        out.append({"role": m.get("role"), "content": content})
    try:
        msgs = validate_messages(out, "messages", need_assistant=False)
    except ChatError as e:
        raise APIError(400, str(e), param="messages", code="invalid_messages") from None
    if msgs[-1]["role"] != "user":
        raise APIError(400, f"the last message must come from the user (got {msgs[-1]['role']!r}): the model "
                            "answers with the next assistant turn", param="messages", code="invalid_messages")
    return msgs


def _completion_request(body: ChatBody, prompt: list[int], stops: list[str]) -> Any:
    """The equivalent /v1/completions request (validated by the same rules there)."""
    from gptlab.server.protocol import CompletionRequest, check_completion

    if body.max_tokens is not None and body.max_completion_tokens is not None:
        raise APIError(400, "give max_tokens or max_completion_tokens, not both", param="max_completion_tokens")
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    user_stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    req = CompletionRequest(prompt=prompt, max_tokens=body.max_completion_tokens if body.max_tokens is None
                            else body.max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                            n=body.n, stop=user_stop, seed=body.seed, stream=body.stream,
                            stream_options=body.stream_options,
                            logprobs=(body.top_logprobs or 0) if body.logprobs else None, user=body.user,
                            frequency_penalty=body.frequency_penalty, presence_penalty=body.presence_penalty,
                            logit_bias=body.logit_bias)
    check_completion(req)  # the user's stop strings count against the limit, the template's do not
    return req.model_copy(update={"stop": user_stop + stops})


def _logprobs(engine: Any, ids: list[int], lps: list[Any], tops: list[Any], n_top: int) -> dict[str, Any]:
    """OpenAI's chat ``logprobs``: ``{"content": [{"token", "logprob", "bytes", "top_logprobs"}, ...]}``."""
    from gptlab.server.app import piece

    def entry(t: int, lp: Any) -> dict[str, Any]:
        s = piece(engine, t)
        return {"token": s, "logprob": None if lp is None else float(lp), "bytes": list(s.encode("utf-8"))}

    out = []
    for t, lp, top in zip(ids, lps, tops):
        alts = sorted((top or {}).items(), key=lambda kv: -kv[1])[:n_top]
        out.append({**entry(t, lp), "top_logprobs": [entry(a, v) for a, v in alts]})
    return {"content": out}


async def chat_completions(app_state: Any, engine: Any, req: ChatCompletionRequest, body: dict[str, Any],
                           http_request: Any) -> Any:
    """Answer a chat completion request (a 400 when this model has no chat template)."""
    from starlette.background import BackgroundTask
    from starlette.responses import JSONResponse, Response, StreamingResponse

    from gptlab.server.app import cancel_unfinished, collect_rows, submit_rows, token_budget

    t0 = time.perf_counter()
    tmpl = chat_template(engine)
    if tmpl is None:
        raise APIError(400, f"model {engine.name!r} has no chat template; use /v1/completions with a plain "
                            "prompt, or serve a model whose tokenizer defines a chat template",
                       param="messages", code="no_chat_template")
    chat = validate(ChatBody, body)
    msgs = _messages(chat.messages)
    try:
        prompt = tmpl.prompt(msgs)
    except ValueError as e:  # e.g. a character outside a char-level vocabulary
        raise APIError(400, f"messages: {e}", param="messages", code="invalid_messages") from None
    creq = _completion_request(chat, prompt, tmpl.stop_texts)
    budgets = token_budget(engine, creq, [prompt])
    rows = submit_rows(app_state, engine, creq, [prompt], budgets)
    app_state.metrics.prompt_tokens.inc(len(prompt))
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    n_top = chat.top_logprobs or 0

    def usage() -> dict[str, int]:
        done = sum(len(r.ids) for r in rows)
        return {"prompt_tokens": len(prompt), "completion_tokens": done, "total_tokens": len(prompt) + done}

    if chat.stream:
        return StreamingResponse(_stream(app_state, engine, chat, rows, t0, cid, created, usage, n_top),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                 background=BackgroundTask(cancel_unfinished, app_state, rows))

    if not await collect_rows(app_state, rows, t0, http_request):
        return Response(status_code=499)
    choices = [{"index": r.index, "message": {"role": "assistant", "content": "".join(r.text)},
                "logprobs": _logprobs(engine, r.ids, r.logprobs, r.tops, n_top) if chat.logprobs else None,
                "finish_reason": r.finish_reason} for r in rows]
    return JSONResponse({"id": cid, "object": "chat.completion", "created": created, "model": engine.name,
                         "choices": choices, "usage": usage()})


def _stream(app_state: Any, engine: Any, chat: ChatBody, rows: list[Any], t0: float, cid: str, created: int,
            usage: Any, n_top: int) -> AsyncIterator[str]:
    from gptlab.server.app import _sse, event_top, sse_stream

    base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": engine.name}

    def chunk(index: int, delta: dict[str, Any], finish: str | None, lp: Any = None) -> str:
        return _sse({**base, "choices": [{"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}]})

    started: set[int] = set()

    def head() -> Iterable[str]:
        for r in rows:
            if r.handle is None:  # max_tokens 0: nothing to generate
                started.add(r.index)
                yield chunk(r.index, {"role": "assistant", "content": ""}, r.finish_reason)

    def on_event(row: Any, ev: Any, has_token: bool) -> str | None:
        delta: dict[str, Any] = {"content": ev.text or ""}
        if row.index not in started:  # the role rides on the first chunk: one chunk per token
            started.add(row.index)
            delta = {"role": "assistant", **delta}
        lp = None
        if chat.logprobs and has_token:
            lp = _logprobs(engine, [int(ev.token_id)], [ev.logprob], [event_top(ev)], n_top)
        return chunk(row.index, delta, ev.finish_reason, lp) if ev.text or has_token or ev.finish_reason is not None \
            else None

    with_usage = chat.stream_options is not None and chat.stream_options.include_usage
    return sse_stream(app_state, rows, t0, base, head, on_event, usage if with_usage else None)
