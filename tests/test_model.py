import math

import pytest
import torch

from gptlab.config import MODERN_ARCH, ModelConfig
from gptlab.model import GPT, IGNORE_INDEX


def test_gpt2_parameter_count_on_meta():
    with torch.device("meta"):
        model = GPT(ModelConfig.from_preset("gpt2"))
    assert model.num_params() == 124_439_808
    with torch.device("meta"):
        xl = GPT(ModelConfig.from_preset("gpt2-xl"))
    assert xl.num_params() == 1_557_611_200  # HF gpt2-xl


def test_hf_parameter_names(tiny_config):
    names = set(GPT(tiny_config).state_dict())
    for n in ["transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.weight",
              "transformer.h.0.ln_1.bias", "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_attn.bias",
              "transformer.h.0.attn.c_proj.weight", "transformer.h.0.ln_2.weight", "transformer.h.0.mlp.c_fc.weight",
              "transformer.h.0.mlp.c_proj.bias", "transformer.ln_f.weight", "lm_head.weight"]:
        assert n in names


def test_init_statistics():
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=4, n_head=4, n_embd=256, vocab_size=8192, block_size=512)
    m = GPT(cfg)
    assert m.lm_head.weight is m.transformer.wte.weight
    assert abs(m.transformer.wte.weight.std().item() - 0.02) < 1e-3
    assert abs(m.transformer.wpe.weight.std().item() - 0.01) < 1e-3
    assert abs(m.transformer.h[0].attn.c_attn.weight.std().item() - 0.02) < 1e-3
    assert abs(m.transformer.h[0].mlp.c_proj.weight.std().item() - 0.02 / math.sqrt(8)) < 1e-3
    assert m.transformer.h[0].attn.c_attn.bias.abs().max() == 0
    assert torch.all(m.transformer.h[0].ln_1.weight == 1)


def test_fresh_gpt2_loss_is_uniform():
    torch.manual_seed(0)
    m = GPT(ModelConfig.from_preset("gpt2", n_layer=2))
    x = torch.randint(0, 50257, (2, 128))
    y = torch.randint(0, 50257, (2, 128))
    with torch.no_grad():
        _, loss = m(x, y)
    # ln(V) plus var(logits)/2: tied 0.02 embeddings against unit-variance ln_f output give
    # logit std about sqrt(768) * 0.02 = 0.55, so about 10.98 (build-nanogpt's first step prints ~10.9-11.0).
    assert abs(loss.item() - math.log(50257)) < 0.3


def test_seeded_init_is_reproducible(tiny_config):
    a = GPT(tiny_config)
    b = GPT(tiny_config)
    a.init_weights(torch.Generator().manual_seed(3))
    b.init_weights(torch.Generator().manual_seed(3))
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), n


def test_padded_vocab_never_changes_loss_or_logits(tiny_config):
    torch.manual_seed(0)
    padded = GPT(ModelConfig.from_preset("tiny", pad_vocab_multiple=128, vocab_size=200))
    plain = GPT(ModelConfig.from_preset("tiny", vocab_size=200))
    sd = plain.state_dict()
    psd = padded.state_dict()
    for k, v in sd.items():
        if v.shape != psd[k].shape:  # wte / lm_head: copy real rows, garbage in the padding
            psd[k][: v.size(0)] = v
            psd[k][v.size(0):] = 5.0
        else:
            psd[k] = v
    padded.load_state_dict(psd)
    assert padded.transformer.wte.weight.shape[0] == 256
    x = torch.randint(0, 200, (2, 32))
    y = torch.randint(0, 200, (2, 32))
    y[0, :5] = IGNORE_INDEX
    la, loss_a = plain(x, y)
    lb, loss_b = padded(x, y)
    assert lb.shape == (2, 32, 200)
    torch.testing.assert_close(la, lb)
    torch.testing.assert_close(loss_a, loss_b)
    loss_b.backward()
    assert padded.transformer.wte.weight.grad[200:].abs().max() == 0  # padded rows get no signal


def test_ignore_index_excluded(tiny_config):
    torch.manual_seed(0)
    m = GPT(tiny_config)
    x = torch.randint(0, 256, (1, 16))
    y = torch.randint(0, 256, (1, 16))
    y2 = y.clone()
    y2[0, 8:] = IGNORE_INDEX
    logits, loss = m(x, y2)
    ref = torch.nn.functional.cross_entropy(logits[0, :8], y[0, :8])
    torch.testing.assert_close(loss, ref)


ARCHS = {
    "gpt2": {},
    "rope": dict(pos_emb="rope"),
    "rmsnorm": dict(norm="rmsnorm"),
    "swiglu": dict(mlp="swiglu"),
    "relu2": dict(mlp="relu2"),
    "qk_norm": dict(qk_norm=True),
    "gqa": dict(n_kv_head=2),
    "nobias_untied": dict(bias=False, tie_embeddings=False),
    "modern": dict(MODERN_ARCH, n_kv_head=2, pad_vocab_multiple=128),
}


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("sliced", [True, False], ids=["kv_len", "whole_buffer"])
def test_kv_cache_equals_full_recompute(arch, sliced):
    """Prefill, a chunk, then one token per step at per-row positions: attention over the written prefix
    (``kv_len``) or over the whole buffer under the mask (longer than used, so unwritten slots must stay
    invisible); rows at different positions in one forward too."""
    torch.manual_seed(0)
    m = GPT(ModelConfig.from_preset("tiny", **ARCHS[arch])).eval()
    x = torch.randint(0, 256, (3, 24))
    with torch.no_grad():
        full, _ = m(x)
        cache = m.new_kv_cache(3, max_seq_len=32)

        def run(lo: int, hi: int) -> torch.Tensor:
            pos = torch.arange(lo, hi).expand(3, -1)
            return m(x[:, lo:hi], kv_cache=cache, input_pos=pos, kv_len=hi if sliced else None)[0]

        parts = [run(0, 9), run(9, 14)] + [run(t, t + 1) for t in range(14, 24)]
        last, _ = m(x, last_only=True)
        torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(last[:, 0], full[:, -1])
        # Rows at different positions in one step: row r re-decodes its token at position 20 - 3r; slots
        # past that position hold later tokens of the same row, which the mask must hide.
        pos = torch.tensor([[20], [17], [14]])
        tok = x.gather(1, pos)
        step, _ = m(tok, kv_cache=cache, input_pos=pos, kv_len=21 if sliced else None)
        want = full[torch.arange(3), pos[:, 0]]
        torch.testing.assert_close(step[:, 0], want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="kv_cache and input_pos go together"):
        m(x[:, :1], input_pos=torch.tensor([[0]]))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_arch_trains(arch):
    torch.manual_seed(0)
    m = GPT(ModelConfig.from_preset("tiny", **ARCHS[arch]))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    x = torch.randint(0, 256, (4, 32))
    y = torch.roll(x, -1, 1)
    losses = []
    for _ in range(15):
        _, loss = m(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_context_overflow_is_a_clear_error(tiny_config):
    m = GPT(tiny_config)
    with pytest.raises(ValueError, match="exceeds the context window"):
        m(torch.zeros(1, 65, dtype=torch.long))
