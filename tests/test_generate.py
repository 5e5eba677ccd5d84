"""Sampling: probability transforms against direct computations, KV cache against full recomputation, the CLI."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from gptlab.config import MODERN_ARCH, ModelConfig
from gptlab.errors import GptlabError
from gptlab.generate import decode_one_token, generate, logits_to_probs, sample
from gptlab.model import GPT

V = 97



def _model(block_size: int = 16, seed: int = 0, **overrides) -> GPT:
    cfg = ModelConfig.from_preset("tiny", **{"vocab_size": V, "block_size": block_size, **overrides})
    torch.manual_seed(seed)
    m = GPT(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # sharpen the random model so sampled tokens depend on the context
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return m.eval()


def _prompt(batch: int = 3, n: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (batch, n), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- logits -> probs


def test_temperature_is_softmax_of_scaled_logits():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    for t in (0.5, 1.0, 2.0):
        want = torch.exp(logits / t) / torch.exp(logits / t).sum(-1, keepdim=True)
        assert torch.allclose(logits_to_probs(logits, t), want, atol=1e-6)
    with pytest.raises(ValueError):
        logits_to_probs(logits, 0.0)


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(1))
    k = 7
    probs = logits_to_probs(logits, 0.8, top_k=k)
    for row, lrow in zip(probs, logits):
        keep = sorted(range(40), key=lambda i: -lrow[i].item())[:k]
        z = sum(math.exp(lrow[i].item() / 0.8) for i in keep)
        for i in range(40):
            want = math.exp(lrow[i].item() / 0.8) / z if i in keep else 0.0
            assert abs(row[i].item() - want) < 1e-6
    assert torch.equal(logits_to_probs(logits, 1.0, top_k=40), logits_to_probs(logits, 1.0))


def test_top_p_keeps_the_smallest_nucleus():
    p = torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]])
    logits = p.log()
    # sorted: 0.4, 0.3, 0.15, 0.1, 0.05 -> 0.4+0.3 = 0.7 < 0.75, adding 0.15 reaches 0.85
    got = logits_to_probs(logits, 1.0, top_p=0.75)[0]
    want = torch.tensor([0.0, 0.4, 0.0, 0.3, 0.15]) / 0.85
    assert torch.allclose(got, want, atol=1e-6)
    # the most likely token always survives, even for a tiny top_p
    assert torch.allclose(logits_to_probs(logits, 1.0, top_p=0.01)[0], torch.tensor([0.0, 1, 0, 0, 0]))
    # random rows against a direct loop, after temperature and top-k
    logits = torch.randn(5, 30, generator=torch.Generator().manual_seed(2))
    got = logits_to_probs(logits, 1.3, top_k=20, top_p=0.6)
    for row, lrow in zip(got, logits):
        base = logits_to_probs(lrow[None], 1.3, top_k=20)[0].tolist()
        order = sorted(range(30), key=lambda i: -base[i])
        kept, mass = [], 0.0
        for i in order:
            if mass >= 0.6:
                break
            kept.append(i)
            mass += base[i]
        for i in range(30):
            assert abs(row[i].item() - (base[i] / mass if i in kept else 0.0)) < 1e-5


def test_probs_match_transformers_logits_warpers():
    tf = pytest.importorskip("transformers")
    logits = torch.randn(8, 200, generator=torch.Generator().manual_seed(4)) * 3
    for t, k, p in [(0.7, None, 0.9), (1.0, 20, None), (1.3, 50, 0.5), (0.9, 5, 0.99)]:
        x = tf.TemperatureLogitsWarper(t)(None, logits.clone())
        if k:
            x = tf.TopKLogitsWarper(k)(None, x)
        if p:
            x = tf.TopPLogitsWarper(p)(None, x)
        assert torch.allclose(logits_to_probs(logits, t, k, p), torch.softmax(x, -1), atol=1e-6)


def test_sample_greedy_and_support():
    logits = torch.randn(6, 30, generator=torch.Generator().manual_seed(3))
    assert torch.equal(sample(logits, temperature=0), logits.argmax(-1, keepdim=True))
    assert torch.equal(sample(logits[:, None, :], temperature=0), logits.argmax(-1, keepdim=True))
    g = torch.Generator().manual_seed(0)
    top3 = logits.topk(3, dim=-1).indices
    for _ in range(50):
        s = sample(logits, 1.0, top_k=3, generator=g)
        assert (s == top3).any(dim=-1).all()


def test_sampling_frequencies_follow_the_probabilities():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    probs = logits_to_probs(logits, 0.7)[0]
    g = torch.Generator().manual_seed(0)
    n = 20000
    draws = torch.cat([sample(logits.expand(1000, 4), 0.7, generator=g) for _ in range(n // 1000)]).flatten()
    freq = torch.bincount(draws, minlength=4).float() / n
    # 4 standard errors of a binomial proportion
    assert torch.all((freq - probs).abs() < 4 * torch.sqrt(probs * (1 - probs) / n))


# --------------------------------------------------------------------------- KV cache == recomputation


ARCHS = {
    "gpt2": {},
    "modern": dict(MODERN_ARCH, n_kv_head=2),
}


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("mode", ["greedy", "sampled"])
def test_kv_cache_equals_recomputation(arch, mode):
    model = _model(block_size=40, **ARCHS[arch])
    idx = _prompt(batch=3, n=5)
    kw = dict(temperature=0.0) if mode == "greedy" else dict(temperature=0.9, top_k=40, top_p=0.95)
    out_cache = generate(model, idx, 30, use_kv_cache=True, seed=7, **kw)
    out_full = generate(model, idx, 30, use_kv_cache=False, seed=7, **kw)
    assert out_cache.shape == (3, 35)
    assert torch.equal(out_cache[:, :5], idx)
    assert torch.equal(out_cache, out_full)
    # independent reference: nanoGPT's loop written out, greedy only
    if mode == "greedy":
        seq = idx
        for _ in range(30):
            with torch.no_grad():
                logits, _ = model(seq)
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert torch.equal(out_cache, seq)
    assert len(set(map(tuple, out_cache[:, 5:].tolist()))) > 1  # rows really differ


def test_decode_one_token_on_the_cache_equals_the_full_forward():
    model = _model(block_size=32)
    idx = _prompt(batch=2, n=9)
    cache = model.new_kv_cache(2, max_seq_len=32)
    with torch.no_grad():
        full, _ = model(idx)
        pos = torch.arange(8).expand(2, -1)
        first = decode_one_token(model, idx[:, :8], cache, pos, kv_len=8, temperature=0)
        nxt = decode_one_token(model, idx[:, 8:9], cache, torch.tensor([[8], [8]]), temperature=0)
    assert torch.equal(first, full[:, 7].argmax(-1, keepdim=True))
    assert torch.equal(nxt, full[:, 8].argmax(-1, keepdim=True))


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    model = _model()
    idx = _prompt(batch=2)
    a = generate(model, idx, 10, seed=1)
    b = generate(model, idx, 10, seed=1)
    c = generate(model, idx, 10, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_generate_refuses_more_than_the_context_window_and_restores_training_mode():
    model = _model(block_size=16)
    model.train()
    with pytest.raises(GptlabError, match="exceed the context window"):
        generate(model, _prompt(batch=2, n=10), 7, temperature=0)
    out = generate(model, _prompt(batch=2, n=10), 6, temperature=0)
    assert out.shape == (2, 16) and model.training


def test_padded_vocab_rows_are_never_sampled():
    model = _model(pad_vocab_multiple=64)
    assert model.lm_head.weight.shape[0] == 128
    with torch.no_grad():  # make the padding rows irresistible if they were ever scored
        model.lm_head.weight[V:] = 50.0
    out = generate(model, _prompt(batch=4), 10, temperature=1.5, seed=0)
    assert out.max().item() < V


# --------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def gpt2_vocab_dir(tmp_path_factory):
    """A tiny GPT-2-vocabulary model exported to an HF directory (tokenizer files included)."""
    from gptlab import hf
    from gptlab.tokenizer import GPT2Tokenizer

    cfg = ModelConfig.from_preset("tiny", vocab_size=50257, block_size=32)
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("cli") / "model"
    hf.export_hf(GPT(cfg), GPT2Tokenizer(), d)
    return d


def test_cli_sample_json_is_reproducible_and_matches_generate(gpt2_vocab_dir, capsys):
    from gptlab.cli import main
    from gptlab.loading import load_model
    from gptlab.tokenizer import GPT2Tokenizer

    args = ["sample", "--init", str(gpt2_vocab_dir), "--prompt", "Hello, world", "--num-samples", "2",
            "--max-new-tokens", "10", "--seed", "5", "--top-k", "50", "--device", "cpu", "--json"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert main(args) == 0
    second = json.loads(capsys.readouterr().out)
    assert first["samples"] == second["samples"] and len(first["samples"]) == 2
    assert all(s.startswith("Hello, world") for s in first["samples"])
    assert first["new_tokens"] == 20 and first["prompt_tokens"] == 3 and first["tokens_per_s"] > 0

    model, tok = load_model(gpt2_vocab_dir)
    idx = torch.tensor([GPT2Tokenizer().encode("Hello, world")] * 2)
    want = generate(model, idx, 10, top_k=50, seed=5)
    assert first["completions"] == [tok.decode(r[3:]) for r in want.tolist()]

    assert main(args + ["--no-kv-cache"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == first["samples"]
    assert main(args + ["--compile"]) == 0  # the compiled static-cache step samples the same text
    compiled = json.loads(capsys.readouterr().out)
    assert compiled["samples"] == first["samples"]
    assert first["compile"] is False and first["compile_seconds"] is None
    assert compiled["compile"] is True and 0 < compiled["compile_seconds"] < compiled["seconds"]


def test_cli_sample_stream_and_file_prompt(gpt2_vocab_dir, capsys, tmp_path):
    from gptlab.cli import main

    prompt = tmp_path / "p.txt"
    prompt.write_text("Once upon a time", encoding="utf-8")
    base = ["sample", "--init", str(gpt2_vocab_dir), "--prompt", f"FILE:{prompt}", "--max-new-tokens", "12",
            "--temperature", "0", "--device", "cpu"]
    assert main(base) == 0
    plain = capsys.readouterr()
    assert main(base + ["--stream"]) == 0
    streamed = capsys.readouterr()
    assert plain.out.startswith("Once upon a time") and streamed.out == plain.out
    assert "tokens/s" in streamed.err


@pytest.fixture(scope="module")
def eot_model_dir(tmp_path_factory):
    """A tiny GPT-2-vocabulary model that predicts <|endoftext|> after every token."""
    from gptlab import hf
    from gptlab.tokenizer import GPT2_EOT_ID, GPT2Tokenizer

    cfg = ModelConfig.from_preset("tiny", vocab_size=50257, block_size=32)
    torch.manual_seed(0)
    m = GPT(cfg)
    u = torch.randn(cfg.n_embd)
    u /= u.norm()
    with torch.no_grad():  # the final norm's output leans on u; only end-of-text's row points along it
        m.transformer.ln_f.bias.copy_(10 * u)
        m.transformer.wte.weight[GPT2_EOT_ID] = 5 * u
    d = tmp_path_factory.mktemp("eot") / "model"
    hf.export_hf(m, GPT2Tokenizer(), d)
    return d


def test_cli_sample_stops_at_end_of_text_unless_told_to_ignore_it(eot_model_dir, capsys):
    """transformers' generate stops at eos_token_id; so does gptlab sample by default (issue 14 item 6)."""
    from gptlab.cli import main

    base = ["sample", "--init", str(eot_model_dir), "--prompt", "Hello", "--max-new-tokens", "10",
            "--temperature", "0", "--device", "cpu", "--json"]
    assert main(base) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["new_tokens"] == 1 and out["completions"] == [""] and out["finish_reasons"] == ["stop"]
    assert main(base + ["--ignore-eot"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["new_tokens"] == 10 and out["completions"] == ["<|endoftext|>" * 10]
    assert out["finish_reasons"] == ["length"]
    # the same stop as transformers' generate with the model's eos token
    tf = pytest.importorskip("transformers")
    ref = tf.GPT2LMHeadModel.from_pretrained(eot_model_dir).eval()
    x = torch.tensor([[15496]])  # "Hello"
    theirs = ref.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=10, do_sample=False,
                          eos_token_id=50256, pad_token_id=50256)
    assert theirs[0, 1:].tolist() == [50256]


def test_cli_sample_errors(gpt2_vocab_dir, capsys, tmp_path):
    from gptlab.cli import main

    assert main(["sample", "--init", str(gpt2_vocab_dir), "--top-p", "1.5"]) == 1
    assert "--top-p 1.5" in capsys.readouterr().err
    assert main(["sample", "--init", str(gpt2_vocab_dir), "--prompt", f"FILE:{tmp_path}/missing.txt"]) == 1
    assert "missing.txt" in capsys.readouterr().err
    assert main(["sample", "--init", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err
    assert "nope" in err and "Hub name" in err and len(err.strip().splitlines()) == 1


@pytest.mark.gpu
def test_kv_cache_equals_recomputation_on_cuda():
    model = _model(block_size=40, **ARCHS["modern"]).cuda()
    idx = _prompt(batch=3).cuda()
    a = generate(model, idx, 30, temperature=0, use_kv_cache=True)
    b = generate(model, idx, 30, temperature=0, use_kv_cache=False)
    assert a.device.type == "cuda" and torch.equal(a, b)
    assert torch.equal(generate(model, idx, 30, seed=3), generate(model, idx, 30, seed=3))
