"""What a new user meets first: the two set-up commands, --help defaults, and one-line messages for
damaged or wrong inputs (each names the file or flag to fix)."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
from pathlib import Path

import pytest
import torch

from gptlab.cli import build_parser, main
from gptlab.commands import HelpFormatter

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory):
    from gptlab import hf
    from gptlab.config import ModelConfig
    from gptlab.model import GPT
    from gptlab.tokenizer import GPT2Tokenizer

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("newcomer") / "model"
    hf.export_hf(GPT(ModelConfig.from_preset("tiny", vocab_size=50257, block_size=16)), GPT2Tokenizer(), d)
    return d


def _parsers(parser: argparse.ArgumentParser, name: str = "gptlab"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def test_help_shows_every_default():
    """Every option with a value to show (not None/False/empty) says its default, help text or not."""
    checked = 0
    for name, parser in _parsers(build_parser()):
        if parser.formatter_class is not HelpFormatter:
            continue
        text = parser.format_help()
        opts = [a for a in parser._actions if HelpFormatter._default_shown(a)]
        for a in opts:
            # The option's block: from its line to the next option line.
            block = re.search(rf"^  {re.escape(a.option_strings[-1])}\b.*?(?=^  -|\Z)", text, re.M | re.S)
            assert block and "default" in block.group(0), f"{name} {a.option_strings[-1]}: no default shown"
            checked += 1
    assert checked > 30


def test_sample_long_prompt_warning_is_one_clean_line(tiny_hf_dir, capsys):
    assert main(["sample", "--init", str(tiny_hf_dir), "--prompt", "word " * 40, "--max-new-tokens", "2",
                 "--device", "cpu", "--json"]) == 0
    err = capsys.readouterr().err
    warn = [line for line in err.splitlines() if "warning" in line.lower()]
    assert len(warn) == 1 and warn[0].startswith("gptlab sample: warning: prompt ("), err
    assert "UserWarning" not in err and ".py:" not in err


def test_sample_json_says_whether_it_compiled(tiny_hf_dir, capsys):
    assert main(["sample", "--init", str(tiny_hf_dir), "--max-new-tokens", "2", "--device", "cpu", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["compile"] is False and out["compile_seconds"] is None


def _one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 1
    text = capsys.readouterr().err
    err = [line for line in text.splitlines() if ": error: " in line]
    assert len(err) == 1 and "Traceback" not in text, text
    assert "Traceback" not in err[0] and "GPTLAB_DEBUG" not in err[0], err[0]  # a known error, not a crash
    return err[0]


def test_damaged_safetensors_names_the_file(tiny_hf_dir, tmp_path, capsys):
    import shutil

    d = tmp_path / "damaged"
    shutil.copytree(tiny_hf_dir, d)
    weights = d / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    line = _one_line_error(capsys, ["sample", "--init", str(d), "--device", "cpu"])
    assert str(weights) in line and "damaged" in line


def test_binary_config_names_the_file(tmp_path, capsys):
    cfg = tmp_path / "weights.toml"
    cfg.write_bytes(bytes(range(256)) * 4)
    line = _one_line_error(capsys, ["train", "--config", str(cfg)])
    assert str(cfg) in line and "not a TOML text file" in line


def test_plot_out_directory_names_it(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 1, "loss": 3.0, "tokens": 8}) + "\n")
    line = _one_line_error(capsys, ["plot", str(run), "--out", str(tmp_path)])
    assert f"--out {tmp_path}: is a directory" in line


def test_train_data_errors_name_trains_own_flag(tmp_path, capsys, monkeypatch):
    """The automatic prepare's hints must name data.input, the setting `gptlab train` has (not --input)."""
    monkeypatch.setenv("GPTLAB_DATA_HOME", str(tmp_path / "data"))
    line = _one_line_error(capsys, ["train", "--data.dataset=text", "--out", str(tmp_path / "run"),
                                    "--system.device=cpu"])
    assert "--data.input=" in line and "--input " not in line


def test_prepare_progress_bar_ends_on_the_final_count(tmp_path, tiny_corpus, capsys):
    from gptlab.data.prepare import prepare_dataset

    summary = prepare_dataset("text", input=str(tiny_corpus), out=tmp_path / "d", tokenizer="char", progress=True)
    last = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    total = sum(split["tokens"] for split in summary["splits"].values())
    assert f"{total:,} tokens" in last, last


def test_two_setup_commands_are_the_readme_and_ci_ones():
    """README's first screen: exactly two commands after git clone; CI runs the test one as written."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    first_block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.splitlines() if line.split("#")[0].strip()]
    assert commands == ["scripts/quickstart.sh", "scripts/test.sh"]
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert "scripts/test.sh" in ci
    for script in ("quickstart.sh", "test.sh", "install.sh"):
        path = ROOT / "scripts" / script
        assert path.stat().st_mode & 0o111, f"{script} is not executable"
        subprocess.run(["bash", "-n", str(path)], check=True)  # syntax
