"""``gptlab serve``: an OpenAI-compatible HTTP server (and a web playground at ``/``) for any model source."""

from __future__ import annotations

import argparse
import os
import sys

from gptlab.commands import add_parser, device_arg, init_arg, quantize_arg


def register(sub: argparse._SubParsersAction) -> None:
    p = add_parser(sub, "serve", run, help="serve a model over HTTP (OpenAI-compatible API + web playground)",
                   description="Serve --init over HTTP: /v1/completions, /v1/chat/completions, /v1/models, "
                               "/health, /metrics (Prometheus) and a playground page at /. "
                               "Needs the serve extra: pip install 'gptlab[serve]'.")
    init_arg(p)
    p.add_argument("--name", default=None, help="model id in the API (/v1/models, 'model' fields; default: --init)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind; 0.0.0.0 exposes the server to the network (set an API key then)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (0: pick a free one, printed on stderr)")
    key = p.add_mutually_exclusive_group()
    key.add_argument("--api-key", default=None,
                     help="require 'Authorization: Bearer KEY' on every endpoint but /health and / "
                          "(default: $GPTLAB_API_KEY if set; visible in the process list, prefer --api-key-file)")
    key.add_argument("--api-key-file", default=None, help="read the API key from this file's first line")
    p.add_argument("--max-batch", type=int, default=16, help="rows decoded together (continuous batching)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="rows allowed to wait for a batch slot; beyond it requests get 429 + Retry-After")
    p.add_argument("--max-prefill-tokens", type=int, default=None, metavar="N",
                   help="padded prompt tokens prefilled in one forward when requests arrive together "
                        "(default: 128 on CPU, where prefill is compute-bound, 4096 on GPUs)")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    quantize_arg(p)
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds running requests may take to finish after SIGTERM/SIGINT")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (info logs every request)")
    device_arg(p)


def _api_key(args: argparse.Namespace) -> str | None:
    from gptlab.errors import GptlabError

    if args.api_key_file:
        try:
            with open(args.api_key_file, encoding="utf-8") as f:
                key = f.readline().strip()
        except OSError as e:
            raise GptlabError(f"--api-key-file {args.api_key_file}: cannot read ({e.strerror})") from None
        if not key:
            raise GptlabError(f"--api-key-file {args.api_key_file}: the first line is empty; write the key there")
        return key
    key = args.api_key if args.api_key is not None else os.environ.get("GPTLAB_API_KEY")
    if key is not None and not key.strip():
        raise GptlabError("--api-key is empty; give a non-empty key (or none to serve without one)")
    return key.strip() if key else None


def run(args: argparse.Namespace) -> int:
    from gptlab.errors import GptlabError

    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise GptlabError(f"gptlab serve needs the serve extra ({e.name} is missing): "
                          "pip install 'gptlab[serve]'") from None
    prefill = 1 if args.max_prefill_tokens is None else args.max_prefill_tokens  # None: the engine's default
    for name, value, low in (("port", args.port, 0), ("max-batch", args.max_batch, 1),
                             ("max-queue", args.max_queue, 1), ("max-prefill-tokens", prefill, 1)):
        if value < low or (name == "port" and value > 65535):
            raise GptlabError(f"--{name} {value}: must be >= {low}" + (" and <= 65535" if name == "port" else ""))
    if args.shutdown_timeout < 0:
        raise GptlabError(f"--shutdown-timeout {args.shutdown_timeout}: must be >= 0")
    key = _api_key(args)
    if key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"gptlab serve: warning: listening on {args.host} without an API key: anyone who can reach this "
              "port can use the model (set --api-key-file)", file=sys.stderr)

    def load():
        from gptlab.engine import Engine

        engine = Engine.load(args.init, device=args.device, dtype=args.dtype, compile=args.compile,
                             quantize=args.quantize, max_batch=args.max_batch, max_queue=args.max_queue,
                             max_prefill_tokens=args.max_prefill_tokens)
        if args.name:
            engine.name = args.name
        return engine

    from gptlab.server import serve

    return serve(load, host=args.host, port=args.port, api_key=key, max_queue=args.max_queue,
                 shutdown_timeout_s=args.shutdown_timeout, log_level=args.log_level,
                 describe=f", loading {args.init}")
