"""Helpers for the server tests: a tiny run dir and a live ``gptlab serve`` subprocess on a free port."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

# A context long enough that a cancelled row would clearly still be running if it were not cancelled.
BLOCK_SIZE = 512


def make_run(run_dir: Path, seed: int = 0, block_size: int = BLOCK_SIZE, chat: bool = False) -> Path:
    """A gptlab run dir holding a tiny random GPT-2-vocabulary model (one complete checkpoint); ``chat``: GPT-2
    BPE plus the six turn tokens."""
    import torch

    from gptlab.checkpoint import save_checkpoint
    from gptlab.config import ModelConfig, to_dict
    from gptlab.model import GPT
    from gptlab.tokenizer import GPT2Tokenizer

    vocab = {"vocab_size": 50263, "pad_vocab_multiple": 128} if chat else {"vocab_size": 50257}
    cfg = ModelConfig.from_preset("tiny", block_size=block_size, **vocab)
    model = GPT(cfg)
    model.init_weights(torch.Generator().manual_seed(seed))
    save_checkpoint(run_dir, 1, model_state=model.state_dict(), tied=cfg.tie_embeddings, optimizer_state=None,
                    rng_states=[], meta={"model_config": to_dict(cfg), "tokenizer": GPT2Tokenizer(chat=chat).spec()})
    return run_dir


class LiveServer:
    """``gptlab serve --port 0`` in a subprocess; ``url`` once it listens, ``wait_ready`` until /health is 200."""

    def __init__(self, run_dir: Path, log: Path, *extra: str, api_key: str | None = None) -> None:
        self.log_path = log
        self.init = run_dir
        self.api_key = api_key
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        src = str(Path(__file__).resolve().parents[1] / "src")
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        cmd = [sys.executable, "-m", "gptlab", "serve", "--init", str(run_dir), "--port", "0", "--device", "cpu",
               *extra]
        self._log = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self.url = self._wait_listening()

    def _wait_listening(self, timeout: float = 120.0) -> str:
        t0 = time.time()
        while time.time() - t0 < timeout:
            m = re.search(r"listening on (http://[\d.]+:\d+)", self.log())
            if m:
                return m.group(1)
            if self.proc.poll() is not None:
                raise RuntimeError(f"gptlab serve exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.1)
        raise RuntimeError(f"gptlab serve did not listen within {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def wait_ready(self, timeout: float = 120.0) -> "LiveServer":
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gptlab serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"gptlab serve was not ready within {timeout}s:\n{self.log()}")

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics as ``name{labels}`` -> value, parsed by prometheus_client."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(self.url + "/metrics", headers=self.headers(), timeout=10).text
        out = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode
