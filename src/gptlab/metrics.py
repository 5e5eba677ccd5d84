"""What a run reports: the per-step line, ``metrics.jsonl``, MFU, and optional wandb / TensorBoard.

``metrics.jsonl`` holds one JSON object per event with ``kind`` (train / val / hellaswag / sample) and
``step`` (optimizer steps counted from 1). Only rank 0 constructs a writer that writes.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from gptlab.config import ModelConfig
from gptlab.errors import GptlabError

# Per-GPU peaks from the vendors' datasheets: dense bf16 tensor-core FLOP/s (no sparsity; fp16 for GPUs
# without bf16) and memory bandwidth in bytes/s. The first name contained in the device name wins, so
# the more specific names come first.
GPU_PEAKS: list[tuple[str, float, float]] = [
    ("GB200", 2450e12, 8.0e12), ("B200", 2250e12, 8.0e12), ("B100", 1750e12, 8.0e12),
    ("GH200", 989e12, 4.0e12), ("H200", 989e12, 4.8e12), ("H100 NVL", 835e12, 3.9e12),
    ("H100 PCIe", 756e12, 2.0e12), ("H100", 989e12, 3.35e12), ("H800", 989e12, 3.35e12), ("H20", 148e12, 4.0e12),
    ("A100-SXM4-80GB", 312e12, 2.039e12), ("A100 80GB PCIe", 312e12, 1.935e12), ("A100", 312e12, 1.555e12),
    ("A800", 312e12, 2.039e12), ("A40", 150e12, 0.696e12), ("A30", 165e12, 0.933e12),
    ("A10G", 70e12, 0.6e12), ("A10", 125e12, 0.6e12),
    ("L40S", 362e12, 0.864e12), ("L40", 181e12, 0.864e12), ("L4", 121e12, 0.3e12),
    ("RTX 6000 Ada", 364e12, 0.96e12), ("RTX A6000", 155e12, 0.768e12),
    ("RTX 5090", 210e12, 1.792e12), ("RTX 4090", 165e12, 1.008e12), ("RTX 4080", 97e12, 0.717e12),
    ("RTX 3090", 71e12, 0.936e12), ("V100", 125e12, 0.9e12), ("T4", 65e12, 0.32e12),
]


def _gpu_peaks(device_name: str) -> tuple[float, float] | None:
    for key, flops, bandwidth in GPU_PEAKS:
        if key.lower() in device_name.lower():
            return flops, bandwidth
    return None


def peak_flops(device_name: str) -> float | None:
    """The per-GPU bf16 peak FLOP/s for a CUDA device name (``torch.cuda.get_device_name()``), or None."""
    peaks = _gpu_peaks(device_name)
    return peaks[0] if peaks else None


def peak_bandwidth(device_name: str) -> float | None:
    """The per-GPU memory bandwidth in bytes/s for a CUDA device name, or None."""
    peaks = _gpu_peaks(device_name)
    return peaks[1] if peaks else None


FLOPS_FORMULA = "6*N + 12*L*H*Q*T"


def flops_per_token(cfg: ModelConfig, seq_len: int, num_params: int) -> float:
    """Training FLOPs per token (forward + backward), PaLM appendix B as nanoGPT's estimate_mfu:
    ``6 * N`` for the matmuls, plus ``12 * L * H * Q * T`` for attention's QK^T and AV over T positions
    (H heads of size Q). N is ``num_params`` less the tables that are looked up, not multiplied: the
    position embeddings, and the token embeddings when the head does not share them."""
    n = num_params - (cfg.block_size * cfg.n_embd if cfg.pos_emb == "learned" else 0)
    if not cfg.tie_embeddings:
        n -= cfg.padded_vocab_size * cfg.n_embd
    return 6.0 * n + 12.0 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len


def mfu(tokens_per_s: float, flops_per_tok: float, peak: float | None, world_size: int = 1) -> float | None:
    """Model FLOPs utilisation in [0, 1] against ``world_size`` GPUs of ``peak`` FLOP/s each."""
    if not peak:
        return None
    return tokens_per_s * flops_per_tok / (peak * world_size)


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def format_step(rec: dict[str, Any], max_steps: int) -> str:
    """The fixed-format per-step line, e.g.
    ``step   10/19073 | loss 6.1234 | lr 6.00e-04 | norm 0.8123 | 312.4 ms | 1,678,000 tok/s | mfu 41.2% | eta 1h39m``.
    """
    width = len(str(max_steps))
    parts = [f"step {rec['step']:>{width}d}/{max_steps}", f"loss {rec['loss']:.4f}", f"lr {rec['lr']:.2e}",
             f"norm {rec['grad_norm']:.4f}", f"{rec['dt_ms']:7.1f} ms", f"{rec['tokens_per_s']:>10,.0f} tok/s"]
    if rec.get("mfu") is not None:
        parts.append(f"mfu {100 * rec['mfu']:4.1f}%")
    if rec.get("eta_s") is not None:
        parts.append(f"eta {format_duration(rec['eta_s'])}")
    return " | ".join(parts)


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` (a torn last line from a crash is skipped)."""
    out = []
    p = Path(path)
    if not p.is_file():
        return out
    for line in p.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def truncate_metrics(path: str | os.PathLike, step: int) -> int:
    """Drop records after ``step`` (a resumed run replays them, bit-identically); returns how many."""
    p = Path(path)
    recs = read_metrics(p)
    keep = [r for r in recs if int(r.get("step", 0)) <= step]
    if len(keep) != len(recs) or (p.is_file() and not p.read_text(encoding="utf-8").endswith("\n")
                                  and p.stat().st_size > 0):
        tmp = p.with_suffix(".jsonl.tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for r in keep:
                f.write(json.dumps(r) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    return len(recs) - len(keep)


class MetricsLogger:
    """Appends records to ``metrics.jsonl`` and mirrors numbers to wandb / TensorBoard when enabled.

    ``enabled=False`` (ranks other than 0) makes every method a no-op.
    """

    def __init__(self, run_dir: str | os.PathLike, *, enabled: bool = True, wandb: bool = False,
                 wandb_project: str = "gptlab", wandb_run_name: str = "", tensorboard: bool = False,
                 config: dict[str, Any] | None = None) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._f = None
        self._wandb = None
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = self.path.open("a", encoding="utf-8")
        if wandb:
            try:
                import wandb as wandb_mod
            except ImportError:
                raise GptlabError("logging.wandb=true needs wandb: pip install 'gptlab[wandb]'") from None
            self._wandb = wandb_mod.init(project=wandb_project, name=wandb_run_name or None, config=config,
                                         dir=str(run_dir), resume="allow")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise GptlabError("logging.tensorboard=true needs tensorboard: pip install tensorboard") from None
            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def log(self, record: dict[str, Any]) -> None:
        """Write one record (must have ``kind`` and ``step``); flushed so a crash loses nothing written."""
        if not self.enabled:
            return
        assert self._f is not None
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()
        kind, step = record["kind"], record["step"]
        nums = {f"{kind}/{k}": v for k, v in record.items()
                if k not in ("kind", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._wandb is not None:
            payload: dict[str, Any] = dict(nums)
            if kind == "sample":
                payload["sample/text"] = record.get("text", "")
            self._wandb.log(payload, step=step)
        if self._tb is not None:
            for k, v in nums.items():
                self._tb.add_scalar(k, v, step)
            if kind == "sample":
                self._tb.add_text("sample", record.get("text", ""), step)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
