"""Hugging Face interop against transformers itself: tiny random models, nothing downloaded."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from gptlab import hf  # noqa: E402
from gptlab.convert.hf_base import expected_hf_shapes  # noqa: E402
from gptlab.loading import from_hf_model, load_model, materialize  # noqa: E402
from gptlab.cli import main  # noqa: E402
from gptlab.config import MODERN_ARCH, ModelConfig  # noqa: E402
from gptlab.errors import GptlabError  # noqa: E402
from gptlab.model import GPT  # noqa: E402
from gptlab.tokenizer import CharTokenizer, GPT2Tokenizer  # noqa: E402

V_SMALL = 96
pytestmark = pytest.mark.filterwarnings("ignore:.*tokenizer is not GPT-2's")



def _hf_gpt2(vocab_size: int = V_SMALL, seed: int = 0, **kw):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=64, vocab_size=vocab_size, **kw)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _randomise(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """Perturb every weight (norms and biases included) so no mapping error hides behind ones/zeros."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def _gptlab(seed: int = 0, **overrides) -> GPT:
    cfg = ModelConfig.from_preset("tiny", **{"vocab_size": V_SMALL, **overrides})
    torch.manual_seed(seed)
    return _randomise(GPT(cfg), seed)


def _tokens(n: int = 24, vocab: int = V_SMALL, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def hf_gpt2_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf_gpt2")
    model = _randomise(_hf_gpt2(), seed=3)
    model.save_pretrained(d)
    return d, model


# --------------------------------------------------------------------------- HF -> gptlab


def test_hf_gpt2_logits_equal(hf_gpt2_dir):
    d, ref = hf_gpt2_dir
    model, _ = load_model(d)
    config = model.config
    assert (config.n_layer, config.n_head, config.n_embd, config.block_size, config.vocab_size) == (2, 4, 64, 64, V_SMALL)
    x = _tokens(64)
    with torch.no_grad():
        want = ref(x).logits
        got, _ = model(x)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-5


def test_openai_layout_and_buffers_are_accepted(hf_gpt2_dir):
    """OpenAI's Hub files have no ``transformer.`` prefix and old ones carry attn.bias mask buffers."""
    _, ref = hf_gpt2_dir
    sd = {k.removeprefix("transformer."): v for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    sd["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
    sd["h.1.attn.masked_bias"] = torch.tensor(-1e4)
    config = hf.config_from_hf(ref.config.to_dict())
    model = materialize(config, hf.from_hf_state_dict(sd, config))
    assert model.lm_head.weight is model.transformer.wte.weight
    x = _tokens()
    with torch.no_grad():
        assert (model(x)[0] - ref(x).logits).abs().max().item() <= 1e-5


def test_pytorch_model_bin_loads_with_weights_only(tmp_path, hf_gpt2_dir):
    _, ref = hf_gpt2_dir
    ref.config.save_pretrained(tmp_path)
    torch.save({k: v.clone() for k, v in ref.state_dict().items()}, tmp_path / "pytorch_model.bin")
    assert (tmp_path / "pytorch_model.bin").is_file() and not (tmp_path / "model.safetensors").exists()
    model, _ = load_model(tmp_path)
    x = _tokens()
    with torch.no_grad():
        assert (model(x)[0] - ref(x).logits).abs().max().item() <= 1e-5


def test_padded_vocab_import_fills_zero_rows(hf_gpt2_dir):
    _, ref = hf_gpt2_dir
    config = hf.config_from_hf(ref.config.to_dict())
    config = ModelConfig(**{**config.__dict__, "pad_vocab_multiple": 64})
    model = materialize(config, hf.from_hf_state_dict(ref.state_dict(), config))
    assert model.transformer.wte.weight.shape[0] == 128
    assert model.transformer.wte.weight[V_SMALL:].abs().max() == 0
    x = _tokens()
    with torch.no_grad():
        assert (model(x)[0] - ref(x).logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_hf_llama_qwen3_import_logits_equal(tmp_path, model_type):
    """A transformers-initialised Llama / Qwen3 (GQA, untied head) loads into gptlab with equal logits."""
    kw = dict(vocab_size=V_SMALL, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False)
    if model_type == "qwen3":
        kw["head_dim"] = 16
    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model(model_type, rope_theta=500.0, **kw)
    ref = _randomise(transformers.AutoModelForCausalLM.from_config(cfg))
    ref.save_pretrained(tmp_path)
    model, _ = load_model(tmp_path)
    config = model.config
    assert config.qk_norm == (model_type == "qwen3") and config.kv_heads == 2 and config.rope_base == 500.0
    x = _tokens(64)
    with torch.no_grad():
        assert (model(x)[0] - ref(x).logits).abs().max().item() <= 1e-5



@pytest.mark.parametrize("qk_norm", [False, True])
def test_llama_qwen3_export_loads_in_transformers_with_equal_logits(tmp_path, qk_norm):
    """The other direction: a gptlab RoPE / RMSNorm / SwiGLU model with GQA (qk_norm: Qwen3) exported, then
    loaded by transformers, gives equal logits; every weight perturbed so a swapped q/k/v or gate/up shows."""
    model = _gptlab(n_kv_head=2, **{**MODERN_ARCH, "qk_norm": qk_norm})
    hf.export_hf(model, None, tmp_path / "out")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert ref.config.model_type == ("qwen3" if qk_norm else "llama")
    x = _tokens(32)
    with torch.no_grad():
        assert (model(x)[0] - ref(x).logits).abs().max().item() <= 1e-5

# The published config.json of openai-community/gpt2 (the others differ only in n_embd/n_head/n_layer).
OPENAI_GPT2_CONFIG = {
    "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
    "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02,
    "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12,
    "n_positions": 1024, "resid_pdrop": 0.1, "summary_activation": None, "summary_first_dropout": 0.1,
    "summary_proj_to_labels": True, "summary_type": "cls_index", "summary_use_proj": True,
    "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}}, "vocab_size": 50257,
}


@pytest.mark.parametrize("name,dims", [("gpt2", (768, 12, 12)), ("gpt2-medium", (1024, 16, 24)),
                                       ("gpt2-large", (1280, 20, 36)), ("gpt2-xl", (1600, 25, 48))])
def test_openai_configs_map_to_presets_and_transformers_layout(name, dims):
    """Full-size checks on the meta device: the Hub configs give our presets, and the HF weights
    transformers would expect are exactly the ones the converter asks for."""
    n_embd, n_head, n_layer = dims
    config = hf.config_from_hf({**OPENAI_GPT2_CONFIG, "n_embd": n_embd, "n_head": n_head, "n_layer": n_layer})
    assert config == ModelConfig.from_preset(name)
    with torch.device("meta"):
        ref = transformers.GPT2LMHeadModel(transformers.GPT2Config(**OPENAI_GPT2_CONFIG | dict(
            n_embd=n_embd, n_head=n_head, n_layer=n_layer)))
    want = {k: v.shape for k, v in ref.state_dict().items() if k != "lm_head.weight" and not k.endswith(".attn.bias")}
    assert expected_hf_shapes(config) == want
    if name == "gpt2":
        assert sum(s.numel() for s in want.values()) == 124_439_808


# --------------------------------------------------------------------------- gptlab -> HF


def test_export_gpt2_loads_in_transformers_with_equal_logits_and_tokenizer(tmp_path):
    model = _gptlab(vocab_size=50257, pad_vocab_multiple=128)  # padded rows must be dropped on export
    assert model.transformer.wte.weight.shape[0] == 50304
    out = tmp_path / "export"
    summary = hf.export_hf(model, GPT2Tokenizer(), out)
    assert summary["architecture"] == "GPT2LMHeadModel"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary dir left behind"
    ref = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(ref).__name__ == "GPT2LMHeadModel"
    assert ref.get_output_embeddings().weight.shape[0] == 50257
    x = _tokens(64, vocab=50257)
    with torch.no_grad():
        assert (model(x)[0] - ref(x).logits).abs().max().item() <= 1e-5
    tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "Hello, I'm a language model, naïve café 🤗 <|endoftext|>"
    ours = GPT2Tokenizer()
    assert tok.encode("Hello, I'm a language model,") == [15496, 11, 314, 1101, 257, 3303, 2746, 11]
    assert tok.encode(text) == ours.encode(text, allow_special=True)
    assert tok.decode(ours.encode(text)) == text
    assert tok.eos_token_id == 50256


@pytest.mark.parametrize("arch,overrides", [
    ("Qwen3ForCausalLM", dict(MODERN_ARCH)),
    ("Qwen3ForCausalLM", dict(MODERN_ARCH, n_kv_head=2, tie_embeddings=True)),
    ("LlamaForCausalLM", dict(MODERN_ARCH, qk_norm=False, n_kv_head=2)),
    ("LlamaForCausalLM", dict(MODERN_ARCH, qk_norm=False, bias=True, mlp_hidden=96, rope_base=500.0)),
])
def test_export_modern_equal_logits_and_round_trip(tmp_path, arch, overrides):

    model = _gptlab(**overrides)
    tok = CharTokenizer([chr(c) for c in range(32, 32 + V_SMALL - 1)] + ["\n"])
    out = tmp_path / "export"
    assert hf.export_hf(model, tok, out)["architecture"] == arch
    ref = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(ref).__name__ == arch
    x = _tokens(64)
    with torch.no_grad():
        assert (model(x)[0] - ref(x).logits).abs().max().item() <= 1e-5
    # The char tokenizer exports as a tokenizers WordLevel model that transformers reads unchanged.
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "To be, or not to be:\nthat is the question."
    assert hf_tok.encode(text) == tok.encode(text)
    assert hf_tok.decode(tok.encode(text)) == text
    # export -> import is the identity, tokenizer included
    back, back_tok = load_model(out)
    assert hf.config_to_hf(back.config) == hf.config_to_hf(model.config)  # same architecture and shapes
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert back_tok.spec() == tok.spec()


@pytest.mark.parametrize("overrides", [dict(bias=False), dict(tie_embeddings=False, pad_vocab_multiple=64),
                                       dict(bias=False, tie_embeddings=False, mlp_hidden=96)])
def test_export_bias_free_and_untied_gpt2(tmp_path, overrides):
    """nanoGPT-style bias=False becomes zero biases (same function); an untied head keeps its own matrix."""
    model = _gptlab(**overrides)
    hf.export_hf(model, None, tmp_path / "e")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "e").eval()
    assert type(ref).__name__ == "GPT2LMHeadModel"
    assert (ref.lm_head.weight.data_ptr() == ref.transformer.wte.weight.data_ptr()) == model.config.tie_embeddings
    x = _tokens(64)
    with torch.no_grad():
        assert (model(x)[0] - ref(x).logits).abs().max().item() <= 1e-5
    back, _ = load_model(tmp_path / "e")
    assert back.config.bias and back.config.hidden_dim == model.config.hidden_dim
    with torch.no_grad():
        assert torch.equal(back(x)[0], model(x)[0])
    for k, v in back.state_dict().items():
        if k in model.state_dict():
            assert torch.equal(model.state_dict()[k][: v.size(0)], v), k
        else:
            assert k.endswith(".bias") and not v.any(), k
    # and back into a bias-free config: zero biases are dropped, non-zero ones refused
    sd = hf.read_hf_weights(tmp_path / "e")
    same = hf.from_hf_state_dict(sd, model.config)
    assert same.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():  # padded vocab rows are not exported: compare the real ones
        rows = V_SMALL if k in ("transformer.wte.weight", "lm_head.weight") else v.size(0)
        assert torch.equal(same[k][:rows], v[:rows]), k
    if not model.config.bias:
        sd["transformer.h.1.mlp.c_fc.bias"][3] = 1.0
        with pytest.raises(hf.HFFormatError, match=r"non-zero biases \(transformer\.h\.1\.mlp\.c_fc\.bias\)"):
            hf.from_hf_state_dict(sd, model.config)


def test_export_reimport_gpt2_identity_with_padding(tmp_path):
    model = _gptlab(pad_vocab_multiple=64)
    hf.export_hf(model, None, tmp_path / "e")
    back, _ = load_model(tmp_path / "e")
    assert back.config.vocab_size == V_SMALL and back.config.padded_vocab_size == V_SMALL
    for k, v in model.state_dict().items():
        w = back.state_dict()[k]
        assert torch.equal(v[: w.size(0)], w), k


def test_to_hf_model_and_back_in_memory():
    model = _gptlab(**dict(MODERN_ARCH, n_kv_head=2))
    ref = hf.to_hf_model(model)
    x = _tokens()
    with torch.no_grad():
        assert (model(x)[0] - ref(x).logits).abs().max().item() <= 1e-5
    back = from_hf_model(ref)
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("overrides,words", [
    (dict(norm="rmsnorm"), "norm='rmsnorm'"),
    (dict(mlp="relu2"), "mlp='relu2'"),
    (dict(n_kv_head=2), "n_kv_head=2"),
    (dict(qk_norm=True), "qk_norm=true"),
    (dict(pos_emb="rope"), "norm='layernorm'"),
    (dict(MODERN_ARCH, mlp="relu2"), "mlp='relu2'"),
    (dict(MODERN_ARCH, bias=True), "qk_norm"),
])
def test_unrepresentable_architectures_are_refused(tmp_path, overrides, words):
    model = _gptlab(**overrides)
    with pytest.raises(GptlabError, match="no Hugging Face architecture") as e:
        hf.export_hf(model, None, tmp_path / "out")
    assert words in str(e.value)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.iterdir())


def test_state_dict_errors_name_the_keys(hf_gpt2_dir):
    _, ref = hf_gpt2_dir
    config = hf.config_from_hf(ref.config.to_dict())
    sd = dict(ref.state_dict())
    missing = dict(sd)
    del missing["transformer.h.1.mlp.c_fc.weight"]
    with pytest.raises(hf.HFFormatError, match=r"missing 1 gpt2 weight\(s\): transformer\.h\.1\.mlp\.c_fc\.weight"):
        hf.from_hf_state_dict(missing, config)
    extra = dict(sd, **{"transformer.h.2.ln_1.weight": torch.ones(64)})
    with pytest.raises(hf.HFFormatError, match=r"unexpected 1 key\(s\).*transformer\.h\.2\.ln_1\.weight"):
        hf.from_hf_state_dict(extra, config)
    bad = dict(sd, **{"transformer.h.0.attn.c_attn.weight": sd["transformer.h.0.attn.c_attn.weight"].t()})
    with pytest.raises(hf.HFFormatError, match=r"shape mismatch for transformer\.h\.0\.attn\.c_attn\.weight "
                                               r"\(192, 64\) \(expected \(64, 192\)\)"):
        hf.from_hf_state_dict(bad, config)


def test_config_errors(tmp_path):
    base = _hf_gpt2().config.to_dict()
    with pytest.raises(hf.HFFormatError, match="activation_function='relu'"):
        hf.config_from_hf({**base, "activation_function": "relu"})
    with pytest.raises(hf.HFFormatError, match="model_type='bert'"):
        hf.config_from_hf({"model_type": "bert"})
    with pytest.raises(hf.HFFormatError, match="rope_type='linear'"):
        hf.config_from_hf({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 10,
                           "num_hidden_layers": 1, "intermediate_size": 32,
                           "rope_scaling": {"rope_type": "linear", "factor": 2.0}})
    (tmp_path / "config.json").write_text(json.dumps(base))
    with pytest.raises(hf.HFFormatError, match="no model.safetensors"):
        load_model(tmp_path)


def test_export_refuses_non_empty_dir_unless_overwrite(tmp_path):
    model = _gptlab()
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for overwrite in (False, True):  # someone else's directory is never an export to replace
        with pytest.raises(GptlabError, match="not a gptlab export"):
            hf.export_hf(model, None, out, overwrite=overwrite)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (out / "keep.txt").unlink()
    hf.export_hf(model, None, out)
    (out / "keep.txt").write_text("mine")  # added later by the user
    with pytest.raises(GptlabError, match="--overwrite"):
        hf.export_hf(model, None, out)
    hf.export_hf(model, None, out, overwrite=True)
    assert (out / "keep.txt").read_text() == "mine" and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# --------------------------------------------------------------------------- generation and CLI


def _assert_same_greedy(model, ref, new_tokens: int = 40) -> None:
    """gptlab's greedy continuation equals transformers' generate(do_sample=False), token for token."""
    from gptlab.generate import generate

    x = _tokens(8, batch=3)
    ours = generate(model, x, new_tokens, temperature=0)
    with torch.no_grad():
        theirs = ref.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=0)
    assert torch.equal(ours, theirs)


def test_greedy_continuation_matches_transformers_generate(hf_gpt2_dir):
    d, ref = hf_gpt2_dir
    model, _ = load_model(d)
    _assert_same_greedy(model, ref)


@pytest.mark.parametrize("overrides", [dict(MODERN_ARCH), dict(MODERN_ARCH, qk_norm=False, n_kv_head=2)])
def test_greedy_continuation_matches_transformers_modern(overrides):
    model = _gptlab(**overrides)
    _assert_same_greedy(model, hf.to_hf_model(model))


def test_cli_export_round_trip(tmp_path, capsys, hf_gpt2_dir):
    d, ref = hf_gpt2_dir
    out = tmp_path / "re"
    assert main(["export", "--init", str(d), "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["model_type"] == "gpt2" and summary["params"] == sum(
        p.numel() for p in ref.parameters())
    again = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    x = _tokens()
    with torch.no_grad():
        assert torch.equal(again(x).logits, ref(x).logits)
    assert main(["export", "--init", str(d), "--out", str(out)]) == 1
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("overrides", [{}, dict(MODERN_ARCH)])
def test_cli_export_from_a_gptlab_run_dir(tmp_path, capsys, overrides):
    """The user story: train with gptlab, `gptlab export`, load the result with transformers."""
    from gptlab.checkpoint import save_checkpoint
    from gptlab.config import to_dict

    model = _gptlab(**overrides)
    tok = CharTokenizer([chr(c) for c in range(32, 32 + V_SMALL)])
    run = tmp_path / "run"
    save_checkpoint(run, 3, model_state=model.state_dict(), tied=model.config.tie_embeddings,
                    optimizer_state=None, rng_states=[],
                    meta={"model_config": to_dict(model.config), "tokenizer": tok.spec()})
    assert main(["export", "--init", str(run), "--out", str(tmp_path / "hf"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["tokenizer"] == "char"
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(ref).__name__ == summary["architecture"]
    text = "gptlab exports what it trains"
    ids = torch.tensor([tok.encode(text)])
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "hf").encode(text) == ids[0].tolist()
    with torch.no_grad():
        assert (model(ids)[0] - ref(ids).logits).abs().max().item() <= 1e-5


# --------------------------------------------------------------------------- adapters


def test_exact_gelu_exports_as_hf_gelu_with_equal_logits(tmp_path):
    model = _gptlab(gelu="erf")
    hf.export_hf(model, None, tmp_path / "e")
    cfg = json.loads((tmp_path / "e" / "config.json").read_text())
    assert cfg["activation_function"] == "gelu"
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "e").eval()
    x = _tokens(64)
    with torch.no_grad():
        assert (model(x)[0] - ref(x).logits).abs().max().item() <= 1e-5
        tanh = GPT(ModelConfig(**{**model.config.__dict__, "gelu": "tanh"}))
        tanh.load_state_dict(model.state_dict())
        assert (tanh(x)[0] - ref(x).logits).abs().max().item() > 1e-5  # the GELU form matters
    with pytest.warns(UserWarning, match="without one"):
        back, _ = load_model(tmp_path / "e")
    assert back.config.gelu == "erf"


def test_a_switch_the_family_cannot_hold_is_refused_by_the_round_trip():
    """A model-defining field no adapter knows (here one added by a subclass) makes the config change on
    the trip to config.json and back, so the export is refused instead of writing a different model."""
    from dataclasses import dataclass

    from gptlab.convert.hf_base import adapter_for_config

    @dataclass
    class WithNewSwitch(ModelConfig):
        parallel_blocks: bool = False

    cfg = WithNewSwitch(**{**ModelConfig.from_preset("tiny").__dict__, "parallel_blocks": True})
    with pytest.raises(GptlabError, match=r"GPT2LMHeadModel would change parallel_blocks=true -> None; export refused"):
        adapter_for_config(cfg)
    with pytest.raises(GptlabError, match="parallel_blocks"):
        hf.config_to_hf(cfg)
