"""nanoGPT, build-nanogpt and llm.c files in and out.

The files are built here from each project's documented format (a dict saved with torch.save, a
dataclass standing in for build-nanogpt's GPTConfig, llm.c's header + tensors written by this test's
own writer), and the logits are checked against a reference GPT written here independently.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import sys
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gptlab.cli import main
from gptlab.config import ModelConfig
from gptlab.convert.safe_pickle import UnsafePickleError, load_plain_pickle, load_torch_file
from gptlab.errors import GptlabError
from gptlab.loading import load_model
from gptlab.model import GPT
from gptlab.tokenizer import CharTokenizer, GPT2Tokenizer

C, L, H, T = 32, 2, 4, 16


def ref_state(vocab: int, bias: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random GPT-2-named weights (nn.Linear layout), as nanoGPT / build-nanogpt / llm.c models hold."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.2  # noqa: E731
    sd = {"transformer.wte.weight": r(vocab, C), "transformer.wpe.weight": r(T, C)}
    for i in range(L):
        p = f"transformer.h.{i}."
        shapes = {"ln_1": (C,), "attn.c_attn": (3 * C, C), "attn.c_proj": (C, C), "ln_2": (C,),
                  "mlp.c_fc": (4 * C, C), "mlp.c_proj": (C, 4 * C)}
        for name, s in shapes.items():
            sd[p + name + ".weight"] = (1 + r(*s)) if name.startswith("ln") else r(*s)
            if bias:
                sd[p + name + ".bias"] = r(s[0])
    sd["transformer.ln_f.weight"] = 1 + r(C)
    if bias:
        sd["transformer.ln_f.bias"] = r(C)
    return sd


def ref_logits(sd: dict[str, torch.Tensor], idx: torch.Tensor, gelu: str) -> torch.Tensor:
    """The GPT-2 forward pass written out by hand: explicit masked softmax attention, tied head."""
    def ln(x, name):
        return F.layer_norm(x, (C,), sd[name + ".weight"], sd.get(name + ".bias"), 1e-5)

    def lin(x, name):
        return F.linear(x, sd[name + ".weight"], sd.get(name + ".bias"))

    B, n = idx.shape
    x = sd["transformer.wte.weight"][idx] + sd["transformer.wpe.weight"][:n]
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    for i in range(L):
        p = f"transformer.h.{i}."
        q, k, v = lin(ln(x, p + "ln_1"), p + "attn.c_attn").split(C, dim=2)
        q, k, v = (t.view(B, n, H, C // H).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(C // H)
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(B, n, C)
        x = x + lin(y, p + "attn.c_proj")
        h = lin(ln(x, p + "ln_2"), p + "mlp.c_fc")
        h = F.gelu(h, approximate="tanh" if gelu == "tanh" else "none")
        x = x + lin(h, p + "mlp.c_proj")
    return ln(x, "transformer.ln_f") @ sd["transformer.wte.weight"].t()


def _double(sd):
    return {k: v.double() for k, v in sd.items()}


def _check_logits(model: GPT, sd, gelu: str, vocab: int) -> None:
    idx = torch.randint(0, vocab, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, _ = model(idx)
        want = ref_logits(sd, idx, gelu)[..., :vocab]
        assert got.shape == want.shape
        assert (got - want).abs().max().item() < 2e-5
        exact, _ = model.double()(idx)  # same maths: equal to rounding in fp64
        assert (exact - ref_logits(_double(sd), idx, gelu)[..., :vocab]).abs().max().item() < 1e-12


# --------------------------------------------------------------------------- nanoGPT


CHARS = sorted(set("First Citizen:\nBefore we proceed any further, hear me speak.\n"))


def _nanogpt_run(root, *, bias=True, vocab=None, with_meta=True, compiled=True):
    """A nanoGPT out dir laid out as nanoGPT's train.py writes it, beside data/<dataset>/meta.pkl."""
    vocab = vocab or len(CHARS)
    sd = ref_state(vocab, bias)
    saved = {("_orig_mod." + k if compiled else k): v for k, v in sd.items()}
    saved["_orig_mod.lm_head.weight" if compiled else "lm_head.weight"] = sd["transformer.wte.weight"]
    out = root / "out-shakespeare-char"
    out.mkdir(parents=True)
    model_args = dict(n_layer=L, n_head=H, n_embd=C, block_size=T, bias=bias, vocab_size=vocab, dropout=0.2)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))])
    torch.save({"model": saved, "optimizer": opt.state_dict(), "model_args": model_args, "iter_num": 250,
                "best_val_loss": torch.tensor(1.4697), "config": {"dataset": "shakespeare_char", "batch_size": 64,
                                                                    "learning_rate": 1e-3, "compile": compiled}},
               out / "ckpt.pt")
    if with_meta:
        data = root / "data" / "shakespeare_char"
        data.mkdir(parents=True)
        with open(data / "meta.pkl", "wb") as f:
            pickle.dump({"vocab_size": vocab, "itos": dict(enumerate(CHARS)),
                         "stoi": {c: i for i, c in enumerate(CHARS)}}, f)
    return out, sd


@pytest.mark.parametrize("bias", [True, False])
def test_nanogpt_run_dir_and_ckpt_pt_with_char_vocab(tmp_path, bias):
    out, sd = _nanogpt_run(tmp_path, bias=bias)
    for src in (out, out / "ckpt.pt"):
        model, tok = load_model(src)
        assert model.config.gelu == "erf" and model.config.bias == bias and model.config.dropout == 0.0
        assert isinstance(tok, CharTokenizer) and tok.chars == CHARS
        _check_logits(model, sd, "erf", len(CHARS))


def test_nanogpt_padded_gpt2_vocab_uses_gpt2_tokenizer(tmp_path):
    """nanoGPT's from-scratch GPT-2 pads 50,257 to 50,304 rows: the real ids' logits are equal, padded ids
    are never produced, and the loss excludes them (nanoGPT's softmax includes them)."""
    out, sd = _nanogpt_run(tmp_path, bias=False, vocab=50304, with_meta=False, compiled=False)
    model, tok = load_model(out)
    assert isinstance(tok, GPT2Tokenizer)
    assert (model.config.vocab_size, model.config.padded_vocab_size) == (50257, 50304)
    _check_logits(model, sd, "erf", 50257)
    idx = torch.randint(0, 50257, (1, T), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _, ours = model(idx[:, :-1], idx[:, 1:])
        full = ref_logits(sd, idx[:, :-1], "erf")
        theirs = F.cross_entropy(full.view(-1, 50304), idx[:, 1:].reshape(-1))
        masked = F.cross_entropy(full[..., :50257].reshape(-1, 50257), idx[:, 1:].reshape(-1))
    assert abs(ours.item() - masked.item()) < 1e-5 and ours.item() < theirs.item()


def test_nanogpt_sample_and_export_cli(tmp_path, capsys, monkeypatch):
    out, _ = _nanogpt_run(tmp_path)
    monkeypatch.chdir(tmp_path / "data")  # meta.pkl is found beside the run dir, whatever the working dir
    assert main(["sample", "--init", str(out / "ckpt.pt"), "--prompt", "First", "--max-new-tokens", "5",
                 "--num-samples", "1", "--seed", "1", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)["samples"][0]
    assert s.startswith("First") and len(s) == 10 and set(s) <= set(CHARS)
    assert main(["export", "--init", str(out), "--out", str(tmp_path / "hf"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["model_type"] == "gpt2" and summary["tokenizer"] == "char"
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["activation_function"] == "gelu"


# --------------------------------------------------------------------------- build-nanogpt


@dataclass
class GPTConfig:  # build-nanogpt's config dataclass, pickled by name as __main__.GPTConfig
    block_size: int = 1024
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768


@pytest.fixture
def as_main(monkeypatch):
    """Pickle GPTConfig under the name build-nanogpt's script gives it (run as ``python train_gpt2.py``)."""
    monkeypatch.setattr(GPTConfig, "__module__", "__main__")
    monkeypatch.setattr(sys.modules["__main__"], "GPTConfig", GPTConfig, raising=False)


def test_build_nanogpt_log_dir_picks_the_newest_checkpoint(tmp_path, as_main):
    log = tmp_path / "log"
    log.mkdir()
    vocab = 50304
    old, new = ref_state(vocab, seed=1), ref_state(vocab, seed=2)
    for step, sd in ((5000, old), (19072, new)):
        torch.save({"model": {**sd, "lm_head.weight": sd["transformer.wte.weight"]},
                    "config": GPTConfig(block_size=T, vocab_size=vocab, n_layer=L, n_head=H, n_embd=C),
                    "step": step, "val_loss": 3.07}, log / f"model_{step:05d}.pt")
    (log / "log.txt").write_text("0 val 10.9\n")
    model, tok = load_model(log)
    assert model.config.gelu == "tanh" and isinstance(tok, GPT2Tokenizer)
    _check_logits(model, new, "tanh", 50257)
    model, _ = load_model(log / "model_05000.pt")
    _check_logits(model, old, "tanh", 50257)


# --------------------------------------------------------------------------- refusing code


class _Boom:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))  # would run at load time with a plain unpickler


def test_pickles_that_would_run_code_are_refused(tmp_path, as_main):
    marker = tmp_path / "pwned"
    torch.save({"model": {}, "config": GPTConfig(), "x": _Boom(marker)}, tmp_path / "model_00001.pt")
    with pytest.raises(UnsafePickleError, match=r"model_00001\.pt: refuses to load.*mkdir"):
        load_torch_file(tmp_path / "model_00001.pt")
    with pytest.raises(GptlabError, match="refuses"):
        load_model(tmp_path)
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 1, "itos": _Boom(marker)}))
    with pytest.raises(UnsafePickleError, match=r"meta\.pkl: refuses to load (posix|os)\.mkdir"):
        load_plain_pickle(tmp_path / "meta.pkl")
    out, _ = _nanogpt_run(tmp_path / "run")  # a malicious meta.pkl beside a real checkpoint
    (tmp_path / "run" / "data" / "shakespeare_char" / "meta.pkl").write_bytes(
        pickle.dumps({"vocab_size": 1, "itos": _Boom(marker)}))
    with pytest.raises(UnsafePickleError):
        load_model(out)
    assert not marker.exists()


# --------------------------------------------------------------------------- llm.c


def write_llmc(path, sd, vocab: int, padded: int, version: int = 3) -> None:
    """llm.c's model file, written here from its documented layout (not through gptlab)."""
    header = np.zeros(256, dtype="<i4")
    header[:8] = [20240326, version, T, vocab, L, H, C, padded]
    wte = torch.cat([sd["transformer.wte.weight"][:vocab], torch.zeros(padded - vocab, C)])
    order = [wte, sd["transformer.wpe.weight"]]
    for name in ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
                 "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                 "mlp.c_proj.weight", "mlp.c_proj.bias"):
        order += [sd[f"transformer.h.{i}.{name}"] for i in range(L)]
    order += [sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"]]
    with open(path, "wb") as f:
        f.write(header.tobytes())
        for t in order:
            if version == 5:
                f.write(t.to(torch.bfloat16).view(torch.int16).numpy().tobytes())
            else:
                f.write(t.float().numpy().astype("<f4").tobytes())


def test_llmc_v3_and_v5_files_load(tmp_path):
    sd = ref_state(50257)
    write_llmc(tmp_path / "gpt2_tiny.bin", sd, 50257, 50304)
    model, tok = load_model(tmp_path / "gpt2_tiny.bin")
    assert isinstance(tok, GPT2Tokenizer) and model.config.padded_vocab_size == 50304
    assert not model.transformer.wte.weight[50257:].any()
    _check_logits(model, sd, "tanh", 50257)
    write_llmc(tmp_path / "gpt2_tiny_bf16.bin", sd, 50257, 50304, version=5)
    model, _ = load_model(tmp_path / "gpt2_tiny_bf16.bin")
    assert model.transformer.wte.weight.dtype == torch.bfloat16
    bf = {k: v.to(torch.bfloat16).float() for k, v in sd.items()}
    _check_logits(model.float(), bf, "tanh", 50257)


def test_gptlab_to_llmc_to_gptlab_is_identical_and_matches_llmc_layout(tmp_path, capsys):
    from gptlab.checkpoint import save_checkpoint
    from gptlab.config import to_dict

    cfg = ModelConfig(block_size=T, vocab_size=50257, pad_vocab_multiple=128, n_layer=L, n_head=H, n_embd=C)
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():
        model.transformer.wte.weight[50257:] = 0  # llm.c's padded rows are zeros
    run = tmp_path / "run"
    save_checkpoint(run, 1, model_state=model.state_dict(), tied=True, optimizer_state=None, rng_states=[],
                    meta={"model_config": to_dict(cfg), "tokenizer": GPT2Tokenizer().spec()})
    out = tmp_path / "gpt2_tiny.bin"
    assert main(["export", "--init", str(run), "--format", "llmc", "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["version"] == 3 and summary["padded_vocab_size"] == 50304
    write_llmc(tmp_path / "ref.bin", model.state_dict(), 50257, 50304)
    assert out.read_bytes() == (tmp_path / "ref.bin").read_bytes()  # llm.c's layout, byte for byte
    back, tok = load_model(out)
    assert isinstance(tok, GPT2Tokenizer)
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert main(["export", "--init", str(run), "--format", "llmc", "--out", str(out)]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", "--init", str(run), "--format", "llmc", "--dtype", "bfloat16", "--out",
                 str(tmp_path / "bf16.bin")]) == 0
    write_llmc(tmp_path / "ref5.bin", model.state_dict(), 50257, 50304, version=5)
    assert (tmp_path / "bf16.bin").read_bytes() == (tmp_path / "ref5.bin").read_bytes()


def test_llmc_export_of_unpadded_and_bias_free_models(tmp_path):
    from gptlab.convert.llmc import write_model

    torch.manual_seed(0)
    model = GPT(ModelConfig(block_size=T, vocab_size=50257, n_layer=L, n_head=H, n_embd=C, bias=False)).eval()
    write_model(model, tmp_path / "m.bin")
    back, _ = load_model(tmp_path / "m.bin")
    assert back.config.bias and back.config.padded_vocab_size == 50304
    x = torch.randint(0, 50257, (2, T))
    with torch.no_grad():
        assert torch.equal(back(x)[0], model(x)[0])


@pytest.mark.parametrize("overrides,words", [
    (dict(gelu="erf"), "gelu='erf' -> 'tanh'"),
    (dict(tie_embeddings=False), "tie_embeddings=false -> true"),
    (dict(norm="rmsnorm"), "norm='rmsnorm' -> 'layernorm'"),
    (dict(mlp_hidden=96), "mlp_hidden=96 -> 256"),
    (dict(norm_eps=1e-6), "norm_eps=1e-06 -> 1e-05"),
])
def test_llmc_export_refuses_what_llmc_cannot_hold(tmp_path, capsys, overrides, words):
    from gptlab.convert.llmc import write_model

    model = GPT(ModelConfig.from_preset("tiny", **overrides))
    with pytest.raises(GptlabError, match="llm.c's GPT-2 cannot hold this model") as e:
        write_model(model, tmp_path / "m.bin")
    assert words in str(e.value) and not list(tmp_path.iterdir())


def test_llmc_files_that_are_not_models_say_what_they_are(tmp_path):
    from gptlab.data.shards import write_shard

    write_shard(tmp_path / "shard.bin", [1, 2, 3], 50257)
    with pytest.raises(GptlabError, match="is a file gptlab does not read as a model"):
        load_model(tmp_path / "shard.bin")
    sd = ref_state(50257)
    write_llmc(tmp_path / "m.bin", sd, 50257, 50304)
    raw = (tmp_path / "m.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(raw[:-10])
    with pytest.raises(GptlabError, match=r"cut\.bin: \d+ bytes but the header describes \d+"):
        load_model(tmp_path / "cut.bin")
    (tmp_path / "v1.bin").write_bytes(raw[:4] + (1).to_bytes(4, "little") + raw[8:])
    with pytest.raises(GptlabError, match="version 1 is not supported"):
        load_model(tmp_path / "v1.bin")


# --------------------------------------------------------------------------- shards without a manifest


def write_llmc_shard(path, tokens) -> None:
    """llm.c / modded-nanogpt's data file, written here: 256 int32 (magic 20240520, version 1, count), uint16 tokens."""
    header = np.zeros(256, dtype="<i4")
    header[:3] = [20240520, 1, len(tokens)]
    path.write_bytes(header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes())


def _tokens(n, seed):
    return np.random.default_rng(seed).integers(0, 50257, n)


@pytest.fixture
def llmc_data(tmp_path):
    d = tmp_path / "fineweb10B"
    d.mkdir()
    toks = {"fineweb_val_000000.bin": _tokens(600, 0), "fineweb_train_000001.bin": _tokens(2000, 1),
            "fineweb_train_000002.bin": _tokens(2000, 2)}
    for name, t in toks.items():
        write_llmc_shard(d / name, t)
    return d, toks


def _manual_loss(model, tokens, T):
    """Mean next-token loss over the windows [s*T, s*T + T + 1) of one shard, computed directly."""
    n = (len(tokens) - 1) // T
    x = torch.tensor(np.stack([tokens[s * T:s * T + T] for s in range(n)]).astype(np.int64))
    y = torch.tensor(np.stack([tokens[s * T + 1:s * T + T + 1] for s in range(n)]).astype(np.int64))
    with torch.no_grad():
        logits, _ = model(x)
        return F.cross_entropy(logits.double().reshape(-1, logits.size(-1)), y.reshape(-1)).item(), n * T


def test_eval_loss_on_a_directory_or_glob_of_llmc_shards(tmp_path, llmc_data, capsys):
    d, toks = llmc_data
    write_llmc(tmp_path / "m.bin", ref_state(50257), 50257, 50304)
    model, _ = load_model(tmp_path / "m.bin")
    want, n = _manual_loss(model, toks["fineweb_val_000000.bin"], T)
    for data in (str(d), str(d / "fineweb_*.bin"), str(d / "fineweb_train_*.bin")):  # the last finds its val twin
        assert main(["eval", "loss", "--init", str(tmp_path / "m.bin"), "--data", data, "--seq-len", str(T),
                     "--device", "cpu", "--json"]) == 0
        res = json.loads(capsys.readouterr().out)
        assert res["tokens"] == n and abs(res["loss"] - want) < 1e-5, data
    # an explicit val glob: here a train shard plays val
    want, n = _manual_loss(model, toks["fineweb_train_000002.bin"], T)
    assert main(["eval", "loss", "--init", str(tmp_path / "m.bin"), "--data", str(d / "*.bin"), "--val",
                 str(d / "*_000002.bin"), "--seq-len", str(T), "--device", "cpu", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["tokens"] == n and abs(res["loss"] - want) < 1e-5


def test_build_nanogpt_npy_shards_are_read(tmp_path):
    from gptlab.data.loader import TokenLoader
    from gptlab.data.shards import open_manifest

    d = tmp_path / "edu_fineweb10B"
    d.mkdir()
    val, train = _tokens(300, 3).astype(np.uint16), _tokens(900, 4).astype(np.uint16)
    np.save(d / "edufineweb_val_000000", val)  # build-nanogpt's fineweb.py: np.save of a uint16 array
    np.save(d / "edufineweb_train_000001", train)
    m = open_manifest(d)
    assert [(s["file"], s["split"], s["tokens"]) for s in m["shards"]] == [
        ("edufineweb_train_000001.npy", "train", 900), ("edufineweb_val_000000.npy", "val", 300)]
    x, y = next(iter(TokenLoader(d, "train", 2, 8)))
    assert x.tolist() == [train[:8].tolist(), train[8:16].tolist()] and y[0].tolist() == train[1:9].tolist()
    x, _ = next(iter(TokenLoader(d, "val", 1, 8)))
    assert x[0].tolist() == val[:8].tolist()
    np.save(d / "edufineweb_train_000002", train.astype(np.float32))
    with pytest.raises(GptlabError, match=r"edufineweb_train_000002\.npy: a \.npy shard must be a 1-D uint16"):
        open_manifest(d)


def test_prepare_verify_checks_manifestless_shards(llmc_data, capsys):
    d, _ = llmc_data
    assert main(["prepare", "--verify", str(d / "*.bin"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["splits"] == {"train": {"tokens": 4000, "shards": 2}, "val": {"tokens": 600, "shards": 1}}
    assert res["checked"] == ["header", "token_range"]
    bad = _tokens(10, 5)
    bad[3] = 60000  # not a GPT-2 token
    write_llmc_shard(d / "fineweb_train_000003.bin", bad)
    assert main(["prepare", "--verify", str(d)]) == 1
    assert "fineweb_train_000003.bin: token 60000 at token offset 3" in capsys.readouterr().err
    (d / "fineweb_train_000003.bin").write_bytes((d / "fineweb_train_000001.bin").read_bytes()[:-2])
    assert main(["prepare", "--verify", str(d)]) == 1
    assert "fineweb_train_000003.bin: shard truncated" in capsys.readouterr().err


def test_train_on_llmc_shards_from_an_llmc_model_and_never_prepares_beside_them(tmp_path, llmc_data, capsys):
    from gptlab.metrics import read_metrics

    d, _ = llmc_data
    write_llmc(tmp_path / "m.bin", ref_state(50257), 50257, 50304)
    out = tmp_path / "run"
    args = ["train", "--data", str(d / "*.bin"), "--init", str(tmp_path / "m.bin"), "--out", str(out),
            "--max-steps", "2", "--eval-every", "2", "--batch.batch_tokens=64", "--batch.micro_batch=4",
            "--batch.seq_len=16",
            "--eval.eval_tokens=64", "--eval.sample_every=0", "--logging.progress=false", "--system.device=cpu"]
    assert main(args) == 0, capsys.readouterr().err[-2000:]
    recs = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in recs if r["kind"] == "val"] == [2]
    before = sorted(p.name for p in d.iterdir())
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text " * 200)
    capsys.readouterr()
    assert main(["train", "--data", str(d), "--data.input", str(corpus), "--data.dataset", "text", "--out",
                 str(tmp_path / "run2"), "--max-steps", "1", "--system.device=cpu"]) == 1
    err = capsys.readouterr().err
    assert "holds token shards that gptlab prepare did not write" in err and "\n" not in err.strip()
    assert main(["prepare", "text", "--input", str(corpus), "--out", str(d)]) == 1
    assert "holds token shards this prepare did not write (fineweb_train_000001.bin" in capsys.readouterr().err
    assert sorted(p.name for p in d.iterdir()) == before  # nothing written beside llm.c's shards


@pytest.mark.skipif(not os.environ.get("GPTLAB_TINYSHAKESPEARE"), reason="set GPTLAB_TINYSHAKESPEARE=path/to/input.txt")
def test_prepare_shakespeare_llmc_layout_reproduces_llmc_counts(tmp_path, capsys):
    """llm.c's dev/data/tinyshakespeare.py writes 32,768 val and 305,260 train tokens (66,560 and 611,544
    bytes): an EOT starts every blank-line-separated section, which keeps its trailing blank line."""
    from gptlab.data.shards import read_shard

    text = open(os.environ["GPTLAB_TINYSHAKESPEARE"], encoding="utf-8").read()
    out = tmp_path / "tinyshakespeare"
    assert main(["prepare", "shakespeare", "--layout", "llmc", "--input", os.environ["GPTLAB_TINYSHAKESPEARE"],
                 "--out", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert {sp: v["tokens"] for sp, v in res["splits"].items()} == {"val": 32768, "train": 305260}
    val, train = out / "tiny_shakespeare_val.bin", out / "tiny_shakespeare_train.bin"
    assert (val.stat().st_size, train.stat().st_size) == (66560, 611544)
    stream = np.concatenate([read_shard(val), read_shard(train)])
    eot = stream == 50256
    sections = text.split("\n\n")
    assert eot.sum() == len(sections) and stream[0] == 50256
    tok = GPT2Tokenizer()
    starts = np.flatnonzero(eot)
    for i in (0, 1, len(sections) // 2, len(sections) - 1):  # each section decodes to itself (+ its blank line)
        end = starts[i + 1] if i + 1 < len(starts) else len(stream)
        want = sections[i] + ("\n\n" if i < len(sections) - 1 else "")
        assert tok.decode(stream[starts[i] + 1:end].tolist()) == want
    assert tok.decode(stream[~eot].tolist()) == text
    assert main(["prepare", "--verify", str(out)]) == 0


def test_train_from_a_nanogpt_checkpoint_resumes(tmp_path, llmc_data, capsys):
    """The architecture of --init (bias-free, exact GELU, padded vocab) is the run's; a resume accepts it."""
    from gptlab.checkpoint import list_checkpoints
    from gptlab.loading import load_checkpoint

    d, _ = llmc_data
    src, _ = _nanogpt_run(tmp_path, bias=False, vocab=50304, with_meta=False)
    out = tmp_path / "run"
    args = ["train", "--data", str(d), "--init", str(src), "--out", str(out), "--eval-every", "0",
            "--batch.batch_tokens=64", "--batch.micro_batch=4", "--batch.seq_len=16", "--checkpoint-every", "2",
            "--eval.sample_every=0", "--logging.progress=false", "--system.device=cpu"]
    assert main([*args, "--max-steps", "2"]) == 0, capsys.readouterr().err[-2000:]
    assert main([*args, "--max-steps", "3", "--resume", "auto"]) == 0, capsys.readouterr().err[-2000:]
    assert [p.name for p in list_checkpoints(out)][-1] == "step_00000003"
    model, tok, _ = load_checkpoint(out)
    assert (model.config.gelu, model.config.bias, model.config.padded_vocab_size) == ("erf", False, 50304)
    assert isinstance(tok, GPT2Tokenizer)
