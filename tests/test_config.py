import pytest

from gptlab.config import ConfigError, ModelConfig, coerce, from_dict, load_toml, parse_overrides


def test_presets_shapes():
    for name, (L, H, C) in {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024),
                            "gpt2-large": (36, 20, 1280), "gpt2-xl": (48, 25, 1600)}.items():
        c = ModelConfig.from_preset(name)
        assert (c.n_layer, c.n_head, c.n_embd, c.block_size, c.vocab_size) == (L, H, C, 1024, 50257)


def test_vocab_padding():
    assert ModelConfig(pad_vocab_multiple=128).padded_vocab_size == 50304
    assert ModelConfig().padded_vocab_size == 50257


def test_unknown_key_names_closest():
    with pytest.raises(ConfigError, match=r"unknown key 'n_layers'.*did you mean 'n_layer'"):
        from_dict(ModelConfig, {"n_layers": 3}, "model")
    with pytest.raises(ConfigError, match="unknown model preset 'gpt2-smal'.*'gpt2-small'|did you mean"):
        ModelConfig.from_preset("gpt2-smal")


def test_validation_messages():
    with pytest.raises(ConfigError, match="n_embd=100 must be divisible by model.n_head=12"):
        ModelConfig(n_embd=100)
    with pytest.raises(ConfigError, match="model.mlp='geglu'"):
        ModelConfig(mlp="geglu")
    with pytest.raises(ConfigError, match="n_kv_head=5 must divide"):
        ModelConfig(n_kv_head=5)


def test_coerce_from_strings():
    assert coerce("3", int, "x") == 3
    assert coerce("1e3", int, "x") == 1000
    assert coerce("true", bool, "x") is True
    assert coerce("6e-4", float, "x") == 6e-4
    assert coerce("none", int | None, "x") is None
    with pytest.raises(ConfigError, match="x: expected an integer"):
        coerce("abc", int, "x")
    c = from_dict(ModelConfig, {"n_layer": "4", "bias": "false"}, "model")
    assert c.n_layer == 4 and c.bias is False


def test_parse_overrides_and_toml(tmp_path):
    assert parse_overrides(["--model.n_layer=4", "optim.lr=1e-3"]) == {"model": {"n_layer": "4"}, "optim": {"lr": "1e-3"}}
    with pytest.raises(ConfigError, match="expected --section.key=value"):
        parse_overrides(["--model.n_layer"])
    p = tmp_path / "c.toml"
    p.write_text("[model]\nn_layer = 4\n")
    assert load_toml(p) == {"model": {"n_layer": 4}}
    p.write_text("[model\n")
    with pytest.raises(ConfigError, match="c.toml: invalid TOML"):
        load_toml(p)
    with pytest.raises(ConfigError, match="config file not found"):
        load_toml(tmp_path / "nope.toml")


def test_model_arch_switch_sets_modern_base_and_explicit_keys_win():
    from gptlab.config import MODERN_ARCH, resolve_train_config

    cfg = resolve_train_config("shakespeare-char-cpu", overrides=["--model.arch=modern", "--model.mlp=relu2"])
    m = cfg.model
    assert (m.n_layer, m.n_embd) == (4, 128)  # sizes from the recipe
    assert m.mlp == "relu2"  # explicit key beats the arch base
    for key, value in MODERN_ARCH.items():
        if key != "mlp":
            assert getattr(m, key) == value, key
    assert resolve_train_config("shakespeare-char-cpu", overrides=["--model.arch=gpt2"]).model.pos_emb == "learned"
    with pytest.raises(ConfigError, match="model.arch='modren'.*did you mean 'modern'"):
        resolve_train_config("shakespeare-char-cpu", overrides=["--model.arch=modren"])
