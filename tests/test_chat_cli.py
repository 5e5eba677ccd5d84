"""``gptlab chat`` through a pipe (one reply per line, equal to transformers' greedy replies) and a pseudo-terminal."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time

import pytest
import torch

from gptlab import chat as C
from gptlab.tokenizer import CharTokenizer

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny random chat model exported in Hugging Face format (with its chat tokenizer)."""
    from gptlab.config import ModelConfig
    from gptlab.hf import export_hf
    from gptlab.model import GPT

    tok = CharTokenizer(sorted(set("abcdefghijklmnopqrstuvwxyz :?!.,")), chat=True)
    torch.manual_seed(3)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=160, vocab_size=tok.vocab_size, init_std=0.5))
    out = tmp_path_factory.mktemp("chatmodel") / "m"
    export_hf(model, tok, out)
    return out, model, tok


def _env():
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    return {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}


def _reference_replies(model, tok, messages: list[str], max_new: int) -> list[str]:
    from gptlab.hf import to_hf_model

    hf = to_hf_model(model)
    t = C.ChatTemplate.for_tokenizer(tok)
    stops = sorted(tok.special_tokens.values())
    history: list[dict[str, str]] = []
    replies = []
    for m in messages:
        history.append({"role": "user", "content": m})
        ids = t.prompt(history)
        out = hf.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False, eos_token_id=stops,
                          pad_token_id=stops[0], attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        new = out[0, len(ids):].tolist()
        cut = next((i for i, v in enumerate(new) if v in stops), len(new))
        reply = tok.decode(new[:cut])
        replies.append(reply)
        history.append({"role": "assistant", "content": reply.strip()})
    return replies


def test_piped_commands_apply_and_blank_lines_are_skipped(chat_model):
    path, model, tok = chat_model
    msgs = ["hello there", "what is this?", "reverse: a b c"]
    stdin = "\n".join(["/temperature 0", msgs[0], "", "/top_k 3", msgs[1], "/bogus", msgs[2]]) + "\n"
    r = subprocess.run([sys.executable, "-m", "gptlab", "chat", "--init", str(path), "--max-new-tokens", "12",
                        "--temperature", "0.9"], input=stdin, capture_output=True, text=True, env=_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n") == _reference_replies(model, tok, msgs, 12) + [""]  # greedy after /temperature 0
    assert "(temperature 0)" in r.stderr and "(top_k 3)" in r.stderr and "unknown command /bogus" in r.stderr


def test_piped_greedy_replies_equal_transformers(chat_model):
    path, model, tok = chat_model
    msgs = ["hello there", "what is this?", "reverse: a b c", "ok."]
    r = subprocess.run([sys.executable, "-m", "gptlab", "chat", "--init", str(path), "--max-new-tokens", "12",
                        "--temperature", "0"], input="\n".join(msgs) + "\n", capture_output=True, text=True,
                       env=_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:-1] == _reference_replies(model, tok, msgs, 12)
    assert len(set(r.stdout.split("\n"))) > 2


def test_piped_bad_message_and_full_context(chat_model):
    path, _, _ = chat_model
    msgs = ["hello there, how are you", "HELLO", "tell me more about it", "and more", "and even more", "last one"]
    r = subprocess.run([sys.executable, "-m", "gptlab", "chat", "--init", str(path), "--max-new-tokens", "60",
                        "--temperature", "0"], input="\n".join(msgs) + "\n", capture_output=True, text=True,
                       env=_env(), timeout=120)
    assert r.returncode == 1  # the unencodable message is reported, the session goes on
    assert "character 'H' is not in" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stdout.split("\n")) == len(msgs) + 1
    assert "context window full: dropped the oldest" in r.stderr


def _read_until(fd: int, needle: bytes, timeout: float = 60.0) -> bytes:
    buf = b""
    end = time.time() + timeout
    while needle not in buf:
        left = end - time.time()
        if left <= 0:
            raise AssertionError(f"timed out waiting for {needle!r}; got {buf!r}")
        r, _, _ = select.select([fd], [], [], left)
        if r:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
    return buf


def _spawn_pty(path):
    import pty

    import fcntl
    import termios

    master, slave = pty.openpty()

    def controlling_terminal() -> None:  # as a shell does: a new session whose terminal is the pty
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    p = subprocess.Popen([sys.executable, "-m", "gptlab", "chat", "--init", str(path), "--max-new-tokens", "12",
                          "--temperature", "0"], stdin=slave, stdout=slave, stderr=slave, env=_env(),
                         preexec_fn=controlling_terminal)
    os.close(slave)
    return p, master


@pytest.mark.parametrize("quit_key", [b"\x04", b"\x03"], ids=["ctrl-d", "ctrl-c"])
def test_terminal_session(chat_model, quit_key):
    path, model, tok = chat_model
    p, fd = _spawn_pty(path)
    try:
        out = _read_until(fd, b"you> ")
        assert b"/help for commands" in out
        os.write(fd, b"hello there\n")
        out = _read_until(fd, b"you> ")
        want = _reference_replies(model, tok, ["hello there"], 12)[0]
        assert want and f"hello there\n{want}\n".encode() in out.replace(b"\r\n", b"\n")
        os.write(fd, b"/help\n")
        out = _read_until(fd, b"you> ")
        assert b"/temperature T" in out and b"/clear" in out
        os.write(fd, b"/top_k x\n")
        assert b"/top_k needs an integer" in _read_until(fd, b"you> ")
        os.write(fd, b"/clear\n")
        assert b"(conversation cleared)" in _read_until(fd, b"you> ")
        os.write(fd, quit_key)  # Ctrl-C: the terminal sends SIGINT to its foreground process
        rest = _read_until(fd, b"\x00", timeout=30)  # returns at EOF: the process closed the terminal
        assert p.wait(timeout=30) == 0
        assert b"Traceback" not in rest
        assert (b"(bye)" in rest) == (quit_key == b"\x03")
    finally:
        if p.poll() is None:
            p.kill()
        os.close(fd)


def test_sample_chat_renders_the_template(chat_model, capsys):
    import json

    from gptlab.cli import main

    path, model, tok = chat_model
    assert main(["sample", "--init", str(path), "--chat", "--prompt", "what is this?", "--temperature", "0",
                 "--max-new-tokens", "12", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    want = _reference_replies(model, tok, ["what is this?"], 12)[0]
    assert res["completions"] == [want] and res["samples"] == [want] and res["prompt"] == "what is this?"
    t = C.ChatTemplate.for_tokenizer(tok)
    assert res["prompt_tokens"] == len(t.prompt([{"role": "user", "content": "what is this?"}]))
    # a model without chat tokens is refused with a one-line error
    plain = path.parent / "plain"
    from gptlab.config import ModelConfig
    from gptlab.hf import export_hf
    from gptlab.model import GPT

    base = CharTokenizer(tok.chars)
    export_hf(GPT(ModelConfig(n_layer=1, n_head=2, n_embd=8, block_size=16, vocab_size=base.vocab_size)), base, plain)
    assert main(["sample", "--init", str(plain), "--chat", "--prompt", "hi"]) == 1
    assert "has no chat tokens" in capsys.readouterr().err
