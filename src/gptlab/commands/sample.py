"""``gptlab sample``: load ``--init`` and sample ``--num-samples`` continuations of ``--prompt``."""

from __future__ import annotations

import argparse
import json
import sys
import time

from gptlab.commands import SRC_HELP, add_parser, device_arg, json_arg


def register(sub: argparse._SubParsersAction) -> None:
    p = add_parser(sub, "sample", run, help="generate text from a model",
                   description="Sample text with a KV cache. Temperature 0 is greedy decoding.")
    p.add_argument("--init", required=True, help=SRC_HELP)
    p.add_argument("--prompt", default="\n", help="prompt text, or FILE:path to read it from a file")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--no-kv-cache", action="store_true", help="recompute the whole context every step")
    p.add_argument("--stream", action="store_true", help="print text as it is produced (one sample at a time)")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the one-token decode step over a static-shape KV cache "
                        "(captured as a CUDA graph on GPU)")
    device_arg(p)
    json_arg(p)


def run(args: argparse.Namespace) -> int:
    import torch

    from gptlab.errors import GptlabError
    from gptlab.generate import (CompiledDecoder, TextStreamer, encode_prompt, generate, read_prompt,
                                 stream_generate)
    from gptlab.loading import load_model
    from gptlab.runtime import resolve_device, resolve_dtype

    for name, ok in (("num_samples", args.num_samples >= 1), ("max_new_tokens", args.max_new_tokens >= 0),
                     ("temperature", args.temperature >= 0),
                     ("top_k", args.top_k is None or args.top_k >= 1),
                     ("top_p", args.top_p is None or 0.0 < args.top_p <= 1.0)):
        if not ok:
            raise GptlabError(f"--{name.replace('_', '-')} {getattr(args, name)}: out of range "
                              "(num-samples >= 1, max-new-tokens >= 0, temperature >= 0, top-k >= 1, 0 < top-p <= 1)")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.init, device=device, dtype=dtype)
    if tokenizer is None:
        raise GptlabError(f"--init {args.init}: no tokenizer found with the model; sampling needs one "
                          "(export it from gptlab, or use a GPT-2-vocabulary model)")
    load_s = time.perf_counter() - t0
    text = read_prompt(args.prompt)
    prompt_ids = encode_prompt(tokenizer, text)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    decode_fn = CompiledDecoder(model) if args.compile and not args.no_kv_cache else None
    kw = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, generator=gen,
              use_kv_cache=not args.no_kv_cache, stop_id=None, decode_fn=decode_fn,
              static_cache=decode_fn is not None)
    out_stream = sys.stderr if args.json else sys.stdout
    completions: list[str] = []
    new_tokens = 0
    t1 = time.perf_counter()
    if args.stream:
        for n in range(args.num_samples):
            if n:
                print("---------------", file=out_stream, flush=True)
            idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)
            streamer = TextStreamer(tokenizer)
            print(text, end="", file=out_stream, flush=True)
            ids = []
            for tok in stream_generate(model, idx, args.max_new_tokens, **kw):
                ids.append(int(tok[0]))
                piece = streamer.push(ids[-1])
                if piece:
                    print(piece, end="", file=out_stream, flush=True)
            print(streamer.flush(), file=out_stream, flush=True)
            new_tokens += len(ids)
            completions.append(tokenizer.decode(ids))
    else:
        idx = torch.tensor([prompt_ids] * args.num_samples, dtype=torch.long, device=device)
        out = generate(model, idx, args.max_new_tokens, **kw)
        for row in out.tolist():
            completions.append(tokenizer.decode(row[len(prompt_ids):]))
            new_tokens += len(row) - len(prompt_ids)
    if device.type == "cuda":
        torch.cuda.synchronize()
    gen_s = time.perf_counter() - t1
    samples = [text + c for c in completions]
    tps = new_tokens / gen_s if gen_s > 0 else float("nan")
    if args.json:
        print(json.dumps({"samples": samples, "completions": completions, "prompt": text,
                          "prompt_tokens": len(prompt_ids), "new_tokens": new_tokens, "seconds": round(gen_s, 4),
                          "load_seconds": round(load_s, 4), "tokens_per_s": tps, "device": str(device),
                          "dtype": str(dtype).removeprefix("torch."), "kv_cache": not args.no_kv_cache,
                          "seed": args.seed, "init": str(args.init)}))
    elif not args.stream:
        for n, s in enumerate(samples):
            if n:
                print("---------------")
            print(s)
    print(f"{new_tokens} tokens in {gen_s:.2f}s ({tps:.1f} tokens/s, {device}, "
          f"{'kv cache' if not args.no_kv_cache else 'no kv cache'})", file=sys.stderr)
    return 0
