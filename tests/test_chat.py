"""Chat template, conversation files, packing with a loss mask, chat datasets and the masked loss."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gptlab import chat as C
from gptlab.data import shards as S
from gptlab.errors import GptlabError
from gptlab.tokenizer import CHAT_TOKENS, CharTokenizer, GPT2Tokenizer, fingerprint, from_spec

CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there  \n"},
        {"role": "assistant", "content": " Hello! 🙂\n\n"}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}]


def _char_tok() -> CharTokenizer:
    return CharTokenizer(sorted(set("abcdefghijklmnopqrstuvwxyz :?!.\n")), chat=True)


def test_gpt2_chat_tokens_sit_in_the_padded_rows():
    tok = GPT2Tokenizer(chat=True)
    assert tok.vocab_size == 50263 and tok.eot_id == 50256
    assert [tok.special_tokens[t] for t in CHAT_TOKENS] == list(range(50257, 50263))
    assert tok.decode([50259, 71, 50260]) == "<|user_start|>h<|user_end|>"
    # plain text never produces a turn token; only callers that ask for specials get them
    assert 50260 not in tok.encode("a<|user_end|>b")
    assert tok.encode("a<|user_end|>b", allow_special=True) == [64, 50260, 65]
    assert tok.encode("Hello world") == GPT2Tokenizer().encode("Hello world")
    assert from_spec(tok.spec()).vocab_size == 50263
    assert fingerprint(tok) != fingerprint(GPT2Tokenizer())
    assert C.is_chat_twin(GPT2Tokenizer().spec(), tok.spec())
    assert not C.is_chat_twin(_char_tok().spec(), tok.spec())


def test_render_ids_and_mask_gpt2():
    tok = GPT2Tokenizer(chat=True)
    t = C.ChatTemplate.for_tokenizer(tok)
    ids, mask = t.render(CONV)
    e = tok.encode
    sp = tok.special_tokens
    want = ([50256, sp["<|system_start|>"], *e("Be brief."), sp["<|system_end|>"],
             sp["<|user_start|>"], *e("Hi there  \n"), sp["<|user_end|>"],
             sp["<|assistant_start|>"], *e(" Hello! 🙂\n\n"), sp["<|assistant_end|>"],
             sp["<|user_start|>"], *e("2+2?"), sp["<|user_end|>"],
             sp["<|assistant_start|>"], *e("4"), sp["<|assistant_end|>"]])
    assert ids == want
    # 1 exactly on assistant content and its end token
    learned = [i for i, m in zip(ids, mask) if m]
    assert learned == [*e(" Hello! 🙂\n\n"), sp["<|assistant_end|>"], *e("4"), sp["<|assistant_end|>"]]
    assert tok.decode(ids).startswith("<|endoftext|><|system_start|>Be brief.<|system_end|>")
    prompt = t.prompt(CONV[:4])
    assert prompt == t.render(CONV[:4])[0] + [sp["<|assistant_start|>"]]


def test_char_template_has_no_bos_and_content_is_text():
    tok = _char_tok()
    t = C.ChatTemplate.for_tokenizer(tok)
    ids, mask = t.render([{"role": "user", "content": "ab"}, {"role": "assistant", "content": "c"}])
    n = len(tok.chars)
    assert ids == [n + 2, tok.stoi["a"], tok.stoi["b"], n + 3, n + 4, tok.stoi["c"], n + 5]
    assert mask == [0, 0, 0, 0, 0, 1, 1]
    with pytest.raises(C.ChatError, match="no chat tokens"):
        C.ChatTemplate.for_tokenizer(CharTokenizer(["a", "b"]))


@pytest.mark.parametrize("line, msg", [
    ("{not json", "not valid JSON"),
    ('{"text": "hi"}', "expected an object with a 'messages' list"),
    ('{"messages": []}', "non-empty list"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', "role 'bot' is not one of"),
    ('{"messages": [{"role": "user", "content": 3}]}', "'content' must be a string"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}', "alternate"),
    ('{"messages": [{"role": "assistant", "content": "a"}]}', "alternate"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, '
     '{"role": "system", "content": "c"}]}', "only first"),
    ('{"messages": [{"role": "user", "content": "a"}]}', "no assistant message"),
])
def test_bad_conversation_lines_are_one_line_errors(tmp_path, line, msg):
    good = json.dumps({"messages": CONV})
    p = tmp_path / "c.jsonl"
    p.write_text(good + "\n\n" + line + "\n" + good + "\n")
    with pytest.raises(C.ChatError) as ei:
        list(C.read_conversations(p))
    text = str(ei.value)
    assert text.startswith(f"{p}:3: ") and msg in text and "\n" not in text


def test_hf_apply_chat_template_gives_gptlab_ids(tmp_path):
    transformers = pytest.importorskip("transformers")
    from gptlab.config import ModelConfig
    from gptlab.hf import export_hf
    from gptlab.model import GPT

    for tok in (GPT2Tokenizer(chat=True), _char_tok()):
        cfg = ModelConfig(n_layer=1, n_head=2, n_embd=8, block_size=32, vocab_size=tok.vocab_size)
        out = tmp_path / tok.name
        export_hf(GPT(cfg), tok, out)
        hf = transformers.AutoTokenizer.from_pretrained(str(out))
        t = C.ChatTemplate.for_tokenizer(tok)
        convs = [CONV, CONV[1:3], [{"role": "user", "content": "what is this?"}]]
        if tok.name == "char":
            convs = [[{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "yo!\n"}],
                     [{"role": "system", "content": "be nice."}, {"role": "user", "content": "a b c"}]]
        for msgs in convs:
            for gen in (False, True):
                if gen and msgs[-1]["role"] == "assistant":
                    continue
                got = hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen)
                got = got["input_ids"] if not isinstance(got, list) else got
                assert got == t.render(msgs, add_generation_prompt=gen)[0], (tok.name, msgs, gen)
        ids = t.render(convs[0])[0]
        assert hf.decode(ids, skip_special_tokens=False) == tok.decode(ids)


def test_best_fit_packing():
    sizes = (5, 3, 8, 2, 6, 12, 1, 4)
    items = [([k + 1] * n, [0] + [1] * (n - 1)) for k, n in enumerate(sizes)]  # conversation k is all k+1
    st = C.PackStats()
    rows = list(C.pack_rows(items, 8, pad_id=0, pool=4, stats=st))
    assert all(r[0].size == 8 and r[1].size == 8 for r in rows)
    assert st.conversations == 8 and st.cropped == 1 and st.dropped == 0
    # rows start with conversations in input order, then are filled with the longest that fits
    assert [r[0].tolist() for r in rows] == [[1, 1, 1, 1, 1, 2, 2, 2], [3] * 8, [4, 4, 5, 5, 5, 5, 5, 5],
                                             [6] * 8, [7, 8, 8, 8, 8, 0, 0, 0]]
    assert rows[4][1].tolist() == [0, 0, 1, 1, 1, 0, 0, 0]
    lone = C.PackStats()
    assert list(C.pack_rows([([9], [0])], 8, pad_id=0, stats=lone)) == [] and lone.dropped == 1  # no target
    assert sum(int(r[1].sum()) for r in rows) == st.targets
    assert st.tokens + st.pad == 8 * st.rows
    for ids, mask in rows:  # padding is masked
        assert not mask[ids == 0].any()


def _write_convs(path, n, seed=0):
    from gptlab.evals.chat import task_conversations

    convs = task_conversations(n, seed)
    convs[3] = [{"role": "system", "content": "answer well"}] + convs[3]
    C.write_conversations(path, convs)
    return convs


def test_prepare_chat_verify_and_loader_masks(tmp_path):
    from gptlab.data.loader import TokenLoader
    from gptlab.data.prepare import prepare_chat

    base = CharTokenizer(sorted(set("abcdefghijklmnopqrstuvwxyz :")))
    convs = _write_convs(tmp_path / "c.jsonl", 200)
    res = prepare_chat("chat", input=tmp_path / "c.jsonl", out=tmp_path / "d", tokenizer=base, seq_len=48,
                       shard_tokens=48 * 20 + 1, val_fraction=0.1, progress=False)
    assert res["documents"] == 200 and res["splits"]["val"]["documents"] == 20
    m = S.read_manifest(tmp_path / "d")
    assert m["tokenizer"] == {**base.spec(), "chat": True} and m["vocab_size"] == base.vocab_size + 6
    assert m["chat"]["seq_len"] == 48 and len(m["shards"]) > 2
    v = S.verify_dataset(tmp_path / "d")
    assert "loss_mask" in v["checked"]

    tok = from_spec(m["tokenizer"])
    t = C.ChatTemplate.for_tokenizer(tok)
    loader = TokenLoader(tmp_path / "d", "train", 4, 48)
    seen = 0
    for _ in range(loader.batches_per_epoch):
        x, y = loader.next_batch()
        for xr, yr in zip(x.tolist(), y.tolist()):
            assert xr[0] == t.start["user"] or xr[0] == t.start["system"]  # every row starts a conversation
            # targets kept are exactly the assistant replies (+ end token) of the conversations in the row
            starts = [i for i, tid in enumerate(xr) if tid == t.start["assistant"]]
            for i in range(48 - 1):
                inside = any(s <= i and t.stop_id not in xr[s + 1:i + 1] for s in starts)
                assert (yr[i] != -1) == inside, (i, xr, yr)
                if yr[i] != -1:
                    assert yr[i] == xr[i + 1]
            seen += sum(1 for v in yr if v == t.stop_id)
    assert seen >= loader.batches_per_epoch * 4  # at least one reply per row

    with pytest.raises(GptlabError, match="set batch.seq_len=48"):
        TokenLoader(tmp_path / "d", "train", 4, 32)
    # a flipped mask byte is caught by --verify
    mask_file = tmp_path / "d" / m["shards"][0]["mask"]
    raw = bytearray(mask_file.read_bytes())
    raw[S.HEADER_BYTES + 5] ^= 1
    mask_file.write_bytes(bytes(raw))
    with pytest.raises(S.ShardError, match="sha256 does not match"):
        S.verify_dataset(tmp_path / "d")
    raw[S.HEADER_BYTES + 5] = 7
    mask_file.write_bytes(bytes(raw))
    with pytest.raises(S.ShardError, match="only 0 and 1"):
        S.verify_dataset(tmp_path / "d", check_hash=False)


def test_prepare_chat_bad_line_writes_nothing(tmp_path):
    from gptlab.data.prepare import prepare_chat

    p = tmp_path / "c.jsonl"
    p.write_text('{"messages": [{"role": "user", "content": "a"}]}\n')
    with pytest.raises(C.ChatError, match=r"c.jsonl:1: no assistant message"):
        prepare_chat("chat", input=p, out=tmp_path / "d", progress=False)
    assert not (tmp_path / "d").exists()
    p.write_text(json.dumps({"messages": CONV[1:3]}) + "\n" + json.dumps({"messages": CONV[1:3]}) + "\n")
    with pytest.raises(GptlabError, match=r"c.jsonl:1: character 'H' is not in"):
        prepare_chat("chat", input=p, out=tmp_path / "d", tokenizer=_char_tok(), progress=False)
    assert not (tmp_path / "d" / S.MANIFEST).exists()  # built beside --out: nothing claims to be a dataset


def test_masked_loss_ignores_user_targets_and_sees_assistant_ones(tmp_path):
    """Changing only user-turn targets leaves the loss unchanged; changing assistant targets changes it."""
    from gptlab.config import ModelConfig
    from gptlab.data.loader import TokenLoader
    from gptlab.data.prepare import prepare_chat
    from gptlab.model import GPT

    base = CharTokenizer(sorted(set("abcdefghijklmnopqrstuvwxyz :")))
    _write_convs(tmp_path / "c.jsonl", 60)
    prepare_chat("chat", input=tmp_path / "c.jsonl", out=tmp_path / "d", tokenizer=base, seq_len=48,
                 val_fraction=0.0, progress=False)
    m = S.read_manifest(tmp_path / "d")
    x, y = TokenLoader(tmp_path / "d", "train", 4, 48).next_batch()
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=48, vocab_size=m["vocab_size"]))
    t = C.ChatTemplate.for_tokenizer(from_spec(m["tokenizer"]))
    full = torch.cat([x[:, 1:], x[:, -1:]], dim=1)  # the unmasked next tokens (last column: any token)
    learned = y != -1
    user = torch.zeros_like(learned)
    for r, row in enumerate(x.tolist()):
        for i, tid in enumerate(row[:-1]):  # targets inside user turns: content after <|user_start|> ...
            user[r, i] = any(row[s] == t.start["user"] and t.end["user"] not in row[s + 1:i + 1] for s in range(i + 1))
    assert user.any() and learned.any() and not (user & learned).any()

    def loss_of(targets: torch.Tensor) -> float:
        # the production path: the mask file decides which targets count (-1 = ignored by the model)
        masked = torch.where(learned, targets, torch.full_like(targets, -1))
        return model(x, masked)[1].item()

    base_loss = loss_of(full)
    assert base_loss == pytest.approx(model(x, y)[1].item(), abs=0)
    other = (full + 1) % m["vocab_size"]
    assert loss_of(torch.where(user, other, full)) == base_loss
    assert loss_of(torch.where(learned, other, full)) != pytest.approx(base_loss, rel=1e-3)


def test_extend_vocab_unmasks_chat_rows_without_resizing():
    from gptlab.config import ModelConfig
    from gptlab.model import GPT

    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=50257, pad_vocab_multiple=128)
    model = GPT(cfg)
    with torch.no_grad():
        model.transformer.wte.weight[50257:].zero_()
    x = torch.randint(0, 50257, (2, 8))
    y = torch.full((2, 8), 50262)
    assert model(x, y)[1].item() == float("inf")  # the padded rows are masked out of the loss
    big = C.extend_vocab(model, 50263)
    assert big.config.padded_vocab_size == 50304 and big.transformer.wte.weight.shape == (50304, 16)
    w0, w1 = model.transformer.wte.weight, big.transformer.wte.weight
    assert torch.equal(w1[:50257], w0[:50257]) and torch.equal(w1[50263:], w0[50263:])
    assert torch.allclose(w1[50257], w0[:50257].mean(0))
    logits, loss = big(x, y)
    assert logits.shape[-1] == 50263 and torch.isfinite(loss)
    loss.backward()
    assert big.transformer.wte.weight.grad[50262].abs().sum() > 0  # the chat row trains
    # the old vocabulary computes exactly what it did (the new rows only add choices)
    with torch.no_grad():
        assert torch.equal(big(x)[0][..., :50257], model(x)[0])
    # an unpadded model (OpenAI's weights: 50257 rows) is padded to the multiple
    plain = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=50257))
    grown = C.extend_vocab(plain, 50263, pad_multiple=128)
    assert grown.transformer.wte.weight.shape == (50304, 16) and grown.config.vocab_size == 50263
    assert C.extend_vocab(grown, 50263) is grown


def _hf_greedy_reply(hf, tok, prompt_ids, max_new):
    """Reference reply: transformers' greedy generate, cut at the first turn token, decoded."""
    stops = sorted(tok.special_tokens.values())
    out = hf.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new, do_sample=False, eos_token_id=stops,
                      pad_token_id=stops[0], attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long))
    new = out[0, len(prompt_ids):].tolist()
    cut = next((i for i, v in enumerate(new) if v in stops), len(new))
    return tok.decode(new[:cut])


def test_chat_accuracy_is_exact_match_of_greedy_replies():
    pytest.importorskip("transformers")
    from gptlab.config import ModelConfig
    from gptlab.evals.chat import chat_accuracy, task_examples
    from gptlab.hf import to_hf_model
    from gptlab.model import GPT

    tok = _char_tok()
    t = C.ChatTemplate.for_tokenizer(tok)
    torch.manual_seed(3)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=48, vocab_size=tok.vocab_size,
                            init_std=0.5))
    hf = to_hf_model(model)
    qs = [q for q, _ in task_examples(12, 0, held_out=True)]
    replies = [_hf_greedy_reply(hf, tok, t.prompt([{"role": "user", "content": q}]), 12) for q in qs]
    assert len(set(replies)) > 3  # the model says different things
    assert chat_accuracy(model, tok, list(zip(qs, replies)), max_new_tokens=12) == {"accuracy": 1.0, "n": 12,
                                                                                      "correct": 12}
    wrong = [(q, r + "x") if i % 3 == 0 else (q, r) for i, (q, r) in enumerate(zip(qs, replies))]
    assert chat_accuracy(model, tok, wrong, max_new_tokens=12)["correct"] == 8
    assert model.training  # left as it was


def test_smoltalk_streams_the_hub_splits_or_reads_a_local_copy(tmp_path, monkeypatch):
    """The Hub path (load_hf_dataset replaced: tests stay offline) takes the test split as val; --input
    reads a local copy (JSONL, or the Hub's parquet files); offline without input is one line naming --input."""
    from gptlab.data import sources
    from gptlab.data.prepare import prepare_dataset

    rows = {"train": [{"messages": CONV[1:3], "source": "x"}] * 30, "test": [{"messages": CONV[1:3]}] * 4}
    calls = []

    def fake(path, name, split, streaming=True):
        calls.append((path, name, split))
        return iter(rows[split])

    monkeypatch.setattr(sources, "load_hf_dataset", fake)
    res = prepare_dataset("smoltalk", out=tmp_path / "hub", seq_len=64, progress=False)
    assert ("HuggingFaceTB/smoltalk", "all", "test") in calls and ("HuggingFaceTB/smoltalk", "all", "train") in calls
    assert res["splits"]["val"]["documents"] == 4 and res["splits"]["train"]["documents"] == 30
    assert S.verify_dataset(tmp_path / "hub")["ok"]

    def offline(path, name, split, streaming=True):
        raise ConnectionError("cannot resolve huggingface.co")

    monkeypatch.setattr(sources, "load_hf_dataset", offline)
    with pytest.raises(GptlabError) as ei:
        prepare_dataset("smoltalk", out=tmp_path / "off", seq_len=64, progress=False)
    assert "--input FILE.jsonl" in str(ei.value) and "\n" not in str(ei.value)
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.table({"messages": [CONV[1:3]] * 20}), tmp_path / "train-0.parquet")
    res = prepare_dataset("smoltalk", input=str(tmp_path / "train-0.parquet"), out=tmp_path / "local", seq_len=64,
                          val_fraction=0.1, progress=False)
    assert res["documents"] == 20 and res["splits"]["val"]["documents"] == 2


def test_cli_prepare_chat_and_verify(tmp_path, capsys):
    from gptlab.cli import main

    C.write_conversations(tmp_path / "c.jsonl", [CONV] * 40)
    assert main(["prepare", "chat", "--input", str(tmp_path / "c.jsonl"), "--out", str(tmp_path / "d"),
                 "--seq-len", "128", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["chat"]["seq_len"] == 128 and res["vocab_size"] == 50263 and res["documents"] == 40
    assert main(["prepare", "--verify", str(tmp_path / "d"), "--json"]) == 0
    assert "loss_mask" in json.loads(capsys.readouterr().out)["checked"]
    (tmp_path / "bad.jsonl").write_text('{"messages": [{"role": "user", "content": "a"}]}\n')
    assert main(["prepare", "chat", "--input", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "e")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.endswith("bad.jsonl:1: no assistant message, so nothing to learn from it") and "\n" not in err
    assert main(["prepare", "pydocs", "--seq-len", "64", "--out", str(tmp_path / "f")]) == 1
    assert "--seq-len applies to chat datasets only" in capsys.readouterr().err
