"""The chat template, defined once: conversations -> token ids + loss mask, the Jinja twin, and packing.

A conversation is ``[{"role": "system"|"user"|"assistant", "content": str}, ...]`` (an optional system
message first, then user and assistant turns alternating, starting with the user). Rendered:

    [BOS] <|system_start|> system text <|system_end|> <|user_start|> text <|user_end|>
          <|assistant_start|> text <|assistant_end|> ...

BOS is the tokenizer's end-of-text token when it has one (GPT-2 documents start after one in
pretraining, so a conversation does too). Each content is encoded on its own as ordinary text, so
a literal ``<|user_end|>`` typed by a user is text, never a delimiter. The loss mask is 1 exactly on
the tokens the model must learn to produce: assistant content and its ``<|assistant_end|>`` (never
the ``<|assistant_start|>`` that the prompt supplies). ``mask[i]`` refers to token ``i`` as a target.

The turn tokens are the tokenizer's reserved special tokens (:data:`gptlab.tokenizer.CHAT_TOKENS`).
GPT-2 and char tokenizers get them appended after their vocabulary (``chat=True`` in their spec):
for GPT-2, ids 50257..50262, rows that a model padded to 50,304 already has, so fine-tuning needs no
new parameters -- only a larger ``vocab_size`` so those rows are no longer masked out of the logits
(:func:`extend_vocab`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from gptlab.errors import GptlabError
from gptlab.tokenizer import CHAT_TOKENS, Tokenizer, from_spec, special_tokens

ROLES = ("system", "user", "assistant")
TEMPLATE_NAME = "gptlab-chat-v1"


class ChatError(GptlabError, ValueError):
    """A conversation or chat setting is malformed; the message names the file, line and problem."""


# --------------------------------------------------------------------------- tokenizer side


def has_chat_tokens(tok: Tokenizer | None) -> bool:
    """Whether ``tok`` carries every turn token of the template (i.e. can render conversations)."""
    return tok is not None and all(t in special_tokens(tok) for t in CHAT_TOKENS)


def with_chat_tokens(tok: Tokenizer) -> Tokenizer:
    """``tok`` itself when it has the turn tokens, else its GPT-2 / char twin with them appended."""
    if has_chat_tokens(tok):
        return tok
    spec = tok.spec()
    if spec.get("type") in ("gpt2", "char"):
        return from_spec({**spec, "chat": True})
    raise ChatError(f"tokenizer {spec.get('type')!r} has no chat tokens ({', '.join(CHAT_TOKENS)}); "
                    f"train one with them reserved (gptlab tokenizer train) or use gpt2")


def is_chat_twin(base_spec: dict[str, Any], chat_spec: dict[str, Any]) -> bool:
    """True when ``chat_spec`` is ``base_spec`` plus the appended chat tokens (same ids below them)."""
    return base_spec == chat_spec or (chat_spec.get("chat") is True and {**base_spec, "chat": True} == chat_spec)


@dataclass(frozen=True)
class ChatTemplate:
    """The template bound to one tokenizer: ids of BOS and of each role's start/end token."""

    tokenizer: Any
    bos_id: int | None
    start: dict[str, int]
    end: dict[str, int]

    @classmethod
    def for_tokenizer(cls, tok: Tokenizer) -> "ChatTemplate":
        if not has_chat_tokens(tok):
            raise ChatError(f"tokenizer {tok.spec().get('type')!r} (vocab {tok.vocab_size}) has no chat tokens: "
                            f"this model was not fine-tuned for chat (see gptlab train --config sft-tiny)")
        sp = special_tokens(tok)
        return cls(tok, tok.eot_id, {r: sp[f"<|{r}_start|>"] for r in ROLES}, {r: sp[f"<|{r}_end|>"] for r in ROLES})

    @property
    def stop_id(self) -> int:
        """The token that ends an assistant turn (generation stops there)."""
        return self.end["assistant"]

    @property
    def stop_texts(self) -> list[str]:
        """Stop strings for text-level generators (the engine): ``<|assistant_end|>`` ends a reply, and
        any other turn token means the model is writing the next turn, so the reply is over too."""
        ids = [self.stop_id] + [i for i in (*self.start.values(), *self.end.values()) if i != self.stop_id]
        return [self.tokenizer.decode([i]) for i in ids]

    def render(self, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = False,
               where: str = "conversation") -> tuple[list[int], list[int]]:
        """``(ids, mask)`` of a conversation (validated); the prompt for a reply with ``add_generation_prompt``."""
        messages = validate_messages(messages, where, need_assistant=False)
        return self.assemble(messages, [self.tokenizer.encode(m["content"]) for m in messages],
                             add_generation_prompt=add_generation_prompt)

    def render_many(self, conversations: Sequence[Sequence[dict[str, str]]], num_threads: int = 1
                    ) -> list[tuple[list[int], list[int]]]:
        """:meth:`render` of validated conversations, their texts encoded in one parallel batch."""
        texts = [m["content"] for msgs in conversations for m in msgs]
        bodies = iter(self.tokenizer.encode_batch(texts, num_threads=num_threads))
        return [self.assemble(msgs, [next(bodies) for _ in msgs]) for msgs in conversations]

    def assemble(self, messages: Sequence[dict[str, str]], bodies: Sequence[Sequence[int]], *,
                 add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """``(ids, mask)`` from validated messages and their contents' token ids."""
        ids: list[int] = [] if self.bos_id is None else [self.bos_id]
        mask: list[int] = [0] * len(ids)
        for m, body in zip(messages, bodies):
            role, body = m["role"], list(body)
            train = 1 if role == "assistant" else 0
            ids += [self.start[role], *body, self.end[role]]
            mask += [0] + [train] * (len(body) + 1)
        if add_generation_prompt:
            ids.append(self.start["assistant"])
            mask.append(0)
        return ids, mask

    def prompt(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Ids that ask the model for the next assistant turn."""
        return self.render(messages, add_generation_prompt=True)[0]

    def jinja(self) -> str:
        """The same template for ``tokenizer_config.json``'s ``chat_template`` (transformers' apply_chat_template)."""
        bos = "" if self.bos_id is None else self.tokenizer.decode([self.bos_id])
        return ("{{- '" + bos + "' -}}"
                "{%- for message in messages -%}"
                "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
                "{{- raise_exception('roles must be system, user or assistant') -}}{%- endif -%}"
                "{{- '<|' + message['role'] + '_start|>' + message['content'] + '<|' + message['role'] + '_end|>' -}}"
                "{%- endfor -%}"
                "{%- if add_generation_prompt -%}{{- '<|assistant_start|>' -}}{%- endif -%}")


def fit_history(template: ChatTemplate, messages: Sequence[dict[str, str]], budget: int
                ) -> tuple[list[int], int]:
    """The generation prompt of ``messages`` in at most ``budget`` tokens: ``(ids, turns_dropped)``.

    Whole exchanges are dropped oldest first (a user message with its reply; a system message stays),
    so the model never sees half a turn. Raises :class:`ChatError` when even the last user message
    alone does not fit.
    """
    msgs = list(messages)
    system = msgs[:1] if msgs and msgs[0]["role"] == "system" else []
    turns = msgs[len(system):]
    dropped = 0
    while True:
        ids = template.prompt(system + turns)
        if len(ids) <= budget:
            return ids, dropped
        if len(turns) <= 1:
            raise ChatError(f"the message needs {len(ids)} tokens with the template but only {budget} fit in the "
                            f"context window (after room for the reply); write a shorter one")
        turns = turns[2:] if len(turns) > 2 else turns[-1:]
        dropped += 1


# --------------------------------------------------------------------------- conversations


def validate_messages(messages: Any, where: str, *, need_assistant: bool = True) -> list[dict[str, str]]:
    """Check one conversation's shape; raise :class:`ChatError` (``where: problem``) at the first fault."""
    if not isinstance(messages, list) or not messages:
        raise ChatError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    out = []
    for i, m in enumerate(messages):
        at = f"{where}: message {i}"
        if not isinstance(m, dict):
            raise ChatError(f"{at} is {type(m).__name__}, expected an object with 'role' and 'content'")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ChatError(f"{at}: role {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ChatError(f"{at} ({role}): 'content' must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    turns = out[1:] if out[0]["role"] == "system" else out
    for i, m in enumerate(turns):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            k = i + len(out) - len(turns)
            what = "only first" if m["role"] == "system" else f"expected {want}"
            raise ChatError(f"{where}: message {k} has role {m['role']!r} ({what}): after an optional system "
                            f"message, turns alternate user, assistant, user, ...")
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise ChatError(f"{where}: no assistant message, so nothing to learn from it")
    return out


def conversation_from_json(obj: Any, where: str) -> list[dict[str, str]]:
    """The messages of one ``{"messages": [...]}`` record (validated)."""
    if not isinstance(obj, dict) or "messages" not in obj:
        keys = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise ChatError(f"{where}: expected an object with a 'messages' list (found {keys})")
    return validate_messages(obj["messages"], where)


def read_conversations(path: str | os.PathLike) -> Iterator[tuple[list[dict[str, str]], str]]:
    """``(messages, "FILE:LINE")`` for each non-blank line of a JSONL file (``.gz`` too), validated."""
    import gzip
    import io

    p = Path(path)
    if not p.is_file():
        raise ChatError(f"{p}: conversation file not found")
    raw = gzip.open(p, "rb") if p.name.endswith(".gz") else open(p, "rb")
    with io.TextIOWrapper(raw, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{p}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ChatError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); expected one "
                                f'{{"messages": [...]}} object per line') from None
            yield conversation_from_json(obj, where), where


def write_conversations(path: str | os.PathLike, conversations: Iterable[Sequence[dict[str, str]]]) -> int:
    """Write conversations as JSONL (``{"messages": [...]}`` per line); returns how many."""
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for msgs in conversations:
            f.write(json.dumps({"messages": list(msgs)}, ensure_ascii=False) + "\n")
            n += 1
    return n


# --------------------------------------------------------------------------- packing


@dataclass
class PackStats:
    conversations: int = 0
    rows: int = 0
    cropped: int = 0  # conversations longer than a row, cut at its end
    dropped: int = 0  # rows (or crops) left with no target token
    tokens: int = 0  # conversation tokens placed
    pad: int = 0
    targets: int = 0  # mask-1 tokens placed


class BestFitPacker:
    """Packs rendered conversations into rows of exactly ``row_len`` tokens, each row starting a conversation.

    A row starts with the oldest conversation in a pool of up to ``pool``, then is filled best fit, as
    nanochat's SFT loader does: each time the longest one that still fits; when none fits, the rest of
    the row is padding (mask 0). Taking the first one in order rather than the longest keeps some
    short conversations at position 0 (where a chat starts), but best fit still uses short ones to
    fill rows after long ones, so they start rows far less often than their share: with the
    ``reverse`` task in 64-token rows, 9 of ~3,600 three-letter conversations started a row and a small
    model with learned positions answered none of those questions at position 0. Where that matters,
    choose ``row_len`` so one conversation fills a row (``sft-tiny`` does). A conversation longer than
    a row is cropped to a row of its own (its tail is lost).
    Rows without a single target are dropped. Deterministic for a given input order; streaming:
    :meth:`add` returns the rows completed so far, :meth:`finish` the rest.
    """

    def __init__(self, row_len: int, pad_id: int, pool: int = 256, stats: PackStats | None = None) -> None:
        self.T, self.pad_id, self.pool_size = int(row_len), int(pad_id), max(1, int(pool))
        self.stats = stats if stats is not None else PackStats()
        self.pool: list[tuple[list[int], list[int]]] = []

    def add(self, ids: list[int], mask: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
        self.stats.conversations += 1
        self.pool.append((ids, mask))
        out = []
        while len(self.pool) >= self.pool_size:
            out += self._row()
        return out

    def finish(self) -> list[tuple[np.ndarray, np.ndarray]]:
        out = []
        while self.pool:
            out += self._row()
        return out

    def _row(self) -> list[tuple[np.ndarray, np.ndarray]]:
        T, pool, st = self.T, self.pool, self.stats
        first, first_mask = pool.pop(0)
        if len(first) > T:  # longer than a whole row: crop it
            st.cropped += 1
            ids, mask = first[:T], first_mask[:T]
        else:
            ids, mask = list(first), list(first_mask)
            while pool:
                room = T - len(ids)
                best = -1
                for j, (cid, _) in enumerate(pool):
                    if len(cid) <= room and (best < 0 or len(cid) > len(pool[best][0])):
                        best = j
                if best < 0:
                    break
                cid, cm = pool.pop(best)
                ids += cid
                mask += cm
        if not any(mask):
            st.dropped += 1
            return []
        pad = T - len(ids)
        st.rows += 1
        st.tokens += len(ids)
        st.pad += pad
        st.targets += sum(mask)
        return [(np.array(ids + [self.pad_id] * pad, dtype=np.int64), np.array(mask + [0] * pad, dtype=np.uint8))]


def pack_rows(items: Iterable[tuple[list[int], list[int]]], row_len: int, pad_id: int, *, pool: int = 256,
              stats: PackStats | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """All rows of :class:`BestFitPacker` over ``items``."""
    packer = BestFitPacker(row_len, pad_id, pool, stats)
    for ids, mask in items:
        yield from packer.add(ids, mask)
    yield from packer.finish()


# --------------------------------------------------------------------------- model side


def extend_vocab(model: Any, vocab_size: int, pad_multiple: int = 128) -> Any:
    """``model`` (a gptlab GPT) with ``vocab_size`` real tokens, for a tokenizer with appended chat tokens.

    Ids in ``[old, vocab_size)`` become tokens: no longer masked out of the logits, and trainable. When
    the model's padded rows already cover them (a gptlab model padded to 50,304 and GPT-2 + 6 chat
    tokens) the parameters keep their shapes; otherwise the vocabulary is padded to ``pad_multiple``.
    The new rows start at the mean of the real rows: a zero row would give those tokens logit 0, far
    above GPT-2's typical logits, and every prediction would start out favouring them.
    Returns the same model when nothing changes, else a new one with the old weights.
    """
    import torch

    from gptlab.config import ModelConfig, from_dict, to_dict
    from gptlab.loading import materialize

    cfg = model.config
    old = cfg.vocab_size
    if vocab_size <= old:
        return model
    d = to_dict(cfg)
    d["vocab_size"] = vocab_size
    if cfg.padded_vocab_size < vocab_size:
        d["pad_vocab_multiple"] = max(int(pad_multiple), 1)
    new_cfg = from_dict(ModelConfig, d, "model")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}  # no aliasing with the old model
    Vp = new_cfg.padded_vocab_size
    with torch.no_grad():
        for key in ("transformer.wte.weight", "lm_head.weight"):
            if key not in state or (key == "lm_head.weight" and cfg.tie_embeddings):
                continue
            w = state[key]
            grown = w.new_zeros(Vp, w.size(1))
            grown[:min(w.size(0), Vp)] = w[:Vp]
            grown[old:vocab_size] = w[:old].mean(dim=0)
            state[key] = grown
        if cfg.tie_embeddings:
            state.pop("lm_head.weight", None)  # the same tensor as wte: loading it would undo the growth
    p = next(model.parameters())
    new = materialize(new_cfg, state, device=p.device, dtype=p.dtype, where="extend_vocab")
    new.train(model.training)
    return new
