"""The engine: continuous batching against single requests and full recomputation, per-request seeds,
stopping, cancel, bounds, scoring, streaming text."""

from __future__ import annotations

import asyncio
import string
import threading
import time

import pytest
import torch
import torch.nn.functional as F

from gptlab.config import MODERN_ARCH, ModelConfig
from gptlab.engine import (Engine, EngineFull, InvalidParams, PromptTooLong, SamplingParams, TextAssembler)
from gptlab.model import GPT
from gptlab.tokenizer import CharTokenizer

CHARS = list(string.ascii_letters + string.digits + " .,;:!?'\n-") + ["é", "ß", "€"]
V = len(CHARS) + 1  # the last id plays end-of-text


def _tok() -> CharTokenizer:
    tok = CharTokenizer(CHARS + ["\x00"])
    tok.eot_id = V - 1  # a char vocabulary with an end-of-text id, like a tokenizer that has one
    return tok


def _model(block_size: int = 64, seed: int = 0, **overrides) -> GPT:
    cfg = ModelConfig.from_preset("tiny", **{"vocab_size": V, "block_size": block_size, **overrides})
    torch.manual_seed(seed)
    m = GPT(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # sharpen the random model so tokens depend on the context
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
        m.lm_head.weight[V - 1] -= 3.0  # end-of-text rare unless a test asks for it
    return m.eval()


def _prompts(n: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V - 1, (int(torch.randint(1, 20, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def _reference_greedy(model: GPT, ids: list[int], n: int) -> list[int]:
    """nanoGPT's loop: the whole sequence through the model for every token (no cache, no engine)."""
    seq = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(seq)
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return seq[0, len(ids):].tolist()


ARCHS = {"gpt2": {}, "modern": dict(MODERN_ARCH, n_kv_head=2)}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_greedy_alone_equals_among_15_others_joining_at_different_times(arch):
    model = _model(**ARCHS[arch])
    prompts = _prompts(16)
    greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eot=True)
    alone = [Engine(model).generate([p], greedy)[0].token_ids for p in prompts]
    for p, toks in zip(prompts[:4], alone[:4]):
        assert toks == _reference_greedy(model, p, 24)  # the cache path equals full recomputation
    eng = Engine(model, max_batch=16)
    reqs, running = [], []
    for i, p in enumerate(prompts):  # one new request per step: 16 rows at different lengths and progress
        params = SamplingParams(max_tokens=24 - (i % 5), temperature=0, ignore_eot=True)
        reqs.append(eng.submit(p, params))
        eng.step()
        running.append(len(eng.rows))
    while not all(r.done for r in reqs):
        eng.step()
        running.append(len(eng.rows))
    assert max(running) == 16 and running[-1] == 0  # really batched; rows retire at different steps
    for i, r in enumerate(reqs):
        assert r.result().token_ids == alone[i][: 24 - (i % 5)]


def test_seeded_request_gives_the_same_text_whatever_else_runs():
    model = _model()
    tok = _tok()
    target = SamplingParams(max_tokens=30, temperature=0.9, top_k=20, top_p=0.9, seed=1234, ignore_eot=True)
    alone = Engine(model, tok).generate(["Hello there"], target)[0]
    eng = Engine(model, tok, max_batch=8)
    eng.start()
    try:
        noise = [eng.submit(p, SamplingParams(max_tokens=40, temperature=t, top_p=0.8, seed=None))
                 for p, t in zip(_prompts(5, seed=3), (0.0, 0.5, 1.0, 1.5, 2.0))]
        time.sleep(0.05)
        got = eng.submit(tok.encode("Hello there"), target).result(timeout=60)
        more = [eng.submit(p, SamplingParams(max_tokens=10, temperature=1.0)) for p in _prompts(3, seed=4)]
        for r in noise + more:
            r.result(timeout=60)
    finally:
        eng.shutdown()
    assert got.text == alone.text and got.token_ids == alone.token_ids and len(got.token_ids) == 30
    other = Engine(model, tok).generate(["Hello there"], SamplingParams(**{**target.__dict__, "seed": 99}))[0]
    assert other.text != alone.text  # the seed matters


@pytest.mark.parametrize("arch", list(ARCHS))
def test_kv_cache_equals_full_recomputation_when_sampling(arch):
    model = _model(**ARCHS[arch])
    prompts = _prompts(6, seed=5)
    params = SamplingParams(max_tokens=20, temperature=1.1, top_k=30, top_p=0.95, seed=7, ignore_eot=True)
    cached = Engine(model, max_batch=4).generate(prompts, params)
    full = Engine(model, max_batch=4, use_kv_cache=False).generate(prompts, params)
    assert [c.token_ids for c in cached] == [c.token_ids for c in full]
    assert len({tuple(c.token_ids) for c in cached}) > 1


def test_stop_strings_and_end_of_text_retire_rows():
    model = _model()
    tok = _tok()
    free = Engine(model, tok).generate(["The cat"], SamplingParams(max_tokens=30, temperature=0, ignore_eot=True))[0]
    assert free.finish_reason == "length" and len(free.text) == 30
    stop = free.text[10:12]
    cut = free.text.index(stop)
    got = Engine(model, tok).generate(["The cat"], SamplingParams(max_tokens=30, temperature=0, stop=[stop]))[0]
    assert got.finish_reason == "stop" and got.text == free.text[:cut]
    assert len(got.token_ids) == cut + len(stop)  # tokens up to the one completing the stop string
    # End-of-text: a tokenizer whose end-of-text id is the 5th token the model produces
    fifth = free.token_ids[4]
    eot_tok = _tok()
    eot_tok.eot_id = fifth
    eng = Engine(model, eot_tok)
    c = eng.generate(["The cat"], SamplingParams(max_tokens=30, temperature=0))[0]
    first = free.token_ids.index(fifth)
    assert c.finish_reason == "stop" and c.token_ids == free.token_ids[: first + 1]
    assert c.text == free.text[:first]  # end-of-text is not text
    c2 = eng.generate(["The cat"], SamplingParams(max_tokens=30, temperature=0, ignore_eot=True))[0]
    assert c2.token_ids == free.token_ids and c2.text == free.text


def test_cancel_retires_a_running_row_within_one_step_and_frees_its_slot():
    model = _model(block_size=256)
    eng = Engine(model, _tok(), max_batch=2)
    eng.start()
    try:
        long = eng.submit([1, 2, 3], SamplingParams(max_tokens=250, temperature=0, ignore_eot=True))
        it = long.events(timeout=30)
        first = [next(it) for _ in range(3)]
        long.cancel()
        rest = list(it)
        assert rest[-1].finish_reason == "cancelled" and len(first) + len(rest) < 250
        assert all(ev.finish_reason is None for ev in first + rest[:-1])
        waiting = eng.submit([4], SamplingParams(max_tokens=3, temperature=0))
        assert waiting.result(timeout=30).finish_reason == "length"
        assert eng.stats()["running_rows"] == 0
    finally:
        eng.shutdown()
    assert waiting.done


def test_bounds_rows_cache_tokens_and_queue():
    model = _model()
    eng = Engine(model, max_batch=3, max_queue=4, max_cache_tokens=64 + 20)
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eot=True)
    reqs = [eng.submit([1] * 12, params) for _ in range(4)]
    with pytest.raises(EngineFull, match="max_queue=4"):
        eng.submit([1], params)
    seen = []
    while not all(r.done for r in reqs):
        eng.step()
        seen.append((len(eng.rows), sum(r.reserved for r in eng.rows)))
    assert max(n for n, _ in seen) == 3  # 3 x 22 reserved tokens fit in 84, a 4th does not wait
    assert all(t <= 84 for _, t in seen)
    eng2 = Engine(model, max_batch=8, max_cache_tokens=64)  # 64 tokens: one 22-token row + two more
    reqs = [eng2.submit([1] * 12, params) for _ in range(5)]
    most = 0
    while not all(r.done for r in reqs):
        eng2.step()
        most = max(most, len(eng2.rows))
    assert most == 2


def test_bad_requests_are_refused_with_the_parameter_named():
    model = _model(block_size=32)
    eng = Engine(model, _tok())
    for bad, param in [(dict(temperature=-1), "temperature"), (dict(top_p=0.0), "top_p"), (dict(max_tokens=-2), "max_tokens"),
                       (dict(top_k=-1), "top_k"), (dict(stop="x"), "stop"), (dict(logprobs=99), "logprobs")]:
        with pytest.raises(InvalidParams) as e:
            eng.submit([1], SamplingParams(**bad))
        assert e.value.param == param
    with pytest.raises(PromptTooLong):
        eng.submit([1] * 32, SamplingParams())
    with pytest.raises(InvalidParams, match="outside the vocabulary"):
        eng.submit([V + 5], SamplingParams())
    # prompt + max_tokens past the context: clipped, finish "length"
    c = eng.generate([[1] * 28], SamplingParams(max_tokens=10, temperature=0, ignore_eot=True))[0]
    assert len(c.token_ids) == 4 and c.finish_reason == "length"
    # an empty prompt starts from end-of-text
    assert eng.submit([], SamplingParams(max_tokens=0)).prompt_ids == [V - 1]


def test_score_and_logprobs_equal_the_models_cross_entropy():
    model = _model()
    eng = Engine(model, _tok())
    ids = _prompts(1, seed=9)[0] + [3, 4, 5]
    x = torch.tensor([ids])
    with torch.no_grad():
        logits, _ = model(x)
    losses = F.cross_entropy(logits[0, :-1], x[0, 1:], reduction="none")
    got = eng.score(ids)
    assert got[0] is None
    torch.testing.assert_close(torch.tensor(got[1:]), -losses, atol=1e-5, rtol=1e-5)
    lps, tops = eng.score_top(ids, 2)
    assert tops[0] is None and all(len(t) == 2 and t[0][1] >= t[1][1] for t in tops[1:])
    # generated tokens' logprobs equal the score of the whole sequence
    c = eng.generate([ids], SamplingParams(max_tokens=8, temperature=0.8, seed=3, logprobs=1, ignore_eot=True))[0]
    full = eng.score(ids + c.token_ids)
    torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(full[len(ids):]), atol=1e-5, rtol=1e-5)
    assert all(len(t) == 1 for t in c.top_logprobs)


def test_text_assembler_holds_back_partial_utf8_and_stop_prefixes():
    from gptlab.tokenizer import GPT2Tokenizer

    tok = GPT2Tokenizer()
    text = "naïve 🤗 café — 日本語"
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # some tokens are partial characters
    s = TextAssembler(tok)
    pieces = [s.push(i)[0] for i in ids] + [s.flush()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    s = TextAssembler(_tok(), stop=["STOP", "ab"])
    got = [s.push(i) for i in _tok().encode("xxST")]
    assert "".join(p for p, _ in got) == "xx" and not any(hit for _, hit in got)  # "ST" held back
    assert s.push(_tok().encode("O")[0]) == ("", False)
    assert s.push(_tok().encode("P")[0]) == ("", True)
    s = TextAssembler(_tok(), stop=["STOP"])
    assert "".join(s.push(i)[0] for i in _tok().encode("xST")) + s.flush() == "xST"  # released at the end


def test_async_events_stream_from_the_engine_thread():
    model = _model()
    eng = Engine(model, _tok())
    eng.start()

    async def consume() -> list:
        r = eng.submit([1, 2], SamplingParams(max_tokens=12, temperature=0, ignore_eot=True))
        return [ev async for ev in r.aevents()]

    try:
        evs = asyncio.run(consume())
    finally:
        eng.shutdown()
    assert len(evs) == 12 and evs[-1].finish_reason == "length"
    assert [ev.token_id for ev in evs] == _reference_greedy(model, [1, 2], 12)


def test_shutdown_finishes_running_rows_within_the_deadline():
    model = _model(block_size=512)
    eng = Engine(model, max_batch=2)
    eng.start()
    short = eng.submit([1], SamplingParams(max_tokens=5, temperature=0, ignore_eot=True))
    endless = eng.submit([1], SamplingParams(max_tokens=500, temperature=0, ignore_eot=True))
    next(endless.events(timeout=30))
    t = threading.Thread(target=eng.shutdown, kwargs={"deadline_s": 0.2})
    t.start()
    t.join(timeout=30)
    assert not t.is_alive()
    assert short.result().finish_reason == "length"
    assert endless.result().finish_reason in ("cancelled", "length")


def test_compiled_decode_step_matches_eager_and_never_recompiles():
    """``compile=True``: one compiled step over every cache slot replayed for every token (inductor on CPU
    here; on CUDA the same step is captured as a CUDA graph), tokens equal to the eager engine."""
    import torch._dynamo

    torch._dynamo.reset()
    model = _model(block_size=32)
    prompts = _prompts(3, seed=11)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eot=True)
    eager = Engine(model, max_batch=4).generate(prompts, params)
    eng = Engine(model, max_batch=4, compile=True)
    first = eng.generate(prompts, params)
    assert [c.token_ids for c in first] == [c.token_ids for c in eager]
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = eng.generate(prompts[::-1], params)
    assert [c.token_ids for c in again] == [c.token_ids for c in eager][::-1]
    torch._dynamo.reset()


@pytest.mark.gpu
def test_cuda_graph_engine_matches_eager_on_cuda():
    import torch._dynamo

    torch._dynamo.reset()
    model = _model(block_size=64).cuda().to(torch.bfloat16)
    prompts = _prompts(4, seed=12)
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eot=True)
    eager = Engine(model, max_batch=4).generate(prompts, params)
    eng = Engine(model, max_batch=4, compile=True)
    for _ in range(2):  # the second call replays the recorded graph
        out = eng.generate(prompts, params)
    # bf16: the whole-buffer attention may round differently; the first tokens must agree.
    assert [c.token_ids[:8] for c in out] == [c.token_ids[:8] for c in eager]
    torch._dynamo.reset()


def test_generate_takes_one_parameter_set_per_prompt():
    model = _model()
    eng = Engine(model, _tok(), max_batch=2)
    ps = [SamplingParams(max_tokens=6, temperature=1.0, seed=s, ignore_eot=True) for s in (1, 2)]
    both = eng.generate(["ab", "ab"], ps)
    assert [c.token_ids for c in both] == [eng.generate(["ab"], p)[0].token_ids for p in ps]
    with pytest.raises(InvalidParams, match="2 prompts but 1"):
        eng.generate(["ab", "cd"], ps[:1])


def test_bfloat16_weights_decode_on_cpu():
    """``--dtype bfloat16`` on CPU (half the bytes per token): the cache takes the weights' dtype, sampling
    reads fp32 logits, and the first token is the bf16 model's own argmax."""
    model = _model().to(torch.bfloat16)
    eng = Engine(model, max_batch=2)
    assert eng.dtype == torch.bfloat16
    out = eng.generate([[1, 2, 3], [4, 5]], SamplingParams(max_tokens=8, temperature=0, ignore_eot=True))
    assert eng.cache.k.dtype == torch.bfloat16
    assert all(c.finish_reason == "length" and len(c.token_ids) == 8 for c in out)
    with torch.no_grad():
        logits, _ = model(torch.tensor([[1, 2, 3]]))
    assert out[0].token_ids[0] == int(logits[0, -1].float().argmax())


# ---------------------------------------------------------------- batched prefill


def _count_forwards(model: GPT) -> tuple[list[tuple[int, int]], object]:
    """Observe the model: the (B, T) shape of every forward it runs."""
    shapes: list[tuple[int, int]] = []
    handle = model.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))
    return shapes, handle


@pytest.mark.parametrize("arch", list(ARCHS))
def test_burst_is_prefilled_in_few_forwards_and_each_row_equals_its_request_alone(arch):
    model = _model(**ARCHS[arch])
    prompts = _prompts(12, seed=21)  # 1..19 tokens: left padding matters
    assert len({len(p) for p in prompts}) > 4
    greedy = SamplingParams(max_tokens=16, temperature=0, ignore_eot=True)
    # The reference: the same engine code, each request alone (a prefill with no padding, a batch of one).
    alone = [Engine(model).generate([p], greedy)[0].token_ids for p in prompts]
    assert alone[0] == _reference_greedy(model, prompts[0], 16)
    eng = Engine(model, max_batch=16)
    reqs = [eng.submit(p, greedy) for p in prompts]  # the burst: all waiting before the engine steps
    shapes, handle = _count_forwards(model)
    try:
        eng.step()  # admits all 12 (prefill) and runs one decode step
        assert len(eng.rows) == 12 and all(len(r.req._events) == 2 for r in eng.rows)
        prefills = shapes[:-1]
        assert shapes[-1] == (12, 1)  # the decode step
        assert 1 <= len(prefills) < len(prompts) // 2  # batched, not one forward per prompt
        assert sum(b for b, _ in prefills) == 12
        for b, t in prefills:  # similar lengths per batch: never more padding than prompt tokens
            assert b * t <= 2 * sum(sorted(len(p) for p in prompts if len(p) <= t)[-b:])
        while not all(r.done for r in reqs):
            eng.step()
    finally:
        handle.remove()
    assert [r.result().token_ids for r in reqs] == alone
    # Reference mode (no cache) still prefills each prompt alone and agrees.
    full = Engine(model, max_batch=16, use_kv_cache=False).generate(prompts, greedy)
    assert [c.token_ids for c in full] == alone


def test_long_prompt_is_not_batched_with_short_ones():
    model = _model()
    eng = Engine(model, max_batch=8, max_prefill_tokens=64)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eot=True)
    lens = [2, 3, 40, 3, 2, 30]
    for n in lens:
        eng.submit([1 + n % 7] * n, params)
    shapes, handle = _count_forwards(model)
    try:
        eng.step()
    finally:
        handle.remove()
    # The four short prompts padded to 3 together; 30 and 40 tokens alone (2 x 40 > max_prefill_tokens).
    assert shapes == [(4, 3), (1, 30), (1, 40), (6, 1)]


def test_an_erroring_request_in_a_batch_fails_alone():
    model = _model()
    prompts = _prompts(5, seed=22)
    greedy = SamplingParams(max_tokens=10, temperature=0, ignore_eot=True)
    alone = [Engine(model).generate([p], greedy)[0].token_ids for p in prompts]
    bad = [V - 1] * 3  # the only prompt with end-of-text ids (_prompts draws from 0..V-2)

    def fault(module, args):  # a fault hook: any prefill that contains the bad prompt raises
        idx = args[0]
        if idx.size(1) > 1 and bool((idx == V - 1).any()):
            raise RuntimeError("injected prefill fault")

    eng = Engine(model, max_batch=8)
    reqs = [eng.submit(p, greedy) for p in prompts[:2]] + [eng.submit(bad, greedy)]
    reqs += [eng.submit(p, greedy) for p in prompts[2:]]
    handle = model.transformer.wte.register_forward_pre_hook(fault)
    try:
        while not all(r.done for r in reqs):
            eng.step()
    finally:
        handle.remove()
    failed = reqs.pop(2).result()
    assert failed.finish_reason == "error" and "injected prefill fault" in failed.error and not failed.token_ids
    assert [r.result().token_ids for r in reqs] == alone
    assert all(r.result().finish_reason == "length" for r in reqs)


def test_seeded_request_in_a_burst_gives_the_same_text_as_alone():
    model = _model()
    tok = _tok()
    target = SamplingParams(max_tokens=20, temperature=0.9, top_k=20, seed=77, ignore_eot=True)
    alone = Engine(model, tok).generate(["Hello there"], target)[0]
    eng = Engine(model, tok, max_batch=8)
    noise = [eng.submit(p, SamplingParams(max_tokens=25, temperature=t, seed=None))
             for p, t in zip(_prompts(6, seed=23), (0.0, 0.5, 1.0, 1.5, 2.0, 1.0))]
    got = eng.submit(tok.encode("Hello there"), target)
    shapes, handle = _count_forwards(model)
    try:
        eng.step()
    finally:
        handle.remove()
    assert len(shapes) - 1 < 7  # prefilled in a batch with the others
    while not all(r.done for r in noise + [got]):
        eng.step()
    assert got.result().token_ids == alone.token_ids and got.result().text == alone.text
