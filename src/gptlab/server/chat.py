"""``POST /v1/chat/completions``: the one place chat lives in the server.

Models without a chat template answer 400. A model with one renders ``messages`` through its template
into prompt ids and then runs exactly the completion path (:func:`gptlab.server.app.run_rows`); filling
that in is :func:`chat_completions`'s job alone.
"""

from __future__ import annotations

from typing import Any

from gptlab.server.protocol import APIError, ChatCompletionRequest


def chat_template(engine: Any) -> Any | None:
    """The model's chat template, or None when it has none (the playground hides its chat view then)."""
    tok = getattr(engine, "tokenizer", None)
    return getattr(engine, "chat_template", None) or getattr(tok, "chat_template", None)


async def chat_completions(app_state: Any, engine: Any, req: ChatCompletionRequest, body: dict[str, Any],
                           http_request: Any) -> Any:
    """Answer a chat completion request (a 400 while this model has no chat template)."""
    if chat_template(engine) is None:
        raise APIError(400, f"model {engine.name!r} has no chat template; use /v1/completions with a plain "
                            "prompt, or serve a model whose tokenizer defines a chat template",
                       param="messages", code="no_chat_template")
    raise APIError(400, "chat completions are not implemented yet for chat-template models",
                   param="messages", code="not_implemented")
