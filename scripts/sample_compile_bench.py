"""`sample --compile` vs eager on one model, in one process: alternating rounds after one warm-up each.

    python scripts/sample_compile_bench.py RUN_DIR   (OMP_NUM_THREADS=1 on a shared machine)
"""
import json, sys
import torch
from gptlab.engine import Engine, SamplingParams
from gptlab.kernels import apply_cpu_kernels
from gptlab.loading import load_model
from gptlab.timing import alternate

run = sys.argv[1]
model, tok = load_model(run, device="cpu")
apply_cpu_kernels(model)
model.eval()
prompt = tok.encode("\n")
res = {"threads": torch.get_num_threads()}
with torch.inference_mode():
    for B in (1, 8):
        N = 63 - len(prompt) + 1 - 1  # fill the 64-token window
        engines = {"eager": Engine(model, tok, max_batch=B, max_queue=B),
                   "compiled": Engine(model, tok, max_batch=B, max_queue=B, compile=True)}
        runs = {k: (lambda e=e: e.generate([prompt] * B, SamplingParams(max_tokens=N, temperature=1.0, seed=0,
                                                                         ignore_eot=True)))
                for k, e in engines.items()}
        t = alternate(runs, warmup=1, rounds=5)
        res[f"batch{B}"] = {"new_tokens": N, "compiled_first_call_s": round(t.warmup_s["compiled"], 2),
                            "compile_seconds": round(engines["compiled"].compiled.compile_seconds, 2),
                            "eager_first_call_s": round(t.warmup_s["eager"], 3),
                            "eager_s": round(t.median("eager"), 4), "compiled_s": round(t.median("compiled"), 4),
                            "same_text": [c.text for c in t.last["eager"]] == [c.text for c in t.last["compiled"]]}
        print(B, res[f"batch{B}"], flush=True)
print(json.dumps(res))
