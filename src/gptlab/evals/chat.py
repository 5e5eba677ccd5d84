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


def task_examples(n: int, seed: int, *, held_out: bool, alphabet: str = string.ascii_lowercase
                  ) -> list[tuple[str, str]]:
    """``n`` distinct ``(question, answer)`` pairs of the reverse task, from the training or the held-out set."""
    import random

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


def task_conversations(n: int, seed: int, *, held_out: bool = False) -> list[list[dict[str, str]]]:
    """The task's examples as one-turn conversations (``{"messages"}`` lists)."""
    return [[{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            for q, a in task_examples(n, seed, held_out=held_out)]


def chat_accuracy(model: Any, tokenizer: Any, examples: Sequence[tuple[str, str]], *, device: Any = None,
                  batch_size: int = 64, max_new_tokens: int | None = None) -> dict[str, Any]:
    """Exact-match accuracy of greedy replies to single-turn questions: ``{"accuracy", "n", "correct"}``.

    Each question is rendered with the chat template and a generation prompt; the reply is the text
    before the first ``<|assistant_end|>`` (or all generated text, if none), compared to the answer
    after stripping surrounding whitespace. Prompts of equal length are decoded in one batch.
    """
    import torch

    from gptlab.chat import ChatTemplate
    from gptlab.generate import generate

    tmpl = ChatTemplate.for_tokenizer(tokenizer)
    device = device or next(model.parameters()).device
    prompts = [tmpl.prompt([{"role": "user", "content": q}]) for q, _ in examples]
    budget = [max_new_tokens or len(tokenizer.encode(a)) + 1 for _, a in examples]
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(len(p), []).append(i)
    correct = 0
    was_training = model.training
    model.eval()
    try:
        for length in sorted(groups):
            idx = groups[length]
            for b in range(0, len(idx), batch_size):
                rows = idx[b:b + batch_size]
                new = min(max(budget[i] for i in rows), model.config.block_size - length)
                if new <= 0:
                    continue
                x = torch.tensor([prompts[i] for i in rows], dtype=torch.long, device=device)
                with torch.no_grad():
                    out = generate(model, x, new, temperature=0.0, stop_id=tmpl.stop_id)
                for i, row in zip(rows, out[:, length:].tolist()):
                    if tmpl.stop_id in row:
                        row = row[:row.index(tmpl.stop_id)]
                    reply = tokenizer.decode(row)
                    correct += int(reply.strip() == examples[i][1].strip())
    finally:
        model.train(was_training)
    n = len(examples)
    return {"accuracy": correct / n if n else 0.0, "n": n, "correct": correct}
