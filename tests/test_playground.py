"""The web playground (``GET /``) in a real headless Chromium, driven by Playwright.

Uses the system's Chromium (Debian's ``chromium`` package; CI installs it in ``.ci/run``), not a browser
Playwright downloads. Set GPTLAB_PLAYGROUND_SCREENSHOT=path to also save the screenshot there
(docs/playground.png is made that way).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path

import pytest

import fastapi  # noqa: E402,F401  (in [dev]: a missing one fails, never skips)
import uvicorn  # noqa: E402,F401  (in [dev]: a missing one fails, never skips)
import httpx  # noqa: E402

from serve_util import LiveServer, make_run  # noqa: E402


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


CHROMIUM = _chromium()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("playground")
    srv = LiveServer(make_run(d / "run"), d / "serve.log", "--name", "tiny-gpt2").wait_ready()
    yield srv
    srv.stop()


def test_page_is_self_contained(server):
    resp = httpx.get(server.url + "/")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    html = resp.text
    # works offline: no script, style, font or image from anywhere but this server
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html, re.I), "the page loads something remote"
    assert "@import" not in html and "url(http" not in html
    for element_id in ("prompt", "temperature", "top_k", "top_p", "max_tokens", "seed", "generate", "stop-btn",
                       "output", "stats", "chat-view"):
        assert f'id="{element_id}"' in html


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the module (Playwright's sync API allows one running instance at a time)."""
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium); the browser test needs it")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


@contextlib.contextmanager
def _open_playground(browser, server):
    """The playground of ``server`` once it has read ``/v1/info``; afterwards, nothing was fetched elsewhere."""
    context = browser.new_context(viewport={"width": 1180, "height": 720}, device_scale_factor=1)
    pg = context.new_page()
    remote = []
    pg.on("request", lambda r: None if r.url.startswith(server.url) else remote.append(r.url))
    pg.goto(server.url + "/")
    pg.wait_for_selector("body[data-ready='1']", timeout=60_000)
    yield pg
    assert remote == [], f"the page fetched outside the server: {remote}"
    context.close()


@pytest.fixture(scope="module")
def page(browser, server):
    with _open_playground(browser, server) as pg:
        yield pg


def _settings(page, **values):
    for key, value in values.items():
        page.fill(f"#{key}", str(value))


def test_greedy_generation_shows_the_api_text(server, page, tmp_path):
    assert "tiny-gpt2" in page.text_content("#model-name")
    assert page.is_hidden("#tabs")  # no chat template: no chat view
    prompt = "Hello from the playground,"
    _settings(page, temperature=0, top_k=0, top_p=1, max_tokens=24, seed="")
    page.fill("#prompt", prompt)
    done = page.evaluate("Number(document.body.dataset.done || 0)")
    page.click("#generate")
    page.wait_for_function(f"Number(document.body.dataset.done || 0) > {done}", timeout=60_000)
    shown = page.text_content("#completion")
    api = httpx.post(server.url + "/v1/completions",
                     json={"prompt": prompt, "max_tokens": 24, "temperature": 0}, timeout=60).json()
    assert shown == api["choices"][0]["text"] and shown
    assert page.text_content("#prompt-echo") == prompt
    stats = page.text_content("#stats")
    assert re.search(r"24 tokens · [\d.]+ tokens/s", stats), stats
    assert page.text_content("#error") == ""
    shot = tmp_path / "playground.png"
    page.screenshot(path=str(shot), full_page=False)
    assert shot.stat().st_size > 10_000
    if os.environ.get("GPTLAB_PLAYGROUND_SCREENSHOT"):
        shutil.copy(shot, os.environ["GPTLAB_PLAYGROUND_SCREENSHOT"])


def test_stop_button_cancels_the_row(server, page):
    before = server.metrics().get('gptlab_rows_finished_total{reason="cancelled"}', 0.0)
    _settings(page, temperature=1, max_tokens=480)
    page.fill("#prompt", "A long story:")
    done = page.evaluate("Number(document.body.dataset.done || 0)")
    page.click("#generate")
    page.wait_for_function("document.getElementById('completion').textContent.length > 20", timeout=60_000)
    page.click("#stop-btn")
    page.wait_for_function(f"Number(document.body.dataset.done || 0) > {done}", timeout=30_000)
    assert "stopped" in page.text_content("#stats")
    m = server.metrics()
    for _ in range(200):
        if m.get('gptlab_rows_finished_total{reason="cancelled"}', 0.0) > before and m["gptlab_running_rows"] == 0:
            break
        page.wait_for_timeout(25)
        m = server.metrics()
    assert m.get('gptlab_rows_finished_total{reason="cancelled"}', 0.0) == before + 1
    assert m["gptlab_running_rows"] == 0


# --------------------------------------------------------------------------- the chat view (a chat-template model)


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory):
    d = tmp_path_factory.mktemp("playground-chat")
    run = make_run(d / "run", seed=1, block_size=128, chat=True)
    srv = LiveServer(run, d / "serve.log", "--name", "tiny-chat").wait_ready()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def chat_page(browser, chat_server):
    with _open_playground(browser, chat_server) as pg:
        yield pg


def _send(page, text: str) -> None:
    done = page.evaluate("Number(document.body.dataset.done || 0)")
    page.fill("#chat-input", text)
    page.press("#chat-input", "Enter")
    page.wait_for_function(f"Number(document.body.dataset.done || 0) > {done}", timeout=60_000)


def _shown(page) -> list[list[str]]:
    return page.eval_on_selector_all("#messages .msg", "els => els.map(e => [e.className, e.textContent])")


def test_chat_view_shows_the_api_replies_with_history(chat_server, chat_page):
    page = chat_page
    assert "tiny-chat" in page.text_content("#model-name")
    assert page.is_visible("#tabs") and page.is_hidden("#chat-view")  # a chat template: the tabs, completion first
    page.click("#tab-chat")
    assert page.is_visible("#chat-view") and page.is_hidden("#completion-view")
    # seeded sampling, not greedy: the random model's tied embeddings make its greedy reply a turn token (empty)
    _settings(page, temperature=1, top_k=0, top_p=1, max_tokens=12, seed=7)

    def api(messages):
        r = httpx.post(chat_server.url + "/v1/chat/completions",
                       json={"messages": messages, "max_tokens": 12, "temperature": 1, "seed": 7}, timeout=60).json()
        return r["choices"][0]["message"]["content"]

    sent = []
    page.on("request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/v1/chat/completions") else None)
    # the page sends the whole conversation so far, and shows what the API replies to it
    history: list[dict[str, str]] = []
    for text in ("reverse: a b c", "and now: x y z"):
        _send(page, text)
        history.append({"role": "user", "content": text})
        assert sent[-1]["messages"] == history and sent[-1]["stream"] is True
        assert (sent[-1]["temperature"], sent[-1]["seed"], sent[-1]["max_tokens"]) == (1, 7, 12)
        history.append({"role": "assistant", "content": api(history)})
        assert _shown(page) == [[f"msg {m['role']}", m["content"]] for m in history]
        assert page.text_content("#error") == ""
        assert re.search(r"\d+ tokens · ", page.text_content("#chat-stats"))
    assert all(m["content"] for m in history)  # the replies compared are real text
    assert page.input_value("#chat-input") == ""
    page.click("#chat-clear")
    assert _shown(page) == []
    page.click("#tab-completion")
    assert page.is_visible("#completion-view") and page.is_hidden("#chat-view")
