"""gptlab bench: every command runs end to end on tiny sizes and prints the documented JSON keys.

No timing assertions (speed lives in BENCHMARKS.md); the checks are on what a benchmark must get
right regardless of speed: both contenders compute the same function, the derived figures follow
from the measured ones, and FLOP / byte counts match an independent count.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from gptlab import bench
from gptlab.cli import main
from gptlab.config import ModelConfig
from gptlab.errors import GptlabError
from gptlab.model import GPT

TRAIN_KEYS = {"bench", "model", "config", "batch", "seq", "dtype", "device", "device_name", "torch_version",
              "commit", "loadavg", "num_threads", "ms_per_step", "ms_per_step_mean", "tokens_per_s", "mfu",
              "flops_per_token", "flops_formula", "peak_memory_mb", "loss_first", "loss_last"}
HF_TRAIN_KEYS = {"hf_tokens_per_s", "speedup_vs_hf", "hf_ms_per_step", "hf_loss_first", "hf_peak_memory_mb"}


def run_json(capsys, argv: list[str]) -> dict:
    assert main(argv) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, out  # exactly one JSON object on stdout
    return json.loads(lines[0])


def test_bench_train_vs_hf_json(capsys):
    r = run_json(capsys, ["bench", "train", "--model", "tiny", "--batch", "2", "--seq", "16", "--steps", "4",
                          "--warmup", "1", "--rounds", "2", "--vs-hf", "--device", "cpu", "--json",
                          "--set", "n_layer=1", "dropout=0"])
    assert TRAIN_KEYS | HF_TRAIN_KEYS <= r.keys()
    assert r["config"]["n_layer"] == 1
    assert r["tokens_per_step"] == 2 * 16
    assert r["tokens_per_s"] == pytest.approx(32 / (r["ms_per_step"] / 1e3))
    assert r["speedup_vs_hf"] == pytest.approx(r["tokens_per_s"] / r["hf_tokens_per_s"])
    assert r["mfu"] is None and r["peak_memory_kind"] == "cpu_max_rss"  # no MFU without a GPU peak
    # Same weights, data, loss and optimizer: the two models must walk the same loss path
    # (with biases: a bias-free model maps onto HF's zero biases, which then train and diverge).
    assert r["hf_loss_first"] == pytest.approx(r["loss_first"], abs=1e-5)
    assert r["hf_loss_last"] == pytest.approx(r["loss_last"], abs=1e-4)
    assert r["loss_last"] < r["loss_first"]  # 5 AdamW steps on one batch must reduce its loss


def test_bench_train_vs_another_gptlab_model(capsys):
    """--vs-model times a second gptlab architecture at the same shapes: its own config (overrides applied,
    the vocabulary of --model), its own parameter count, its step ratio derived from the two medians."""
    r = run_json(capsys, ["bench", "train", "--model", "tiny", "--batch", "2", "--seq", "16", "--steps", "4",
                          "--warmup", "1", "--rounds", "2", "--device", "cpu", "--json", "--set", "n_layer=1",
                          "--vs-model", "tiny", "--vs-set", "n_layer=1", "pos_emb=rope", "norm=rmsnorm",
                          "mlp=swiglu", "qk_norm=true"])
    vs = r["vs_config"]
    assert (vs["pos_emb"], vs["norm"], vs["mlp"], vs["qk_norm"]) == ("rope", "rmsnorm", "swiglu", True)
    assert vs["vocab_size"] == r["config"]["vocab_size"] and r["config"]["pos_emb"] == "learned"
    assert r["vs_n_params"] == GPT(ModelConfig(**vs)).num_params()
    assert r["vs_step_ratio"] == pytest.approx(r["vs_ms_per_step"] / r["ms_per_step"])
    assert r["vs_loss_last"] < r["vs_loss_first"]
    with pytest.raises(GptlabError, match="vs-model"):
        bench.bench_train("tiny", batch=1, seq=16, steps=1, warmup=0, device="cpu", quiet=True,
                          vs_model="tiny", vs_overrides=["block_size=8"])


def test_bench_train_human_output_goes_to_stdout_progress_to_stderr(capsys):
    assert main(["bench", "train", "--model", "tiny", "--batch", "1", "--seq", "8", "--steps", "1",
                 "--warmup", "0", "--rounds", "1", "--device", "cpu"]) == 0
    cap = capsys.readouterr()
    assert "tokens/s" in cap.out and "bench train:" in cap.err


@pytest.mark.parametrize("argv, message", [
    (["--model", "gtp2"], "did you mean 'gpt2'"),
    (["--model", "tiny", "--seq", "65"], "exceeds the model's context"),
    (["--model", "tiny", "--set", "n_layr=2"], "did you mean 'n_layer'"),
    (["--model", "tiny", "--vs-hf", "--set", "norm=rmsnorm"], "no Hugging Face architecture"),
])
def test_bench_train_user_errors_are_one_line(capsys, argv, message):
    assert main(["bench", "train", "--device", "cpu", "--steps", "1", "--warmup", "0", *argv]) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("sets", [{}, {"bias": False, "pad_vocab_multiple": 128, "vocab_size": 200}])
def test_hf_copy_computes_the_same_function(sets):
    torch.manual_seed(0)
    net = GPT(ModelConfig.from_preset("tiny", **sets)).eval()
    hf, arch = bench.hf_twin(net)
    assert arch == ("gpt2" if net.config.bias else "gpt2-zero-bias")
    x = torch.randint(0, net.config.vocab_size, (2, 20))
    with torch.no_grad():
        ours, _ = net(x)
        theirs = hf(input_ids=x).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_bench_train_reports_the_trainers_flops_and_peak(monkeypatch):
    """bench and the trainer share one FLOPs formula and one GPU peak table (gptlab.metrics)."""
    from gptlab import metrics

    r = bench.bench_train("tiny", batch=1, seq=8, steps=1, warmup=0, rounds=1, device="cpu", quiet=True)
    cfg = ModelConfig(**r["config"])
    assert r["flops_per_token"] == metrics.flops_per_token(cfg, 8, r["n_params"])
    assert r["flops_formula"] == metrics.FLOPS_FORMULA
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert bench.gpu_peak_flops(torch.device("cuda")) == metrics.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert bench.gpu_peak_flops(torch.device("cpu")) is None


def test_decode_bytes_per_step_counts_weights_and_cache():
    cfg = ModelConfig.from_preset("tiny")
    net = GPT(cfg)
    weights = 4 * (net.num_params() - cfg.block_size * cfg.n_embd)
    kv = 4 * 2 * cfg.n_layer * 3 * cfg.n_embd * 10  # batch 3, 10 cached positions, K and V
    assert bench.decode_bytes_per_step(net, 3, 10) == weights + kv


def test_bench_generate_json(capsys):
    pytest.importorskip("gptlab.generate")
    r = run_json(capsys, ["bench", "generate", "--model", "tiny", "--batch", "2", "--prompt-tokens", "4",
                          "--new-tokens", "12", "--rounds", "1", "--vs-hf", "--no-cache-baseline",
                          "--device", "cpu", "--json"])
    for key in ("tokens_per_s", "hf_tokens_per_s", "speedup_vs_hf", "no_cache_tokens_per_s",
                "speedup_vs_no_cache", "ms_per_token", "memory_bandwidth_gbps", "device", "torch_version"):
        assert key in r, key
    assert r["tokens_per_s"] == pytest.approx(2 * 12 / r["seconds"])
    assert r["memory_bandwidth_utilization"] is None  # CPU: no HBM peak
    # Greedy decoding of one model three ways must give the same tokens.
    assert r["greedy_agreement_vs_no_cache"] == 1.0
    assert r["greedy_agreement_vs_hf"] == 1.0
    assert math.isfinite(r["speedup_vs_hf"])


def test_recipe_model_section(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTLAB_DATA_HOME", str(tmp_path / "data"))
    cfg = bench.resolve_model_config("shakespeare-char-cpu", ["dropout=0.1"])
    # The recipe inherits bias=false and vocab "from the dataset" from shakespeare-char, whose pinned
    # corpus fixes the character vocabulary before it is prepared.
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size) == (4, 4, 128, 64)
    assert cfg.bias is False and cfg.vocab_size == 65 and cfg.dropout == 0.1


def test_recipe_vocabulary_comes_from_the_dataset_not_its_name(tmp_path, tiny_corpus):
    """A char dataset of another corpus: its prepared manifest decides; unprepared, a clear error."""
    from gptlab.data.prepare import prepare_dataset
    from gptlab.data.shards import read_manifest

    recipe = tmp_path / "my-char.toml"
    data = tmp_path / "d"
    recipe.write_text(f'[data]\ndataset = "text"\ntokenizer = "char"\ndir = "{data}"\n'
                      '[model]\nn_layer = 1\nn_head = 2\nn_embd = 16\nblock_size = 16\n')
    with pytest.raises(GptlabError, match="not prepared yet.*vocab_size"):
        bench.resolve_model_config(str(recipe))
    prepare_dataset("text", input=str(tiny_corpus), out=tmp_path / "d", tokenizer="char")
    want = read_manifest(tmp_path / "d")["vocab_size"]
    assert want != 65 and bench.resolve_model_config(str(recipe)).vocab_size == want
    assert bench.resolve_model_config(str(recipe), ["vocab_size=99"]).vocab_size == 99


def test_bench_prepare_json(capsys, tiny_corpus):
    from gptlab.tokenizer import GPT2Tokenizer

    r = run_json(capsys, ["bench", "prepare", "--input", str(tiny_corpus), "--max-workers", "2", "--rounds", "1",
                          "--json"])
    assert [row["workers"] for row in r["per_workers"]] == [1, 2]
    assert r["per_workers"][0]["speedup"] == 1.0
    assert r["scaling"] == pytest.approx(r["per_workers"][1]["tokens_per_s"] / r["per_workers"][0]["tokens_per_s"])
    text = tiny_corpus.read_text(encoding="utf-8")
    docs = bench.split_documents(text)
    assert "".join(docs) == text and len(docs) == r["documents"] > 2
    # prepare puts an EOT before every document; count with the tokenizer's plain encode path.
    tok = GPT2Tokenizer()
    assert r["tokens"] == sum(len(tok.encode(d)) + 1 for d in docs)
    assert r["tokens_per_s"] == max(row["tokens_per_s"] for row in r["per_workers"])


def test_synthetic_corpus_is_deterministic_and_sized():
    a = bench.synthetic_corpus(0.05, seed=1)
    assert a == bench.synthetic_corpus(0.05, seed=1) != bench.synthetic_corpus(0.05, seed=2)
    assert 50_000 <= sum(map(len, a)) < 50_000 + 5_000


def test_bench_loader_json(capsys):
    r = run_json(capsys, ["bench", "loader", "--batch", "4", "--seq", "32", "--batches", "20", "--shuffle",
                          "--device", "cpu", "--json"])
    for key in ("batches_per_s", "tokens_per_s", "ms_per_batch", "headroom_vs_gpu_step", "device", "torch_version"):
        assert key in r, key
    assert r["tokens_per_s"] == pytest.approx(r["batches_per_s"] * 4 * 32)
    assert r["shuffle"] is True and r["source"].startswith("synthetic")


@pytest.mark.gpu
def test_bench_train_and_generate_on_gpu(capsys):
    r = run_json(capsys, ["bench", "train", "--model", "tiny", "--batch", "4", "--seq", "64", "--steps", "4",
                          "--warmup", "2", "--rounds", "2", "--dtype", "bfloat16", "--compile", "--vs-hf",
                          "--device", "cuda", "--json"])
    assert r["dtype"] == "bfloat16" and r["peak_memory_kind"] == "cuda_max_memory_allocated"
    if r["peak_tflops"] is not None:  # a GPU in the peak table
        assert r["mfu"] == pytest.approx(r["flops_per_token"] * r["tokens_per_s"] / (r["peak_tflops"] * 1e12))
    g = run_json(capsys, ["bench", "generate", "--model", "tiny", "--prompt-tokens", "4", "--new-tokens", "16",
                          "--rounds", "1", "--dtype", "bfloat16", "--vs-hf", "--device", "cuda", "--json"])
    assert g["tokens_per_s"] > 0 and g["memory_bandwidth_gbps"] > 0


def test_bench_train_bf16_autocast_runs_on_cpu(capsys):
    r = run_json(capsys, ["bench", "train", "--model", "tiny", "--batch", "2", "--seq", "16", "--steps", "1",
                          "--warmup", "1", "--rounds", "1", "--dtype", "bfloat16", "--device", "cpu", "--json"])
    assert r["dtype"] == "bfloat16" and math.isfinite(r["loss_last"])
