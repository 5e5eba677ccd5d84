"""``gptlab serve``: an OpenAI-compatible HTTP server and web playground over :class:`gptlab.engine.Engine`.

Needs the ``serve`` extra (FastAPI, uvicorn, prometheus-client): ``pip install 'gptlab[serve]'``.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

from gptlab.errors import GptlabError


def serve(loader: Callable[[], Any], *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_queue: int | None = None, shutdown_timeout_s: float = 30.0, log_level: str = "warning",
          describe: str = "") -> int:
    """Listen at once (``/health`` answers 503 while ``loader()`` builds the engine), serve until SIGINT/SIGTERM.

    On SIGTERM uvicorn stops accepting connections and lets running requests finish for up to
    ``shutdown_timeout_s`` before cancelling them; the engine then stops. ``port`` 0 picks a free port
    (printed on stderr). Returns the exit code; a model that fails to load is a :class:`GptlabError`.
    """
    import uvicorn

    from gptlab.server.app import ServerState, create_app

    def say(msg: str) -> None:
        print(f"gptlab serve: {msg}", file=sys.stderr, flush=True)

    class Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if not self.should_exit and self.servers:
                h, p = self.servers[0].sockets[0].getsockname()[:2]
                say(f"listening on http://{h}:{p} (playground at /, API at /v1){describe}")

        def handle_exit(self, sig: int, frame: Any) -> None:
            if not self.should_exit:
                say(f"shutting down: running requests may finish for up to {shutdown_timeout_s:g}s")
            super().handle_exit(sig, frame)
            # A graceful stop is a normal exit (code 0): uvicorn would re-raise the signal at the end.
            self._captured_signals.clear()

    server: Server | None = None

    def failed(e: BaseException) -> None:
        if server is not None:
            server.should_exit = True

    def ready(engine: Any) -> None:
        say(f"ready: model {engine.name!r} on {getattr(engine, 'device', '?')}, "
            f"context {engine.max_seq_len} tokens")

    state = ServerState(loader=loader, api_key=api_key, max_queue=max_queue, shutdown_deadline_s=shutdown_timeout_s,
                        on_ready=ready, on_load_error=failed)
    config = uvicorn.Config(create_app(state), host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=max(1, int(round(shutdown_timeout_s))), lifespan="on")
    server = Server(config)
    try:
        server.run()
    except SystemExit:  # uvicorn exits this way when it cannot bind (its own log line says why)
        if server.started:
            raise
    if not server.started and state.load_error is None:
        raise GptlabError(f"could not listen on {host}:{port} (is the port in use? pick another with --port, "
                          "or 0 for any free one)")
    if state.load_error is not None:
        e = state.load_error
        if isinstance(e, GptlabError):
            raise e
        raise GptlabError(f"the model failed to load: {type(e).__name__}: {e}") from e
    say("stopped")
    return 0
