"""``POST /v1/chat/completions`` on a live ``gptlab serve`` over a tiny chat model, driven by the ``openai`` client.

The reference is computed here, independently of the server and the engine: the messages rendered with
the chat template, then greedy full forwards until a turn token or end-of-text.
"""

from __future__ import annotations

import pytest

import fastapi  # noqa: E402,F401  (in [dev]: a missing one fails, never skips)
import uvicorn  # noqa: E402,F401  (in [dev]: a missing one fails, never skips)
import prometheus_client  # noqa: E402,F401  (in [dev]: a missing one fails, never skips)
import openai  # noqa: E402
import httpx  # noqa: E402
import torch  # noqa: E402

from serve_util import make_run  # noqa: E402

MSGS = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello, who are you?"}]
SERVE_ARGS = ("--max-batch", "8")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run dir with a tiny random GPT-2-vocabulary chat model (GPT-2 BPE + the six turn tokens)."""
    return make_run(tmp_path_factory.mktemp("chatserve") / "run", seed=1, block_size=128, chat=True)


@pytest.fixture(scope="module")
def reference(run_dir):
    from gptlab.chat import ChatTemplate
    from gptlab.loading import load_model

    model, tok = load_model(run_dir)
    tmpl = ChatTemplate.for_tokenizer(tok)
    ends = set(tok.special_tokens.values())  # <|endoftext|> and the six turn tokens

    @torch.no_grad()
    def greedy(messages: list[dict[str, str]], n: int) -> tuple[str, list[int], str]:
        ids = tmpl.prompt(messages)
        x = torch.tensor([ids])
        out: list[int] = []
        for _ in range(n):
            t = int(model(x)[0][0, -1].argmax())
            if t in ends:
                return tok.decode(out), ids, "stop"
            out.append(t)
            x = torch.cat([x, torch.tensor([[t]])], dim=1)
        return tok.decode(out), ids, "length"

    return greedy


def test_info_says_chat(server):
    assert httpx.get(server.url + "/v1/info").json()["chat_template"] is True


def test_greedy_reply_equals_reference(client, reference):
    name = client.models.list().data[0].id
    for msgs in (MSGS, MSGS[1:], [*MSGS, {"role": "assistant", "content": "A model."},
                                   {"role": "user", "content": "Say more."}]):
        r = client.chat.completions.create(model=name, messages=msgs, max_tokens=24, temperature=0)
        text, prompt, finish = reference(msgs, 24)
        assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
        assert r.choices[0].message.content == text and r.choices[0].finish_reason == finish
        assert r.usage.prompt_tokens == len(prompt)
        assert "<|" not in r.choices[0].message.content


def test_streaming_equals_non_streaming(client):
    name = client.models.list().data[0].id
    kw = dict(model=name, messages=MSGS, max_tokens=24, temperature=0.8, seed=7, n=2)
    whole = client.chat.completions.create(**kw)
    parts = {0: "", 1: ""}
    roles, finish, chunks = set(), {}, 0
    for ch in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if not ch.choices:
            assert ch.usage.completion_tokens == whole.usage.completion_tokens
            continue
        chunks += 1
        c = ch.choices[0]
        assert ch.object == "chat.completion.chunk"
        if c.delta.role:
            roles.add(c.index)
        parts[c.index] += c.delta.content or ""
        if c.finish_reason:
            finish[c.index] = c.finish_reason
    assert roles == {0, 1}
    assert [parts[0], parts[1]] == [c.message.content for c in whole.choices]
    assert finish == {c.index: c.finish_reason for c in whole.choices}
    assert chunks == whole.usage.completion_tokens  # one chunk per generated token


def test_logprobs(client, run_dir):
    from gptlab.loading import load_model

    name = client.models.list().data[0].id
    r = client.chat.completions.create(model=name, messages=MSGS, max_tokens=5, temperature=0, logprobs=True,
                                       top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for e in content:
        assert len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob
        assert e.logprob == pytest.approx(e.top_logprobs[0].logprob, abs=1e-4)  # greedy: the top token


@pytest.mark.parametrize("body, frag", [
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, "last message"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "role 'tool'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "alternate"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "only text parts"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 5}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, "maximum context length"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, "at most"),
    ({"messages": [{"role": "user", "content": "hi"}], "functions": []}, "functions"),
])
def test_bad_chat_requests_are_openai_errors(server, body, frag):
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert frag in err["message"] and err["type"] == "invalid_request_error"
    assert httpx.get(server.url + "/health").status_code == 200


def test_text_parts_and_max_completion_tokens(client, reference):
    name = client.models.list().data[0].id
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "who?"}]}]
    r = client.chat.completions.create(model=name, messages=msgs, max_completion_tokens=6, temperature=0)
    assert r.choices[0].message.content == reference([{"role": "user", "content": "Hello, who?"}], 6)[0]
