"""Int8 weight-only quantization: the rounding itself, the module against its dequantized product, logits and
eval loss of a quantized model against fp32, the engine on a quantized model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from gptlab.config import ModelConfig
from gptlab.engine import Engine, SamplingParams
from gptlab.model import GPT
from gptlab.quantize import Int8Linear, quantize_int8, quantize_model


def test_per_channel_int8_rounding_is_within_half_a_step():
    w = torch.randn(40, 30, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.01, 3, 40)[:, None]
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (40,)
    assert int(q.abs().max()) == 127 and (q.abs().amax(1) == 127).all()  # every row uses its full range
    err = (q.float() * scale[:, None] - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("rows", [1, 3, 9])
def test_int8_linear_equals_the_product_with_dequantized_weights(rows):
    lin = nn.Linear(48, 80)
    q8 = Int8Linear.from_linear(lin)
    x = torch.randn(rows, 48, generator=torch.Generator().manual_seed(rows))
    want = F.linear(x, q8.dequantize(), lin.bias)
    with torch.no_grad():
        got = q8(x)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # 1-3 rows: the int8 kernel; 9: the product
        assert (got - lin(x)).abs().max() < 0.05  # and close to the fp32 layer
        assert q8(x.view(rows, 1, 48)).shape == (rows, 1, 80)


def _tiny(vocab: int = 97, **kw) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig.from_preset("tiny", vocab_size=vocab, block_size=64, **kw)).eval()


def test_quantized_model_logits_are_close_to_fp32_and_the_model_is_untouched_where_it_must_be():
    model = _tiny()
    qm = quantize_model(copy.deepcopy(model))
    assert not any(isinstance(m, nn.Linear) for m in qm.modules())
    assert sum(isinstance(m, Int8Linear) for m in qm.modules()) == 2 * 4 + 1  # 4 per block + the lm_head
    assert qm.transformer.wte.weight.dtype == torch.float32  # lookups read one row: left as is
    x = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, _ = model(x)
        b, _ = qm(x)
        c, _ = qm(x[:1, :1])  # one row: the int8 kernel path
    assert (a - b).abs().max() / a.abs().max() < 0.02
    torch.testing.assert_close(c[0, 0], b[0, 0], atol=1e-4, rtol=1e-4)


def test_engine_on_a_quantized_model_decodes_like_its_own_recomputation():
    model = _tiny()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # sharpen the random model: no near-ties for the two int8 paths to split
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    qm = quantize_model(model)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10]]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eot=True)
    cached = Engine(qm, max_batch=2).generate(prompts, params)
    full = Engine(qm, max_batch=2, use_kv_cache=False).generate(prompts, params)
    assert [c.token_ids for c in cached] == [c.token_ids for c in full]
    assert all(c.finish_reason == "length" and len(c.token_ids) == 10 for c in cached)


def test_eval_loss_of_a_trained_model_moves_less_than_one_percent(tiny_corpus):
    """The issue's bar: the quantized model's validation loss within 1% of fp32's (a briefly trained char model)."""
    from gptlab.tokenizer import CharTokenizer

    text = tiny_corpus.read_text(encoding="utf-8")
    tok = CharTokenizer.from_text(text)
    data = torch.tensor(tok.encode(text))
    split = int(0.9 * len(data))
    train, val = data[:split], data[split:]
    model = _tiny(vocab=tok.vocab_size)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        i = torch.randint(0, len(train) - 65, (16,), generator=g)
        x = torch.stack([train[j:j + 64] for j in i])
        y = torch.stack([train[j + 1:j + 65] for j in i])
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    n = (len(val) - 1) // 64
    xv, yv = val[: n * 64].view(n, 64), val[1: n * 64 + 1].view(n, 64)
    with torch.no_grad():
        fp32 = model(xv, yv)[1].item()
        int8 = quantize_model(copy.deepcopy(model))(xv, yv)[1].item()
    assert fp32 < 2.5  # really trained (uniform over the vocabulary would be ~3.4)
    assert abs(int8 - fp32) / fp32 < 0.01, (fp32, int8)


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory):
    """A tiny GPT-2-vocabulary model exported to an HF dir and a prepared dataset of random GPT-2 tokens."""
    import numpy as np

    from gptlab import hf
    from gptlab.data import shards as S
    from gptlab.tokenizer import GPT2Tokenizer

    root = tmp_path_factory.mktemp("q")
    torch.manual_seed(0)
    hf.export_hf(GPT(ModelConfig.from_preset("tiny", vocab_size=50257, block_size=32)), GPT2Tokenizer(), root / "model")
    data = root / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    entries = []
    for i, (split, n) in enumerate([("val", 400), ("train", 400)]):
        name = f"{split}_{i:06d}.bin"
        entries.append({"file": name, "split": split, "tokens": n,
                        "sha256": S.write_shard(data / name, rng.integers(0, 50257, size=n), 50257)})
    S.write_manifest(data, S.build_manifest(dataset="test", tokenizer_spec={"type": "gpt2"}, vocab_size=50257,
                                            eot_id=50256, shards=entries))
    return root / "model", data


def test_cli_eval_loss_sample_and_bench_accept_quantize(model_and_data, capsys):
    import json

    from gptlab.cli import main

    model_dir, data = model_and_data
    losses = {}
    for q in ([], ["--quantize", "int8"]):
        assert main(["eval", "loss", "--init", str(model_dir), "--data", str(data), "--device", "cpu", "--json"] + q) == 0
        out = json.loads(capsys.readouterr().out)
        losses[out["quantize"]] = out["loss"]
    assert abs(losses["int8"] - losses[None]) / losses[None] < 0.01
    assert main(["sample", "--init", str(model_dir), "--prompt", "Hi", "--max-new-tokens", "5", "--temperature", "0",
                 "--quantize", "int8", "--device", "cpu", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["quantize"] == "int8" and out["new_tokens"] in range(1, 6)
    assert main(["bench", "generate", "--model", "tiny", "--new-tokens", "6", "--prompt-tokens", "3", "--rounds", "1",
                 "--quantize", "int8", "--vs-hf", "--device", "cpu", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["quantize"] == "int8" and out["tokens_per_s"] > 0 and "speedup_vs_hf" in out
    with pytest.raises(SystemExit):  # argparse refuses the choice
        main(["sample", "--init", str(model_dir), "--quantize", "int4"])
