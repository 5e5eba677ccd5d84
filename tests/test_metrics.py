"""Per-step line, metrics.jsonl writer/reader, FLOPs per token and MFU."""

from __future__ import annotations

import json

import pytest

from gptlab.config import ModelConfig
from gptlab.metrics import (
    MetricsLogger, flops_per_token, format_duration, format_step, mfu, peak_flops, read_metrics, truncate_metrics,
)


def test_peak_table_matches_specific_names_first():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA A10G") == 70e12 and peak_flops("NVIDIA A10") == 125e12
    assert peak_flops("NVIDIA L40S") == 362e12 and peak_flops("NVIDIA L4") == 121e12
    assert peak_flops("Some Unknown GPU") is None


def test_flops_per_token_counts_matmuls_and_attention():
    cfg = ModelConfig.from_preset("gpt2")
    n = 124_439_808  # GPT-2 124M with tied head
    got = flops_per_token(cfg, 1024, n)
    non_embedding_pos = n - 1024 * 768
    assert got == 6 * non_embedding_pos + 12 * 12 * 768 * 1024
    # MFU: tokens/s x FLOPs/token over peak x GPUs
    assert mfu(1e6, got, 989e12, 8) == pytest.approx(1e6 * got / (8 * 989e12))
    assert mfu(1e6, got, None) is None


def test_format_step_fixed_fields():
    rec = {"step": 7, "loss": 3.14159, "lr": 6e-4, "grad_norm": 0.5, "dt_ms": 123.45, "tokens_per_s": 4_247_000.0,
           "mfu": 0.412, "eta_s": 3725}
    line = format_step(rec, 19073)
    assert line == ("step     7/19073 | loss 3.1416 | lr 6.00e-04 | norm 0.5000 |   123.5 ms |  4,247,000 tok/s "
                    "| mfu 41.2% | eta 1h02m")
    rec.pop("mfu")
    assert "mfu" not in format_step(rec, 10)
    assert format_duration(65) == "1m05s" and format_duration(float("nan")) == "?"


def test_logger_writes_jsonl_and_truncates(tmp_path):
    log = MetricsLogger(tmp_path)
    for s in range(1, 6):
        log.log({"kind": "train", "step": s, "loss": 1.0 / s})
    log.log({"kind": "val", "step": 5, "val_loss": 0.3})
    log.close()
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 5]
    assert recs[-1] == {"kind": "val", "step": 5, "val_loss": 0.3}
    # a torn last line (crash mid-write) is skipped, and dropped by truncation
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "train", "st')
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == 6
    assert truncate_metrics(tmp_path / "metrics.jsonl", 3) == 3
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3]
    # disabled (non-zero ranks): writes nothing
    other = tmp_path / "other"
    MetricsLogger(other, enabled=False).log({"kind": "train", "step": 1})
    assert not (other / "metrics.jsonl").exists()


def test_wandb_mirror_gets_numbers_and_samples(tmp_path, monkeypatch):
    """With logging.wandb the logger forwards numeric fields (prefixed by kind) and sample text."""
    import sys
    import types

    calls: list = []

    class Run:
        def log(self, payload, step):
            calls.append(("log", payload, step))

        def finish(self):
            calls.append(("finish",))

    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls.append(("init", kw)) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    log = MetricsLogger(tmp_path, wandb=True, wandb_project="p", config={"a": 1})
    log.log({"kind": "train", "step": 3, "loss": 2.5, "lr": 1e-3, "note": "x"})
    log.log({"kind": "sample", "step": 3, "index": 0, "text": "hi"})
    log.close()
    assert calls[0][0] == "init" and calls[0][1]["project"] == "p" and calls[0][1]["config"] == {"a": 1}
    assert calls[1] == ("log", {"train/loss": 2.5, "train/lr": 1e-3}, 3)
    assert calls[2] == ("log", {"sample/index": 0, "sample/text": "hi"}, 3)
    assert calls[-1] == ("finish",)


def test_missing_tensorboard_is_a_clear_error(tmp_path):
    from gptlab.errors import GptlabError

    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(GptlabError, match="pip install tensorboard"):
            MetricsLogger(tmp_path, tensorboard=True)
    else:
        log = MetricsLogger(tmp_path, tensorboard=True)
        log.log({"kind": "val", "step": 1, "val_loss": 1.0})
        log.close()
        assert any((tmp_path / "tensorboard").iterdir())
