"""``gptlab sample``: load ``--init`` and sample ``--num-samples`` continuations of ``--prompt`` (on the engine)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from gptlab.commands import add_parser, device_arg, init_arg, json_arg, quantize_arg


def register(sub: argparse._SubParsersAction) -> None:
    p = add_parser(sub, "sample", run, help="generate text from a model",
                   description="Sample text with a KV cache. Temperature 0 is greedy decoding. A sample ends at "
                               "the end-of-text token (as transformers' generate does) unless --ignore-eot.")
    init_arg(p)
    p.add_argument("--prompt", default="\n", help="prompt text, or FILE:path to read it from a file")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=1337, help="sample i uses seed + i")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end a sample before this text (repeatable)")
    p.add_argument("--ignore-eot", action="store_true", help="keep going past the end-of-text token")
    p.add_argument("--chat", action="store_true",
                   help="a chat model: --prompt is one user message, rendered with the chat template; samples "
                        "are the assistant's replies, ending at the end of the turn")
    p.add_argument("--no-kv-cache", action="store_true", help="recompute the whole context every step")
    p.add_argument("--stream", action="store_true", help="print text as it is produced (one sample at a time)")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto")
    quantize_arg(p)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the one-token decode step over a static-shape KV cache "
                        "(captured as a CUDA graph on GPU)")
    device_arg(p)
    json_arg(p)


def run(args: argparse.Namespace) -> int:
    import torch

    from gptlab.engine import Engine, SamplingParams
    from gptlab.errors import GptlabError
    from gptlab.generate import encode_prompt, read_prompt

    for name, ok in (("num_samples", args.num_samples >= 1), ("max_new_tokens", args.max_new_tokens >= 0),
                     ("temperature", args.temperature >= 0),
                     ("top_k", args.top_k is None or args.top_k >= 1),
                     ("top_p", args.top_p is None or 0.0 < args.top_p <= 1.0)):
        if not ok:
            raise GptlabError(f"--{name.replace('_', '-')} {getattr(args, name)}: out of range "
                              "(num-samples >= 1, max-new-tokens >= 0, temperature >= 0, top-k >= 1, 0 < top-p <= 1)")
    if any(not s for s in args.stop):
        raise GptlabError("--stop: give a non-empty text")
    text = read_prompt(args.prompt)
    t0 = time.perf_counter()
    engine = Engine.load(args.init, device=args.device, dtype=args.dtype, compile=args.compile,
                         quantize=args.quantize, max_batch=1 if args.stream else args.num_samples,
                         max_queue=args.num_samples, use_kv_cache=not args.no_kv_cache)
    if engine.tokenizer is None:
        raise GptlabError(f"--init {args.init}: no tokenizer found with the model; sampling needs one "
                          "(export it from gptlab, or use a GPT-2-vocabulary model)")
    load_s = time.perf_counter() - t0
    W = engine.max_seq_len
    max_new = args.max_new_tokens
    stop = list(args.stop)
    if args.chat:
        from gptlab.chat import ChatTemplate, fit_history

        tmpl = ChatTemplate.for_tokenizer(engine.tokenizer)
        max_new = min(max_new, W - 1)
        prompt_ids, _ = fit_history(tmpl, [{"role": "user", "content": text}], W - max_new)
        stop += tmpl.stop_texts
    else:
        prompt_ids = encode_prompt(engine.tokenizer, text)
    if len(prompt_ids) + max_new > W:
        keep = min(len(prompt_ids), max(W - max_new, W // 2))
        print(f"gptlab sample: warning: prompt ({len(prompt_ids)} tokens) + --max-new-tokens {max_new} exceed the context window "
              f"({W}); the model sees the prompt's last {keep} tokens and stops at the window", file=sys.stderr)
        prompt_ids = prompt_ids[-keep:]
        max_new = min(max_new, W - keep)
    params = [SamplingParams(max_tokens=max_new, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                             seed=args.seed + i, stop=stop, ignore_eot=args.ignore_eot)
              for i in range(args.num_samples)]
    shown = "" if args.chat else text  # a chat sample is the reply alone
    out_stream = sys.stderr if args.json else sys.stdout
    completions = []
    t1 = time.perf_counter()
    if args.stream:
        for n, p in enumerate(params):
            if n:
                print("---------------", file=out_stream, flush=True)
            print(shown, end="", file=out_stream, flush=True)
            req = engine.submit(prompt_ids, p)
            for ev in engine.stream(req):
                if ev.text:
                    print(ev.text, end="", file=out_stream, flush=True)
            print(file=out_stream, flush=True)
            completions.append(req.result())
    else:
        reqs = [engine.submit(prompt_ids, p) for p in params]
        while not all(r.done for r in reqs):
            engine.step()
        completions = [r.result() for r in reqs]
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    gen_s = time.perf_counter() - t1
    new_tokens = sum(len(c.token_ids) for c in completions)
    samples = [shown + c.text for c in completions]
    tps = new_tokens / gen_s if gen_s > 0 else float("nan")
    if args.json:
        print(json.dumps({"samples": samples, "completions": [c.text for c in completions], "prompt": text,
                          "prompt_tokens": len(prompt_ids), "new_tokens": new_tokens,
                          "finish_reasons": [c.finish_reason for c in completions], "seconds": round(gen_s, 4),
                          "load_seconds": round(load_s, 4), "tokens_per_s": tps, "device": str(engine.device),
                          "dtype": str(engine.dtype).removeprefix("torch."), "quantize": args.quantize,
                          "kv_cache": not args.no_kv_cache, "compile": engine.compiled is not None,
                          "compile_seconds": None if engine.compiled is None else round(engine.compiled.compile_seconds, 4),
                          "seed": args.seed, "init": str(args.init)}))
    elif not args.stream:
        for n, s in enumerate(samples):
            if n:
                print("---------------")
            print(s)
    how = "kv cache" if not args.no_kv_cache else "no kv cache"
    if engine.compiled is not None:
        how += f", compiled step (of which compiling {engine.compiled.compile_seconds:.2f}s)"
    print(f"{new_tokens} tokens in {gen_s:.2f}s ({tps:.1f} tokens/s, {engine.device}, {how})", file=sys.stderr)
    return 0
