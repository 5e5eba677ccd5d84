"""The OpenAI wire format: request validation and error bodies.

Requests are validated strictly (a string where a number belongs is a 400, not a guess) and every
failure becomes OpenAI's error shape ``{"error": {"message", "type", "param", "code"}}`` with the
status the OpenAI API uses, so clients written for it (the ``openai`` package, lm-evaluation-harness)
report our errors the way they report theirs.
"""

from __future__ import annotations

import json
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, ValidationError

# OpenAI caps stop sequences at 4; more would make every decode step scan more text for nothing.
MAX_STOP = 4
MAX_N = 128
MAX_LOGPROBS = 20


class APIError(Exception):
    """An error answered as OpenAI-style JSON with HTTP ``status``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    # strict: 1.5 is not an int, "1" is not a number, true is not a number; unknown keys are refused
    # as OpenAI does ("Unrecognized request argument supplied").
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class SamplingRequest(_Strict):
    """The fields the completions and chat completions bodies share (OpenAI's, plus vLLM's ``top_k``)."""

    model: Optional[str] = None
    temperature: Optional[float] = 1.0
    top_p: Optional[float] = 1.0
    top_k: Optional[int] = None
    n: int = 1
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    # Accepted only at their neutral values: a client that sends the default must not be refused.
    frequency_penalty: Optional[float] = 0.0
    presence_penalty: Optional[float] = 0.0
    logit_bias: Optional[dict[str, float]] = None


class CompletionRequest(SamplingRequest):
    """``POST /v1/completions`` body (OpenAI legacy completions, plus vLLM's ``ignore_eos``)."""

    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = 16
    echo: bool = False
    logprobs: Optional[int] = None
    ignore_eos: bool = False
    best_of: Optional[int] = None  # neutral value only, as the penalties
    suffix: Optional[str] = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: Union[str, list[Any], None] = None


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions`` body: only ``messages`` is checked here; the chat code checks the rest."""

    model_config = ConfigDict(extra="allow")
    model: Optional[str] = None
    messages: list[ChatMessage]


def parse_json(raw: bytes) -> Any:
    """The request body as JSON, or a 400 saying why it is not."""
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        where = f" (line {e.lineno} column {e.colno})" if isinstance(e, json.JSONDecodeError) else ""
        raise APIError(400, f"could not parse the JSON body of your request{where}: {e.args[0] if e.args else e}; "
                            "send a JSON object with Content-Type: application/json", code="invalid_json") from None


_TYPE_WORDS = {"int_type": "an integer", "int_from_float": "an integer", "float_type": "a number",
               "bool_type": "a boolean", "string_type": "a string", "list_type": "an array",
               "dict_type": "an object", "model_type": "an object"}
_PROMPT_SHAPES = "a string, an array of strings, an array of token ids, or an array of arrays of token ids"


def validate(model: type[BaseModel], body: Any) -> Any:
    """``body`` parsed as ``model``, or a 400 naming the first bad field."""
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}",
                       code="invalid_type")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        loc = [str(x) for x in err["loc"]]
        param = loc[0] if loc else None
        if err["type"] == "extra_forbidden":
            raise APIError(400, f"Unrecognized request argument supplied: {param}", param=param,
                           code="unknown_parameter") from None
        if err["type"] == "missing":
            raise APIError(400, f"'{'.'.join(loc)}' is a required property", param=param,
                           code="missing_required_parameter") from None
        if param == "prompt":
            raise APIError(400, f"'prompt' must be {_PROMPT_SHAPES}", param="prompt", code="invalid_type") from None
        want = _TYPE_WORDS.get(err["type"])
        got = json.dumps(err.get("input"))[:60]
        # A Union field reports one error per alternative; its loc holds the alternative's name, not a path.
        path = ".".join(x for x in loc if not x.startswith(("list[", "str", "int", "float", "bool", "dict")))
        msg = (f"'{path}' must be {want}, got {got}" if want else f"'{path}': {err['msg']} (got {got})")
        raise APIError(400, msg, param=param, code="invalid_type") from None


def check_completion(req: CompletionRequest) -> None:
    """Value ranges the types alone do not catch (each a 400 naming the parameter)."""

    def bad(param: str, why: str) -> APIError:
        return APIError(400, f"'{param}' {why}", param=param, code="invalid_value")

    if req.max_tokens is not None and req.max_tokens < 0:
        raise bad("max_tokens", f"must be >= 0, got {req.max_tokens}")
    if req.temperature is not None and not 0.0 <= req.temperature <= 2.0:
        raise bad("temperature", f"must be between 0 and 2, got {req.temperature}")
    if req.top_p is not None and not 0.0 < req.top_p <= 1.0:
        raise bad("top_p", f"must be in (0, 1], got {req.top_p}")
    if req.top_k is not None and req.top_k < -1:
        raise bad("top_k", f"must be >= 1 (or -1 / 0 for no limit), got {req.top_k}")
    if not 1 <= req.n <= MAX_N:
        raise bad("n", f"must be between 1 and {MAX_N}, got {req.n}")
    if req.logprobs is not None and not 0 <= req.logprobs <= MAX_LOGPROBS:
        raise bad("logprobs", f"must be between 0 and {MAX_LOGPROBS}, got {req.logprobs}")
    if req.seed is not None and not -(2 ** 63) <= req.seed < 2 ** 63:
        raise bad("seed", "must fit in a signed 64-bit integer")
    stops = stop_list(req.stop)
    if len(stops) > MAX_STOP:
        raise bad("stop", f"takes at most {MAX_STOP} sequences, got {len(stops)}")
    if any(s == "" for s in stops):
        raise bad("stop", "sequences must be non-empty strings")
    if isinstance(req.prompt, list) and len(req.prompt) == 0:
        raise bad("prompt", "must not be an empty array")
    if req.best_of is not None and req.best_of != req.n:
        raise bad("best_of", "is not supported (leave it unset or equal to n)")
    if req.frequency_penalty or req.presence_penalty:
        raise bad("frequency_penalty" if req.frequency_penalty else "presence_penalty", "is not supported (use 0)")
    if req.logit_bias:
        raise bad("logit_bias", "is not supported")
    if req.suffix:
        raise bad("suffix", "is not supported")


def stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)
