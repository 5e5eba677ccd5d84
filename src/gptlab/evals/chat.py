"""Held-out exact-match accuracy of a chat model, and the synthetic instruction task SFT demos train on.

The task (``reverse``): the user asks to reverse a short string of distinct letters written with
spaces between them (``"reverse: k q z w"``), the assistant answers with the letters in reverse order
(``"w z q k"``). Spaced letters are one token each for characters and for GPT-2's BPE alike, so the
same task suits every tokenizer gptlab has; a base model has never seen the turn tokens, so it
starts near 0%. Strings are split into training and held-out sets by a hash of the string, so no
held-out question is ever trained on, whatever the seeds and counts.
"""

from __future__ import annotations

import string
import zlib
from typing import Any, Sequence

TASK = "reverse"
MIN_LETTERS, MAX_LETTERS = 3, 7
HELD_OUT_BUCKET = 7  # crc32(letters) % 8 == 7: held out (1/8 of all strings)


def _held_out(letters: str) -> bool:
    return zlib.crc32(letters.encode()) % 8 == HELD_OUT_BUCKET


TASKS = ("reverse",)


def check_task(task: str) -> None:
    if task not in TASKS:
        from gptlab.errors import GptlabError

        raise GptlabError(f"data.task={task!r}: unknown synthetic task; choose one of {', '.join(TASKS)}")


def task_examples(n: int, seed: int, *, held_out: bool, task: str = TASK, alphabet: str = string.ascii_lowercase
                  ) -> list[tuple[str, str]]:
    """``n`` distinct ``(question, answer)`` pairs of the reverse task, from the training or the held-out set."""
    import random

    check_task(task)
    rng = random.Random(f"{TASK}-{seed}-{held_out}")
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    while len(out) < n:
        k = rng.randint(MIN_LETTERS, MAX_LETTERS)
        letters = "".join(rng.sample(alphabet, k))  # distinct letters: the reply is unambiguous to locate
        if letters in seen or _held_out(letters) != held_out:
            continue
        seen.add(letters)
        out.append((f"reverse: {' '.join(letters)}", " ".join(reversed(letters))))
    return out


def task_conversations(n: int, seed: int, *, held_out: bool = False, task: str = TASK
                       ) -> list[list[dict[str, str]]]:
    """The task's examples as one-turn conversations (``{"messages"}`` lists)."""
    return [[{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            for q, a in task_examples(n, seed, held_out=held_out, task=task)]


def chat_accuracy(model: Any, tokenizer: Any, examples: Sequence[tuple[str, str]], *, batch_size: int = 64,
                  max_new_tokens: int | None = None) -> dict[str, Any]:
    """Exact-match accuracy of greedy replies to single-turn questions: ``{"accuracy", "n", "correct"}``.

    Each question is rendered with the chat template and a generation prompt and answered through the
    engine; the reply ends at ``<|assistant_end|>`` (or any other turn token) and is compared to the
    answer after stripping surrounding whitespace. ``model`` is left in the mode it was in.
    """
    from gptlab.chat import ChatTemplate
    from gptlab.engine import Engine, SamplingParams

    tmpl = ChatTemplate.for_tokenizer(tokenizer)
    prompts = [tmpl.prompt([{"role": "user", "content": q}]) for q, _ in examples]
    longest = max((len(tokenizer.encode(a)) for _, a in examples), default=0) + 2
    room = model.config.block_size - max((len(p) for p in prompts), default=0)
    params = SamplingParams(max_tokens=max(1, min(max_new_tokens or longest, room)), temperature=0.0,
                            stop=tmpl.stop_texts)
    was_training = model.training
    try:
        engine = Engine(model, tokenizer, max_batch=batch_size, max_queue=max(len(prompts), 1))
        done = engine.generate(prompts, params)
    finally:
        model.train(was_training)
    correct = sum(int(c.text.strip() == a.strip()) for c, (_, a) in zip(done, examples))
    n = len(examples)
    return {"accuracy": correct / n if n else 0.0, "n": n, "correct": correct}


# --------------------------------------------------------------------------- during training


from gptlab.evals.registry import Eval, EvalContext, EvalOff, register  # noqa: E402


@register
class ChatEval(Eval):
    """Held-out exact match of the run's synthetic task (``data.task``): ``eval.chat_eval_n`` questions the
    training data never contains, answered greedily; records ``{"accuracy", "n"}`` (kind ``chat_eval``)."""

    name = "chat_eval"
    every_key = "chat_eval_every"
    main_only = True

    def __init__(self, ctx: EvalContext) -> None:
        from gptlab.chat import has_chat_tokens

        task = ctx.cfg.data.task
        if not task:
            raise EvalOff("chat_eval is off: it scores a synthetic task's held-out questions; set data.task")
        if not has_chat_tokens(ctx.tokenizer):
            raise EvalOff("chat_eval is off: the run's tokenizer has no chat tokens (train on chat data)")
        self.examples = task_examples(ctx.cfg.eval.chat_eval_n, ctx.cfg.data.seed, held_out=True, task=task)

    def run(self, model: Any, ctx: EvalContext) -> list[dict[str, Any]]:
        res = chat_accuracy(model, ctx.tokenizer, self.examples)
        model.train()
        return [{"accuracy": res["accuracy"], "n": res["n"]}]

    def report(self, records: list[dict[str, Any]]) -> str | None:
        r = records[0]
        return f"chat_eval accuracy {r['accuracy']:.3f} (n={r['n']})"

    def describe(self) -> str:
        return f"chat_eval {len(self.examples)} held-out questions"
