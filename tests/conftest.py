"""Shared fixtures: tiny configs, tiny corpora and a character dataset, the serve tests' live server,
process-group teardown, the gpu marker."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest
import torch

# Tests never touch the network: make Hugging Face libraries fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# CPU kernel choice (gptlab.kernels): never write the user's cache, and keep plain nn.Linear unless a test
# turns measuring on (a choice by timing could differ between two processes a test compares bit for bit).
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="gptlab-test-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], ignore_errors=True)
os.environ.setdefault("GPTLAB_ONEDNN", "0")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a loaded machine OpenMP's spinning
    workers make them up to ~10x slower (measured); subprocesses choose their own setting."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _destroy_process_group():
    yield
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture
def tiny_config():
    from gptlab.config import ModelConfig

    return ModelConfig.from_preset("tiny")


def _write_corpus(path):
    """A small deterministic English-like text (about 60 KB) written to ``path``."""
    import random

    rng = random.Random(0)
    words = ("the quick brown fox jumps over lazy dog and cat sat on mat while rain fell softly "
             "upon green hills of old England where kings once ruled").split()
    lines = []
    for _ in range(1500):
        lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))).capitalize() + ".")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def tiny_corpus(tmp_path):
    """A small deterministic English-like text file (about 60 KB)."""
    return _write_corpus(tmp_path / "corpus.txt")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The tiny corpus as a character-level dataset (about 60K tokens), prepared once per module (a module
    may define its own ``data_dir``)."""
    from gptlab.data.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("data")
    prepare_dataset("text", input=str(_write_corpus(root / "corpus.txt")), out=root / "chars", tokenizer="char",
                    progress=False)
    return root / "chars"


# The live server of the serve tests (tests/serve_util.py): one ``gptlab serve`` over the module's
# ``run_dir`` fixture, started with the module's ``SERVE_ARGS``, and an ``openai`` client of it.
@pytest.fixture(scope="module")
def server(run_dir, request, tmp_path_factory):
    from serve_util import LiveServer

    srv = LiveServer(run_dir, tmp_path_factory.mktemp("log") / "serve.log",
                     *getattr(request.module, "SERVE_ARGS", ())).wait_ready()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
