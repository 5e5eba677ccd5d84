"""HellaSwag scoring against an independent transformers computation on the same tiny random model."""

from __future__ import annotations

import json

import pytest
import torch

from gptlab.config import ModelConfig
from gptlab.evals import hellaswag as hs
from gptlab.model import GPT
from gptlab.tokenizer import GPT2Tokenizer

BLOCK = 64  # small context so that the long example below must be left-truncated

# Hand-made examples in rowanz/hellaswag's jsonl format (same fields as hellaswag_val.jsonl).
_RAW = [
    ("Removing ice from car", "Then, the man writes over the snow covering the window of a car, and a woman wearing "
     "winter clothes smiles.", "then", 3,
     [", the man adds wax to the windshield and cuts it.", ", a person board a ski lift, while two men supporting "
      "the head of the person wearing winter clothes snow as the we girls sled.",
      ", the man puts on a christmas coat, knitted with netting.",
      ", the man continues removing the snow on his car."]),
    ("Baking cookies", "A woman is in a kitchen.", "She", 0,
     ["mixes flour and sugar in a bowl.", "jumps out of a plane.", "drives a tractor across the field.",
      "plays the violin on a stage."]),
    ("Tennis", "Two players stand on a clay court. One of them tosses the ball high into the air and",
     "", 2, ["sings.", "the crowd eats popcorn while the umpire sleeps on a chair next to the net for hours.",
             "serves it hard across the net.", "falls."]),
    ("Personal Care and Style", "[header] How to braid your hair [title] Brush your hair thoroughly. [step] "
     "Start with clean, dry hair and work out every tangle with a wide-toothed comb, going from the ends up to "
     "the roots so that you do not pull or break the strands. [title] Divide your hair into three equal "
     "sections.", "[step]", 1,
     ["Paint each section a different colour and leave it to dry overnight before you go outside.",
      "Hold the left section in your left hand, the right section in your right hand and the middle one "
      "between your thumbs.", "Cut the middle section off completely.", "Throw the comb away."]),
    ("Playing guitar", "A boy sits on a bed holding a guitar.", "He", 3,
     ["eats the guitar.", "throws it out the window and runs.", "is a guitar.",
      "strums a few chords and smiles at the camera."]),
    ("Washing dishes", "A man fills the sink with soapy water.", "He then", 0,
     ["scrubs the plates with a sponge and rinses them.", "paints the sink.", "reads a newspaper.", "flies away."]),
    ("Running a marathon", "Hundreds of runners wait at the starting line as the announcer counts down.", "The",
     2, ["runners go to sleep.", "announcer eats a sandwich slowly and carefully.",
         "gun fires and the runners surge forward.", "line turns blue."]),
]


def _examples() -> list[dict]:
    out = []
    for i, (activity, ctx_a, ctx_b, label, endings) in enumerate(_RAW):
        ctx = (ctx_a + " " + ctx_b).strip() if ctx_b else ctx_a
        out.append({"ind": 100 + i, "activity_label": activity, "ctx_a": ctx_a, "ctx_b": ctx_b, "ctx": ctx,
                    "split": "val", "split_type": "indomain", "label": label, "endings": endings,
                    "source_id": f"hand-made~{i}"})
    return out


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory):
    path = tmp_path_factory.mktemp("hs") / "hellaswag_val.jsonl"
    path.write_text("".join(json.dumps(ex) + "\n" for ex in _examples()), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def hf_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    # A larger init range than GPT-2's 0.02 makes the random model's choices decisive (no near ties).
    cfg = GPT2Config(vocab_size=50257, n_positions=BLOCK, n_embd=32, n_layer=2, n_head=2, initializer_range=0.2)
    return GPT2LMHeadModel(cfg).eval()


def _to_gptlab(hf) -> GPT:
    """Local HF -> gptlab conversion (Conv1D weights are stored transposed), independent of gptlab.hf."""
    cfg = ModelConfig(block_size=BLOCK, vocab_size=50257, n_layer=2, n_head=2, n_embd=32)
    model = GPT(cfg)
    hf_sd = hf.state_dict()
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    model.load_state_dict({k: hf_sd[k].t() if k.endswith(conv1d) else hf_sd[k] for k in model.state_dict()})
    return model.eval()


@pytest.fixture(scope="module")
def model(hf_model):
    return _to_gptlab(hf_model)


def _hf_tokenizer():
    """transformers' own GPT-2 BPE built from OpenAI's vocabulary files (not tiktoken)."""
    from transformers import GPT2TokenizerFast

    from gptlab.tokenizer import gpt2_vocab_files

    vocab_bpe, encoder_json = gpt2_vocab_files()
    merges = [tuple(line.split(" ")) for line in vocab_bpe.read_text(encoding="utf-8").split("\n")[1:] if line]
    return GPT2TokenizerFast(vocab=json.loads(encoder_json.read_text(encoding="utf-8")), merges=merges)


@torch.no_grad()
def _reference(hf, examples):
    """Score each candidate alone (no batching, no padding) with transformers."""
    tok = _hf_tokenizer()
    results = []
    for ex in examples:
        ctx = tok.encode(ex["ctx"])
        sums, counts, truncated = [], [], False
        for ending in ex["endings"]:
            end = tok.encode(" " + ending)
            ids = ctx + end
            n_end = len(end)
            if len(ids) > BLOCK:
                ids, truncated = ids[-BLOCK:], True
                n_end = min(n_end, BLOCK - 1)
            logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), -1)  # (T, V)
            target = torch.tensor(ids[1:])
            token_logp = logp[:-1].gather(1, target[:, None])[:, 0]
            nll = -token_logp[-n_end:]  # the ending's tokens are the last n_end targets
            sums.append(nll.sum().item())
            counts.append(n_end)
        s = torch.tensor(sums)
        m = s / torch.tensor(counts, dtype=torch.float64)
        results.append(dict(pred=int(s.argmin()), pred_norm=int(m.argmin()), sums=sums, counts=counts,
                            truncated=truncated, margin=float((m.sort().values[1] - m.min()))))
    return results


def test_matches_transformers_exactly(jsonl, hf_model, model):
    examples = hs.load_hellaswag(jsonl)
    assert [ex["ind"] for ex in examples] == [100 + i for i in range(len(_RAW))]
    ref = _reference(hf_model, examples)
    assert sum(r["truncated"] for r in ref) == 1  # the wikiHow example does not fit in 64 tokens
    assert min(r["margin"] for r in ref) > 1e-4  # decisions are not float noise

    res = hs.evaluate_hellaswag(model, examples, GPT2Tokenizer(), device="cpu", batch_size=3,
                                return_predictions=True)
    assert res["pred"] == [r["pred"] for r in ref]
    assert res["pred_norm"] == [r["pred_norm"] for r in ref]
    labels = [ex["label"] for ex in examples]
    correct = sum(r["pred"] == y for r, y in zip(ref, labels))
    correct_norm = sum(r["pred_norm"] == y for r, y in zip(ref, labels))
    assert (res["n"], res["correct"], res["correct_norm"]) == (len(examples), correct, correct_norm)
    assert res["acc"] == correct / len(examples) and res["acc_norm"] == correct_norm / len(examples)
    assert res["truncated"] == 1
    # The per-ending losses themselves, not only the argmins.
    assert res["ending_tokens"] == [r["counts"] for r in ref]
    got = torch.tensor(res["ending_loss"], dtype=torch.float64)
    want = torch.tensor([r["sums"] for r in ref], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_batching_padding_and_limit_do_not_change_choices(jsonl, model):
    examples = hs.load_hellaswag(jsonl)
    tok = GPT2Tokenizer()
    one = hs.evaluate_hellaswag(model, examples, tok, device="cpu", batch_size=1, return_predictions=True)
    many = hs.evaluate_hellaswag(model, examples, tok, device="cpu", batch_size=16, return_predictions=True)
    assert one["pred"] == many["pred"] and one["pred_norm"] == many["pred_norm"]
    torch.testing.assert_close(torch.tensor(one["ending_loss"]), torch.tensor(many["ending_loss"]),
                               rtol=1e-5, atol=1e-4)
    lim = hs.evaluate_hellaswag(model, examples, tok, device="cpu", batch_size=2, limit=3, return_predictions=True)
    assert lim["n"] == 3 and lim["pred_norm"] == one["pred_norm"][:3]


@pytest.mark.slow
def test_compiled_model_and_restored_training_mode(jsonl, model):
    examples = hs.load_hellaswag(jsonl)[:4]
    tok = GPT2Tokenizer()
    want = hs.evaluate_hellaswag(model, examples, tok, device="cpu", batch_size=2, return_predictions=True)
    model.train()
    compiled = torch.compile(model, backend="aot_eager", dynamic=True)  # inductor would need minutes on CPU
    try:
        got = hs.evaluate_hellaswag(compiled, examples, tok, device="cpu", batch_size=2, return_predictions=True)
        assert model.training  # evaluation switches to eval mode and back
    finally:
        model.eval()
    assert got["pred"] == want["pred"] and got["pred_norm"] == want["pred_norm"]


def test_render_example_masks_only_the_ending():
    tok = GPT2Tokenizer()
    ex = {"ctx": "A man is sitting on a roof.", "endings": ["he is", "starts pulling up roofing.", "a", "b c"],
          "label": 1}
    rows, starts, cut = hs.render_example(ex, tok)
    ctx = tok.encode(ex["ctx"])
    assert not cut and starts == [len(ctx)] * 4
    for row, ending in zip(rows, ex["endings"]):
        assert row == ctx + tok.encode(" " + ending)
    tokens, mask = hs.collate([(rows, starts)])
    assert tokens.shape == (4, max(map(len, rows)))
    assert mask.sum(1).tolist() == [len(r) - len(ctx) for r in rows]
    rows8, starts8, cut8 = hs.render_example(ex, tok, max_len=8)
    assert cut8 and all(len(r) <= 8 for r in rows8)
    assert all(r == full[-8:] if len(full) > 8 else r == full for r, full in zip(rows8, rows))


def _seeded_model_counts(jsonl_path: str) -> dict:
    """HellaSwag of a seeded random model on ``jsonl_path`` (under torch.distributed: all ranks together)."""
    torch.manual_seed(0)
    m = GPT(ModelConfig(block_size=BLOCK, vocab_size=50257, n_layer=1, n_head=2, n_embd=16)).eval()
    return hs.evaluate_hellaswag(m, hs.load_hellaswag(jsonl_path), GPT2Tokenizer(), device="cpu", batch_size=2)


@pytest.mark.slow
def test_ddp_sharded_counts_equal_single_process(jsonl, tmp_path):
    from dist_util import run_on_gloo_ranks

    single = _seeded_model_counts(str(jsonl))
    for rank, res in enumerate(run_on_gloo_ranks(_seeded_model_counts, 2, tmp_path, str(jsonl))):
        for key in ("n", "correct", "correct_norm", "acc", "acc_norm", "truncated"):
            assert res[key] == single[key], (rank, key)


# --------------------------------------------------------------------------- data loading


def test_bad_files_name_the_line(tmp_path):
    good = json.dumps(_examples()[0])
    cases = {
        "not valid JSON": "{oops",
        "missing field 'endings'": json.dumps({"ctx": "a", "label": 0}),
        "'label' must be an integer": json.dumps({**_examples()[0], "label": 7}),
        "list of 4 strings": json.dumps({**_examples()[0], "endings": ["a", "b"]}),
    }
    for i, (msg, line) in enumerate(cases.items()):
        p = tmp_path / f"bad{i}.jsonl"
        p.write_text(good + "\n" + line + "\n", encoding="utf-8")
        with pytest.raises(hs.HellaSwagError, match=msg) as e:
            hs.load_hellaswag(p)
        assert f"{p}:2" in str(e.value)
    with pytest.raises(hs.HellaSwagError, match="not found"):
        hs.load_hellaswag(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(hs.HellaSwagError, match="no examples"):
        hs.load_hellaswag(tmp_path / "empty.jsonl")


def test_offline_without_input_says_where_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTLAB_DATA_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(hs.HellaSwagError) as e:
        hs.load_hellaswag(split="val")
    msg = str(e.value)
    assert "hellaswag_val.jsonl" in msg and "--input" in msg and "\n" not in msg
    # Online but unreachable: the same hint.
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("GPTLAB_OFFLINE", raising=False)
    monkeypatch.setattr(hs, "HELLASWAG_URL", "http://127.0.0.1:9/hellaswag_{split}.jsonl")
    with pytest.raises(hs.HellaSwagError, match="--input"):
        hs.load_hellaswag(split="val")


def test_download_is_cached_and_checked(tmp_path, monkeypatch, jsonl):
    monkeypatch.setenv("GPTLAB_DATA_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("GPTLAB_OFFLINE", raising=False)
    src = tmp_path / "remote"
    src.mkdir()
    (src / "hellaswag_val.jsonl").write_text(jsonl.read_text(encoding="utf-8"), encoding="utf-8")
    monkeypatch.setattr(hs, "HELLASWAG_URL", src.as_uri() + "/hellaswag_{split}.jsonl")
    # A download with the wrong example count is rejected and leaves nothing behind.
    with pytest.raises(hs.HellaSwagError, match="expected 10042"):
        hs.load_hellaswag(split="val", progress=False)
    assert not list((tmp_path / "home").rglob("*.jsonl*"))
    monkeypatch.setitem(hs.HELLASWAG_SIZES, "val", len(_RAW))
    got = hs.load_hellaswag(split="val", progress=False)
    assert [ex["ind"] for ex in got] == [ex["ind"] for ex in _examples()]
    cached = hs.hellaswag_cache_dir() / "hellaswag_val.jsonl"
    assert cached.is_file() and str(cached).startswith(str(tmp_path / "home"))
    (src / "hellaswag_val.jsonl").unlink()  # the second call reads the cache, not the "network"
    assert len(hs.load_hellaswag(split="val", progress=False)) == len(_RAW)


def test_cli_with_a_hugging_face_dir(jsonl, hf_model, tmp_path, capsys, monkeypatch):
    from gptlab.cli import main

    hf_dir = tmp_path / "hf"
    hf_model.save_pretrained(hf_dir)
    examples = hs.load_hellaswag(jsonl)
    ref = _reference(hf_model, examples)
    rc = main(["eval", "hellaswag", "--init", str(hf_dir), "--input", str(jsonl), "--batch-size", "4",
               "--device", "cpu", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["task"] == "hellaswag" and out["n"] == len(examples)
    assert out["correct"] == sum(r["pred"] == ex["label"] for r, ex in zip(ref, examples))
    assert out["correct_norm"] == sum(r["pred_norm"] == ex["label"] for r, ex in zip(ref, examples))
    assert out["acc_norm"] == out["correct_norm"] / out["n"] and "seconds" in out
    # Offline with nothing cached and no --input: exit 1, one line naming the flag.
    monkeypatch.setenv("GPTLAB_DATA_HOME", str(tmp_path / "empty"))
    monkeypatch.setenv("GPTLAB_OFFLINE", "1")
    assert main(["eval", "hellaswag", "--init", str(hf_dir), "--device", "cpu", "--json"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("gptlab eval: error:") and "--input" in err and "\n" not in err
