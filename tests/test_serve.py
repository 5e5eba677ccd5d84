"""``gptlab serve`` end to end: a live server subprocess over a tiny run, driven by the official ``openai`` client.

References are independent of the server: greedy text and per-token log-probabilities are recomputed in
this process with the model itself (a full forward, no KV cache, no engine).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import fastapi  # noqa: E402,F401  (in [dev]: a missing one fails, never skips)
import uvicorn  # noqa: E402,F401  (in [dev]: a missing one fails, never skips)
import prometheus_client  # noqa: E402,F401  (in [dev]: a missing one fails, never skips)
import openai  # noqa: E402
import httpx  # noqa: E402
import torch  # noqa: E402

from serve_util import BLOCK_SIZE, LiveServer, make_run  # noqa: E402

KEY = "sk-test-0123456789"
SERVE_ARGS = ("--max-batch", "16", "--max-prefill-tokens", "64")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("serve") / "run")


@pytest.fixture(scope="module")
def model_name(client):
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def reference(run_dir):
    """The served model and tokenizer, loaded here: greedy decoding and scoring by plain full forwards."""
    from gptlab.loading import load_model

    model, tok = load_model(run_dir)

    @torch.no_grad()
    def greedy(prompt: str, n: int) -> str:
        ids = tok.encode(prompt)
        out = []
        for _ in range(n):
            logits, _ = model(torch.tensor([ids + out]))
            out.append(int(logits[0, -1].argmax()))
        return tok.decode(out)

    @torch.no_grad()
    def token_logprobs(ids: list[int]) -> list[float]:
        logits, _ = model(torch.tensor([ids]))
        # the per-token losses `gptlab eval loss` averages, negated
        return (-torch.nn.functional.cross_entropy(logits[0, :-1].float(), torch.tensor(ids[1:]),
                                                   reduction="none")).tolist()

    return type("Ref", (), {"greedy": staticmethod(greedy), "logprobs": staticmethod(token_logprobs), "tok": tok})


def _error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


# --------------------------------------------------------------------------- happy paths


def test_health_models_info(server, client):
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    models = client.models.list().data
    assert len(models) == 1 and models[0].id == str(server.init)
    info = httpx.get(server.url + "/v1/info").json()
    assert info["max_model_len"] == BLOCK_SIZE and info["chat_template"] is False and info["tokenizer"] == "gpt2"
    assert info["max_prefill_tokens"] == 64 and info["max_batch"] == 16


def test_greedy_completion_equals_reference(client, model_name, reference):
    prompt = "The quick brown fox"
    r = client.completions.create(model=model_name, prompt=prompt, max_tokens=12, temperature=0)
    assert r.object == "text_completion" and len(r.choices) == 1
    assert r.choices[0].text == reference.greedy(prompt, 12)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(reference.tok.encode(prompt))
    assert r.usage.completion_tokens == 12 and r.usage.total_tokens == r.usage.prompt_tokens + 12


def test_streaming_equals_non_streaming(server, client, model_name):
    kw = dict(model=model_name, prompt="Once upon a time", max_tokens=20, temperature=0)
    whole = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    # the raw event stream: one JSON object per data line, then the [DONE] sentinel
    with httpx.stream("POST", server.url + "/v1/completions", json={**kw, "stream": True,
                                                                   "stream_options": {"include_usage": True}}) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    usage = json.loads(lines[-2][len("data: "):])["usage"]
    assert usage["completion_tokens"] == 20


def test_n_and_prompt_lists(client, model_name, reference):
    prompts = ["Hello there", "A longer second prompt"]
    r = client.completions.create(model=model_name, prompt=prompts, n=3, max_tokens=6, temperature=1.0, seed=7)
    assert sorted(c.index for c in r.choices) == list(range(6))
    texts = [c.text for c in sorted(r.choices, key=lambda c: c.index)]
    assert len(set(texts[:3])) == 3 and len(set(texts[3:])) == 3  # n choices are n different samples
    assert r.usage.prompt_tokens == sum(len(reference.tok.encode(p)) for p in prompts)
    assert r.usage.completion_tokens == 6 * 6
    # token-id prompts (what lm-evaluation-harness sends) give the same as the text they encode
    ids = reference.tok.encode(prompts[0])
    same = client.completions.create(model=model_name, prompt=[ids], n=3, max_tokens=6, temperature=1.0, seed=7)
    assert [c.text for c in sorted(same.choices, key=lambda c: c.index)] == texts[:3]


def test_seed_reproducible(client, model_name):
    kw = dict(model=model_name, prompt="Seeded", max_tokens=10, temperature=1.0, top_p=0.9, extra_body={"top_k": 50})
    a = client.completions.create(seed=1234, **kw).choices[0].text
    b = client.completions.create(seed=1234, **kw).choices[0].text
    c = client.completions.create(seed=4321, **kw).choices[0].text
    assert a == b and a != c


def test_stop_sequences(client, model_name, reference):
    prompt = "Stop here"
    full = client.completions.create(model=model_name, prompt=prompt, max_tokens=24, temperature=0).choices[0].text
    assert full == reference.greedy(prompt, 24)
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip(), full
    r = client.completions.create(model=model_name, prompt=prompt, max_tokens=24, temperature=0, stop=[stop, "zzzz"])
    assert r.choices[0].text == full[:full.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    # a stop string that never appears changes nothing
    r2 = client.completions.create(model=model_name, prompt=prompt, max_tokens=24, temperature=0, stop="\u2603\u2603")
    assert r2.choices[0].text == full and r2.choices[0].finish_reason == "length"


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echo_logprobs_score_the_prompt(server, model_name, reference, max_tokens):
    """lm-evaluation-harness's ``local-completions`` loglikelihood request (echo + logprobs, 0 or 1 new token)."""
    ids = reference.tok.encode("The meaning of life is forty two, said the computer.")
    body = {"model": model_name, "prompt": [ids], "max_tokens": max_tokens, "temperature": 0, "logprobs": 1,
            "echo": True, "seed": 1234}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(ids) + max_tokens
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    want = reference.logprobs(ids)
    assert lp["token_logprobs"][1:len(ids)] == pytest.approx(want, abs=1e-4)
    assert choice["text"].startswith(reference.tok.decode(ids))
    for got, top in zip(lp["token_logprobs"][1:len(ids)], lp["top_logprobs"][1:len(ids)]):
        assert max(top.values()) >= got - 1e-6  # the alternatives include the most likely token
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] == len(ids) and usage["completion_tokens"] == max_tokens


def test_sixteen_concurrent_clients_equal_single_requests(server, client, model_name):
    prompts = [f"Client number {i} says" + " hello" * (i % 5) for i in range(16)]
    kw = dict(model=model_name, max_tokens=16, temperature=0)
    alone = [client.completions.create(prompt=p, **kw).choices[0].text for p in prompts]
    start = threading.Barrier(16)

    def one(p: str) -> str:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        start.wait()
        return c.completions.create(prompt=p, **kw).choices[0].text

    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(one, prompts))
    assert together == alone


def test_disconnect_cancels_the_row(server, model_name):
    before = server.metrics().get('gptlab_rows_finished_total{reason="cancelled"}', 0.0)
    body = {"model": model_name, "prompt": "Talk for a long time", "max_tokens": BLOCK_SIZE - 16, "temperature": 0,
            "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as resp:
        it = resp.iter_lines()
        got = [line for line in (next(it) for _ in range(12)) if line.startswith("data: ")]
        t_first = time.perf_counter()
        for _ in range(10):  # time a few more tokens to know how long the rest would take
            next(it)
        per_token = (time.perf_counter() - t_first) / 5  # 10 lines = 5 events (data line + blank line)
    t_gone = time.perf_counter()
    assert len(got) >= 5
    remaining_s = per_token * (BLOCK_SIZE - 16 - 12)
    while True:
        m = server.metrics()
        if m["gptlab_running_rows"] == 0 and m.get('gptlab_rows_finished_total{reason="cancelled"}', 0) > before:
            break
        assert time.perf_counter() - t_gone < max(2.0, remaining_s / 2), "the row was not cancelled"
        time.sleep(0.02)
    # and the server is fine afterwards
    ok = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200


# --------------------------------------------------------------------------- bad input


def _too_long(n: int) -> list[int]:
    return [50] * n


BAD = [
    # (id, raw body or JSON object, status, param)
    ("malformed-json", b'{"prompt": "x",', 400, None),
    ("not-utf8", b'\xff\xfe{', 400, None),
    ("not-an-object", [1, 2], 400, None),
    ("prompt-missing", {"max_tokens": 3}, 400, "prompt"),
    ("prompt-wrong-type", {"prompt": 5}, 400, "prompt"),
    ("prompt-mixed-list", {"prompt": ["a", 3]}, 400, "prompt"),
    ("prompt-empty-list", {"prompt": []}, 400, "prompt"),
    ("prompt-empty-ids", {"prompt": [[]]}, 400, "prompt"),
    ("token-id-out-of-vocab", {"prompt": [[1, 99999999]]}, 400, "prompt"),
    ("token-id-negative", {"prompt": [-1]}, 400, "prompt"),
    ("prompt-longer-than-context", {"prompt": [_too_long(BLOCK_SIZE + 1)], "max_tokens": 0, "echo": True}, 400,
     "prompt"),
    ("prompt-plus-completion-too-long", {"prompt": [_too_long(BLOCK_SIZE - 4)], "max_tokens": 10}, 400, "max_tokens"),
    ("max-tokens-negative", {"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("max-tokens-string", {"prompt": "x", "max_tokens": "10"}, 400, "max_tokens"),
    ("max-tokens-float", {"prompt": "x", "max_tokens": 1.5}, 400, "max_tokens"),
    ("max-tokens-bool", {"prompt": "x", "max_tokens": True}, 400, "max_tokens"),
    ("temperature-range", {"prompt": "x", "temperature": 2.5}, 400, "temperature"),
    ("temperature-type", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("top-p-zero", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("top-k-negative", {"prompt": "x", "top_k": -5}, 400, "top_k"),
    ("n-zero", {"prompt": "x", "n": 0}, 400, "n"),
    ("n-huge", {"prompt": "x", "n": 100000}, 400, "n"),
    ("stop-too-many", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("stop-wrong-type", {"prompt": "x", "stop": 3}, 400, "stop"),
    ("stop-empty-string", {"prompt": "x", "stop": [""]}, 400, "stop"),
    ("logprobs-range", {"prompt": "x", "logprobs": 99}, 400, "logprobs"),
    ("stream-wrong-type", {"prompt": "x", "stream": "yes"}, 400, "stream"),
    ("seed-wrong-type", {"prompt": "x", "seed": "abc"}, 400, "seed"),
    ("unknown-field", {"prompt": "x", "bogus": 1}, 400, "bogus"),
    ("unknown-field-wrong-type", {"prompt": "x", "max_tokenz": "many"}, 400, "max_tokenz"),
    ("unsupported-penalty", {"prompt": "x", "frequency_penalty": 1.0}, 400, "frequency_penalty"),
    ("unknown-model", {"prompt": "x", "model": "gpt-9"}, 404, "model"),
]


@pytest.mark.parametrize("body,status,param", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_an_openai_error(server, body, status, param):
    if isinstance(body, bytes):
        kw = {"content": body, "headers": {"content-type": "application/json"}}
    else:
        kw = {"json": body}
    err = _error(httpx.post(server.url + "/v1/completions", timeout=30, **kw), status)
    assert err["param"] == param, err


def test_other_errors_and_server_survives(server, client, model_name):
    _error(httpx.get(server.url + "/v1/nope"), 404)
    _error(httpx.get(server.url + "/v1/completions"), 405)
    err = _error(httpx.post(server.url + "/v1/chat/completions",
                            json={"model": model_name, "messages": [{"role": "user", "content": "hi"}]}), 400)
    assert "no chat template" in err["message"]
    _error(httpx.post(server.url + "/v1/chat/completions", json={"messages": "hi"}), 400)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model=model_name, prompt=[[50] * (BLOCK_SIZE - 1)], max_tokens=5)
    r = client.completions.create(model=model_name, prompt="still alive", max_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3


def test_metrics_parse(server, client, model_name):
    client.completions.create(model=model_name, prompt="count me", max_tokens=4, temperature=0)
    httpx.post(server.url + "/v1/completions", json={"prompt": 1})
    m = server.metrics()
    assert m['gptlab_requests_total{endpoint="/v1/completions",status="200"}'] >= 1
    assert m['gptlab_requests_total{endpoint="/v1/completions",status="400"}'] >= 1
    assert m["gptlab_prompt_tokens_total"] >= 2 and m["gptlab_generation_tokens_total"] >= 4
    assert m["gptlab_time_to_first_token_seconds_count"] >= 1
    assert m["gptlab_inter_token_latency_seconds_count"] >= 3
    assert "gptlab_queue_length" in m and "gptlab_running_rows" in m
    assert m['gptlab_time_to_first_token_seconds_bucket{le="+Inf"}'] == m["gptlab_time_to_first_token_seconds_count"]


# --------------------------------------------------------------------------- auth, queue limit, shutdown


@pytest.fixture(scope="module")
def keyed(run_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("keyed")
    (d / "key").write_text(KEY + "\n")
    srv = LiveServer(run_dir, d / "serve.log", "--api-key-file", str(d / "key"), "--max-batch", "1",
                     "--max-queue", "1", api_key=KEY).wait_ready()
    yield srv
    srv.stop()


def test_auth(keyed, model_name):
    url = keyed.url
    assert httpx.get(url + "/health").status_code == 200  # never needs the key
    assert httpx.get(url + "/").status_code == 200        # the page itself; its API calls carry the key
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}):
        resp = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 1}, headers=headers)
        assert _error(resp, 401)["code"] == "invalid_api_key"
        assert resp.headers["www-authenticate"] == "Bearer"
    _error(httpx.get(url + "/metrics"), 401)
    _error(httpx.get(url + "/v1/models"), 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    good = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    assert good.completions.create(model=model_name, prompt="x", max_tokens=2).usage.completion_tokens == 2


def _wait_metric(srv: LiveServer, name: str, value: float, timeout: float = 30.0) -> None:
    t0 = time.time()
    while srv.metrics()[name] != value:
        assert time.time() - t0 < timeout, f"{name} never reached {value}: {srv.metrics()}"
        time.sleep(0.02)


def test_queue_full_is_429_with_retry_after(keyed, model_name):
    """--max-batch 1 --max-queue 1: one row runs, one waits, the next request is refused."""
    body = {"model": model_name, "prompt": "long", "max_tokens": BLOCK_SIZE - 8, "stream": True, "ignore_eos": True}
    h = keyed.headers()
    with httpx.Client(timeout=60, headers=h) as c1, httpx.Client(timeout=60, headers=h) as c2:
        with c1.stream("POST", keyed.url + "/v1/completions", json=body) as running:
            lines = running.iter_lines()  # kept referenced: a collected line iterator closes the connection
            next(lines)
            _wait_metric(keyed, "gptlab_running_rows", 1)
            with c2.stream("POST", keyed.url + "/v1/completions", json=body) as queued:
                assert queued.status_code == 200
                _wait_metric(keyed, "gptlab_queue_length", 1)
                refused = httpx.post(keyed.url + "/v1/completions", json={"prompt": "x", "max_tokens": 1}, headers=h)
                assert _error(refused, 429)["code"] == "rate_limit_exceeded"
                assert int(refused.headers["retry-after"]) >= 1
                too_many = httpx.post(keyed.url + "/v1/completions", json={"prompt": "x", "n": 2}, headers=h)
                assert _error(too_many, 400)["param"] == "n"  # can never fit: not worth retrying
    _wait_metric(keyed, "gptlab_running_rows", 0)
    _wait_metric(keyed, "gptlab_queue_length", 0)
    ok = httpx.post(keyed.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, headers=h, timeout=60)
    assert ok.status_code == 200


def test_sigterm_lets_running_requests_finish(run_dir, tmp_path):
    srv = LiveServer(run_dir, tmp_path / "serve.log", "--shutdown-timeout", "60").wait_ready()
    try:
        n = 60
        body = {"prompt": "finish me", "max_tokens": n, "temperature": 0, "stream": True, "ignore_eos": True,
                "stream_options": {"include_usage": True}}
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as resp:
            it = resp.iter_lines()
            first = next(it)
            srv.proc.send_signal(signal.SIGTERM)
            lines = [first] + [line for line in it if line]
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][6:])["usage"]["completion_tokens"] == n
        assert json.loads(lines[-3][6:])["choices"][0]["finish_reason"] == "length"
        assert srv.proc.wait(60) == 0
        with pytest.raises(httpx.ConnectError):  # no longer listening
            httpx.get(srv.url + "/health", timeout=5)
    finally:
        srv.stop()


def test_cli_errors(run_dir, tmp_path):
    from gptlab.cli import main

    assert main(["serve", "--init", str(run_dir), "--port", "70000"]) == 1
    assert main(["serve", "--init", str(run_dir), "--max-prefill-tokens", "0"]) == 1
    assert main(["serve", "--init", str(run_dir), "--api-key-file", str(tmp_path / "missing")]) == 1
    (tmp_path / "empty").write_text("\n")
    assert main(["serve", "--init", str(run_dir), "--api-key-file", str(tmp_path / "empty")]) == 1


def test_cli_load_failure_and_busy_port(run_dir, tmp_path):
    import socket

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    bad = subprocess.run([sys.executable, "-m", "gptlab", "serve", "--init", str(tmp_path / "missing"), "--port", "0"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert bad.returncode == 1 and "not found" in bad.stderr.splitlines()[-1], bad.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        taken = subprocess.run([sys.executable, "-m", "gptlab", "serve", "--init", str(run_dir), "--port", str(port)],
                               capture_output=True, text=True, timeout=300, env=env)
    assert taken.returncode == 1 and "could not listen" in taken.stderr.splitlines()[-1], taken.stderr


def test_bench_serve_against_a_running_server(server, run_dir):
    """``gptlab bench serve --url``: the issue's JSON keys, exact token counts, and --vs-hf on the same weights."""
    out = subprocess.run([sys.executable, "-m", "gptlab", "bench", "serve", "--model", str(run_dir),
                          "--url", server.url, "--clients", "4", "--requests", "6", "--prompt-tokens", "8",
                          "--max-tokens", "5", "--one-client-requests", "2", "--ramp-up", "0.2", "--vs-hf", "--json"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    for key in ("output_tokens_per_s", "one_client_tokens_per_s", "speedup_vs_one_client", "hf_tokens_per_s",
                "speedup_vs_hf", "ttft_p50_ms", "ttft_p99_ms", "ttft_unloaded_ms", "itl_p50_ms", "itl_p99_ms"):
        assert isinstance(r[key], float) and r[key] >= 0, (key, r[key])
    assert r["output_tokens"] == 6 * 5
    assert r["speedup_vs_one_client"] == pytest.approx(r["output_tokens_per_s"] / r["one_client_tokens_per_s"])


def test_bench_serve_starts_its_own_server(run_dir):
    """Without --url, ``gptlab bench serve`` starts ``gptlab serve`` on a free port, measures, and stops it."""
    out = subprocess.run([sys.executable, "-m", "gptlab", "bench", "serve", "--model", str(run_dir),
                          "--clients", "2", "--requests", "2", "--prompt-tokens", "4", "--max-tokens", "3",
                          "--one-client-requests", "1", "--json"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["output_tokens"] == 2 * 3 and r["output_tokens_per_s"] > 0
