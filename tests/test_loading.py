"""load_model: every --init form resolves to the right loader; bad sources fail with one clear line."""

from __future__ import annotations

import json

import pytest
import torch

from gptlab import hf, loading
from gptlab.config import ModelConfig, to_dict
from gptlab.errors import GptlabError
from gptlab.model import GPT
from gptlab.tokenizer import CharTokenizer, GPT2Tokenizer



def _tiny(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig.from_preset("tiny", **kw)).eval()


def _same_weights(a: GPT, b: GPT) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_hf_dir_with_gpt2_vocab_gets_the_gpt2_tokenizer(tmp_path):
    model = _tiny(vocab_size=50257)
    hf.export_hf(model, GPT2Tokenizer(), tmp_path / "m")
    (tmp_path / "m" / hf.GPTLAB_TOKENIZER_FILE).unlink()  # as a plain HF GPT-2 dir: recognised by vocab.json
    back, tok = loading.load_model(tmp_path / "m")
    assert isinstance(tok, GPT2Tokenizer)
    assert _same_weights(model, back) and not back.training


def test_hf_dir_with_unknown_vocab_loads_without_tokenizer(tmp_path):
    model = _tiny()
    hf.export_hf(model, None, tmp_path / "m")
    with pytest.warns(UserWarning, match="without one"):
        back, tok = loading.load_model(str(tmp_path / "m"))
    assert tok is None and _same_weights(model, back)


def test_dtype_and_device_are_applied(tmp_path):
    hf.export_hf(_tiny(), CharTokenizer([chr(i) for i in range(256)]), tmp_path / "m")
    back, tok = loading.load_model(tmp_path / "m", device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in back.parameters()} == {torch.bfloat16}
    assert isinstance(tok, CharTokenizer) and tok.vocab_size == 256


def test_gptlab_checkpoint_dirs(tmp_path):
    from gptlab.checkpoint import save_checkpoint

    model = _tiny(vocab_size=65)
    tok = CharTokenizer([chr(c) for c in range(32, 97)])
    run = tmp_path / "run"
    ckpt = save_checkpoint(run, 7, model_state=model.state_dict(), tied=True, optimizer_state=None, rng_states=[],
                           meta={"model_config": to_dict(model.config), "tokenizer": tok.spec()})
    for src in (run, ckpt):  # a run dir (newest complete checkpoint) and one checkpoint dir
        back, back_tok = loading.load_model(src)
        assert _same_weights(model, back) and back_tok.spec() == tok.spec()
    # a run dir with no complete checkpoint is an error, not a silent random model
    empty = tmp_path / "empty_run"
    (empty / "checkpoints").mkdir(parents=True)
    with pytest.raises(GptlabError):
        loading.load_model(empty)


def test_unknown_sources_name_the_accepted_forms(tmp_path):
    with pytest.raises(GptlabError, match=r"not found; expected a Hub name \(gpt2, gpt2-medium"):
        loading.load_model(tmp_path / "missing")
    with pytest.raises(GptlabError, match="not found"):
        loading.load_model("gpt3")
    (tmp_path / "empty").mkdir()
    with pytest.raises(GptlabError, match="neither config.json"):
        loading.load_model(tmp_path / "empty")
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(GptlabError, match="is a file"):
        loading.load_model(tmp_path / "weights.safetensors")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(GptlabError, match="model_type='bert'"):
        loading.load_model(tmp_path / "bert")


def test_hub_names_go_through_the_hub(monkeypatch, tmp_path):
    import huggingface_hub

    hf.export_hf(_tiny(vocab_size=50257), GPT2Tokenizer(), tmp_path / "snap")
    calls = []

    def fake_snapshot(repo_id, **kw):
        calls.append((repo_id, kw.get("local_files_only", False)))
        if kw.get("local_files_only"):
            raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
        return str(tmp_path / "snap")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    model, tok = loading.load_model("gpt2-medium")
    assert calls == [("openai-community/gpt2-medium", True), ("openai-community/gpt2-medium", False)]
    assert isinstance(tok, GPT2Tokenizer) and model.config.vocab_size == 50257

    def cached_snapshot(repo_id, **kw):  # already in the cache: no download attempted
        calls.append((repo_id, kw.get("local_files_only", False)))
        return str(tmp_path / "snap")

    calls.clear()
    monkeypatch.setattr(huggingface_hub, "snapshot_download", cached_snapshot)
    loading.load_model("gpt2")
    assert calls == [("openai-community/gpt2", True)]


def test_offline_hub_error_says_what_to_do(monkeypatch):
    import huggingface_hub

    def offline(repo_id, **kw):
        raise huggingface_hub.errors.OfflineModeIsEnabled("Cannot reach https://huggingface.co: offline mode")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(GptlabError) as e:
        loading.load_model("gpt2")
    msg = str(e.value)
    assert "openai-community/gpt2" in msg and "local directory" in msg and "\n" not in msg


def test_loading_and_hf_do_not_import_each_other(tmp_path):
    """Reading an HF dir needs only the adapters; exporting needs no loader (no import cycle)."""
    import os
    import subprocess
    import sys

    hf.export_hf(_tiny(), CharTokenizer([chr(i) for i in range(256)]), tmp_path / "m")
    load = "import sys, gptlab.loading as l; l.load_model(sys.argv[1]); print('gptlab.hf' in sys.modules)"
    export = ("import sys, gptlab.hf as h; from gptlab.model import GPT; from gptlab.config import ModelConfig; "
              "h.export_hf(GPT(ModelConfig.from_preset('tiny')), None, sys.argv[1]); "
              "print('gptlab.loading' in sys.modules)")
    for code, arg in ((load, tmp_path / "m"), (export, tmp_path / "e")):
        out = subprocess.run([sys.executable, "-c", code, str(arg)], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert out.stdout.strip() == "False", out.stderr[-2000:]
