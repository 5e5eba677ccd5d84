"""``gptlab chat --init SRC``: talk to a chat model in the terminal (or answer lines piped to stdin).

Interactive (stdin is a terminal): replies stream as they are generated; the history is kept within
the context window (the oldest exchanges are dropped, with a notice); ``/clear``, ``/temperature T``,
``/top_k K``, ``/help``; Ctrl-D or Ctrl-C ends the session cleanly. Piped: each input line is one
user message and each reply is printed as one block ending in a newline, for scripts.
Generation goes through :class:`gptlab.engine.Engine`, the one way gptlab generates.
"""

from __future__ import annotations

import argparse
import sys

from gptlab.commands import add_parser, device_arg, init_arg

HELP = """commands:
  /clear            forget the conversation so far
  /temperature T    sampling temperature (0 = greedy)
  /top_k K          sample from the K most likely tokens (0 = all)
  /help             this list
  Ctrl-D or Ctrl-C  quit"""


def register(sub: argparse._SubParsersAction) -> None:
    p = add_parser(sub, "chat", run, help="chat with a fine-tuned model in the terminal",
                   description="Chat with a model fine-tuned with the chat template (gptlab train --config sft-*). "
                               "With stdin piped, every line is one user message and every reply one output block.")
    init_arg(p)
    p.add_argument("--system", default=None, help="a system message that opens the conversation")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="0 = off")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest reply, in tokens")
    p.add_argument("--seed", type=int, default=1337, help="reply n is sampled with seed + n")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto")
    device_arg(p)


class Session:
    """One conversation: settings, history, and the engine that answers."""

    def __init__(self, engine, template, args: argparse.Namespace, out=sys.stdout, err=sys.stderr) -> None:
        self.engine, self.tmpl, self.out, self.err = engine, template, out, err
        self.temperature, self.top_k = args.temperature, args.top_k
        self.max_new, self.seed = args.max_new_tokens, args.seed
        self.system = args.system
        self.turn = 0
        self.clear()

    def clear(self) -> None:
        self.history = [{"role": "system", "content": self.system}] if self.system else []

    def command(self, line: str) -> None:
        """Apply a ``/command`` line (settings changes are confirmed on stderr)."""
        name, _, value = line[1:].strip().partition(" ")
        value = value.strip()
        try:
            if name == "clear":
                self.clear()
                print("(conversation cleared)", file=self.err)
            elif name == "temperature":
                t = float(value)
                if not 0 <= t <= 100:
                    raise ValueError
                self.temperature = t
                print(f"(temperature {t:g})", file=self.err)
            elif name in ("top_k", "top-k"):
                k = int(value)
                if k < 0:
                    raise ValueError
                self.top_k = k
                print(f"(top_k {k}{' = off' if k == 0 else ''})", file=self.err)
            elif name == "help":
                print(HELP, file=self.err)
            else:
                print(f"unknown command /{name}; /help lists them", file=self.err)
        except ValueError:
            want = "a number in [0, 100]" if name == "temperature" else "an integer >= 0"
            print(f"/{name} needs {want}, got {value!r}", file=self.err)
        self.err.flush()

    def reply(self, text: str) -> str:
        """Stream the assistant's answer to ``text`` to ``out``; add both to the history; return the answer."""
        from gptlab.chat import fit_history
        from gptlab.engine import SamplingParams

        self.history.append({"role": "user", "content": text})
        window = self.engine.max_seq_len
        max_new = min(self.max_new, window // 2)
        try:
            ids, dropped = fit_history(self.tmpl, self.history, window - max_new)
        except Exception:
            self.history.pop()
            raise
        if dropped:
            keep = 1 if self.system else 0
            del self.history[keep:keep + 2 * dropped]
            print(f"(context window full: dropped the oldest {dropped} exchange{'s' if dropped > 1 else ''})",
                  file=self.err, flush=True)
        params = SamplingParams(max_tokens=max_new, temperature=self.temperature, top_k=self.top_k or None,
                                seed=self.seed + self.turn, stop=self.tmpl.stop_texts)
        self.turn += 1
        pieces: list[str] = []
        req = self.engine.submit(ids, params)
        events = self.engine.stream(req)
        try:
            for ev in events:
                if ev.text:
                    pieces.append(ev.text)
                    self.out.write(ev.text)
                    self.out.flush()
        finally:
            events.close()  # an interrupted reply cancels its request
            self.out.write("\n")
            self.out.flush()
            self.history.append({"role": "assistant", "content": "".join(pieces).strip()})
        return "".join(pieces)


def run(args: argparse.Namespace) -> int:
    from gptlab.chat import ChatTemplate
    from gptlab.engine import Engine
    from gptlab.errors import GptlabError

    if not 0 <= args.temperature <= 100 or args.top_k < 0 or args.max_new_tokens < 1:
        raise GptlabError(f"--temperature {args.temperature} / --top-k {args.top_k} / --max-new-tokens "
                          f"{args.max_new_tokens}: out of range (0..100, >= 0, >= 1)")
    engine = Engine.load(args.init, device=args.device, dtype=args.dtype)
    if engine.tokenizer is None:
        raise GptlabError(f"--init {args.init}: no tokenizer found with the model; chat needs one")
    tmpl = ChatTemplate.for_tokenizer(engine.tokenizer)
    session = Session(engine, tmpl, args)
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:  # pragma: no cover - not on every platform
            pass
        print(f"gptlab chat: {args.init} (context {engine.max_seq_len} tokens). /help for commands, "
              f"Ctrl-D to quit.", file=sys.stderr, flush=True)
    failed = False
    try:
        while True:
            if interactive:
                try:
                    line = input("you> ")
                except EOFError:
                    print(file=sys.stderr)
                    break
            else:
                raw = sys.stdin.readline()
                if not raw:
                    break
                line = raw.rstrip("\r\n")
            if not line.strip():
                continue
            if line.startswith("/"):
                session.command(line)
                continue
            try:
                session.reply(line)
            except GptlabError as e:
                # A bad message ends neither session; piped, an empty reply keeps one block per line.
                failed = True
                print(f"error: {e}", file=sys.stderr, flush=True)
                if not interactive:
                    print(flush=True)
    except KeyboardInterrupt:
        print("\n(bye)", file=sys.stderr, flush=True)
    return 1 if failed and not interactive else 0
