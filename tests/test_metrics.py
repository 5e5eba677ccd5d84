"""Per-step line, metrics.jsonl writer/reader, FLOPs per token and MFU."""

from __future__ import annotations

import json

import pytest

from gptlab.config import ModelConfig
from gptlab.metrics import (
    GPU_PEAKS, MetricsLogger, flops_per_token, format_duration, format_step, mfu, peak_bandwidth, peak_flops,
    read_metrics, truncate_metrics,
)


def test_peak_table_matches_specific_names_first():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and peak_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12 and peak_bandwidth("NVIDIA H100 PCIe") == 2.0e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12 and peak_bandwidth("NVIDIA A100-SXM4-80GB") == 2.039e12
    assert peak_bandwidth("NVIDIA A100-SXM4-40GB") == 1.555e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA A10G") == 70e12 and peak_flops("NVIDIA A10") == 125e12
    assert peak_flops("NVIDIA L40S") == 362e12 and peak_flops("NVIDIA L4") == 121e12
    assert peak_flops("Some Unknown GPU") is None and peak_bandwidth("Some Unknown GPU") is None
    names = [name for name, _, _ in GPU_PEAKS]
    for i, name in enumerate(names):  # no entry is shadowed by an earlier, less specific one
        assert not any(earlier.lower() in name.lower() for earlier in names[:i]), name


@pytest.mark.parametrize("arch", [
    dict(),  # GPT-2: learned positions, tied head, biases
    dict(bias=False, n_kv_head=2),  # grouped-query attention: narrower k/v projections
    dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True, bias=False, tie_embeddings=False,
         pad_vocab_multiple=128),  # modern: untied head, padded vocabulary
])
def test_flops_per_token_matches_torch_flop_counter(arch):
    """An independent count: torch's FlopCounterMode over one forward + backward of a small model, with
    attention on the math backend (its matmuls visible to the counter). The formula leaves out only
    biases and norms, ~1% of the parameters at this width."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from gptlab.model import GPT

    cfg = ModelConfig(n_layer=2, n_head=4, n_embd=128, block_size=48, vocab_size=300, **arch)
    model = GPT(cfg)
    B, T = 2, 48
    x = torch.randint(0, 300, (B, T + 1), generator=torch.Generator().manual_seed(0))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x[:, :-1], x[:, 1:])[1].backward()
    counted = counter.get_total_flops() / (B * T)
    assert flops_per_token(cfg, T, model.num_params()) == pytest.approx(counted, rel=0.01)


def test_mfu():
    got = flops_per_token(ModelConfig.from_preset("gpt2"), 1024, 124_439_808)
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
