"""Samples during training: ``eval.num_samples`` continuations of ``eval.sample_prompt``, written to the
run dir's ``samples.txt`` and to ``metrics.jsonl`` (kind ``sample``). A thin layer over generation."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gptlab.evals.registry import Eval, EvalContext, EvalOff, register

if TYPE_CHECKING:
    import torch


def sample_texts(model: torch.nn.Module, tokenizer: Any, ctx: EvalContext) -> list[str]:
    """Continuations of ``eval.sample_prompt`` from ``model`` through the engine, sample i seeded
    ``system.seed + step + i`` (the global RNG, which dropout uses, is left untouched); a sample ends at the
    end-of-text token, as ``gptlab sample`` does."""
    from gptlab.engine import Engine, SamplingParams

    ev, block_size = ctx.cfg.eval, model.config.block_size
    try:
        ids = tokenizer.encode(ev.sample_prompt)
    except Exception as e:  # e.g. a character the char vocabulary lacks
        raise EvalOff(f"sampling is off: cannot encode eval.sample_prompt ({e})") from None
    if not ids:
        ids = [tokenizer.eot_id or 0]
    ids = ids[-block_size + 1:]
    max_new = min(ev.sample_tokens, block_size - len(ids))
    seed = ctx.cfg.system.seed + ctx.step
    params = [SamplingParams(max_tokens=max_new, temperature=ev.sample_temperature, top_k=ev.sample_top_k or None,
                             seed=seed + i) for i in range(ev.num_samples)]
    # Sharded (FSDP) weights: every rank runs the same forwards, without a cache (full recomputation).
    engine = Engine(model, tokenizer, max_batch=ev.num_samples, max_queue=ev.num_samples,
                    use_kv_cache=not ctx.parallel.sharded)
    prompt = tokenizer.decode(ids)
    try:
        with ctx.amp(), warnings.catch_warnings():
            # FSDP2 warns that the sliced logits are a view; sampling never runs backward.
            warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
            out = engine.generate([ids] * ev.num_samples, params)
    finally:
        model.train()
    for c in out:
        if c.error:
            raise EvalOff(f"sampling is off: {c.error}")
    return [prompt + c.text for c in out]


def truncate_samples(path: Path, step: int) -> None:
    """Drop sample blocks after ``step`` from samples.txt (a resumed run writes them again)."""
    if not path.is_file():
        return
    out, keep = [], True
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        if line.startswith("=== step "):
            try:
                keep = int(line.split()[2]) <= step
            except (IndexError, ValueError):
                keep = True
        if keep:
            out.append(line)
    path.write_text("".join(out), encoding="utf-8")


@register
class Samples(Eval):
    name = "sample"
    every_key = "sample_every"
    main_only = True

    def run(self, model: torch.nn.Module, ctx: EvalContext) -> list[dict[str, Any]]:
        if ctx.tokenizer is None:
            return []
        texts = sample_texts(model, ctx.tokenizer, ctx)
        if ctx.info.is_main:
            with (ctx.run_dir / "samples.txt").open("a", encoding="utf-8") as f:
                for i, t in enumerate(texts):
                    f.write(f"=== step {ctx.step} sample {i} ===\n{t}\n")
        return [{"index": i, "text": t} for i, t in enumerate(texts)]

    def report(self, records: list[dict[str, Any]]) -> str | None:
        return f"sample: {records[0]['text']!r}" if records else None
