"""Running the app under uvicorn, with a graceful SIGTERM."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

import uvicorn

from jaxllm.engine.async_engine import AsyncLLMEngine
from jaxllm.serve.app import ServeConfig, build_app

__all__ = ["GracefulServer", "make_server", "serve"]


class GracefulServer(uvicorn.Server):
    """uvicorn's server, except that SIGTERM / SIGINT end the process with status 0:
    stop accepting, let running requests finish until ``timeout_graceful_shutdown``, then
    cancel the rest (which aborts them in the engine).  uvicorn itself re-raises the
    signal after shutting down, so a clean stop would exit with -15."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        sigs = (signal.SIGINT, signal.SIGTERM)
        original = {s: signal.signal(s, self.handle_exit) for s in sigs}
        try:
            yield
        finally:
            for s, h in original.items():
                signal.signal(s, h)


def make_server(llm, config: ServeConfig, *, host: str = "127.0.0.1", port: int = 8000,
                shutdown_timeout: float = 30.0, log_level: str = "info") -> GracefulServer:
    """A server for ``llm`` (a :class:`jaxllm.LLM`): ``.run()`` blocks until SIGTERM /
    SIGINT or ``.should_exit = True``."""
    if not hasattr(llm.engine, "scheduler"):
        raise ValueError("jaxllm serve runs one engine replica (dp=1); data-parallel "
                         "serving is not supported")
    engine = AsyncLLMEngine(llm.engine)
    app = build_app(engine, config, model_path=str(llm.model_path))
    cfg = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                         timeout_graceful_shutdown=shutdown_timeout, timeout_keep_alive=5,
                         lifespan="on")
    return GracefulServer(cfg)


def serve(llm, config: ServeConfig, *, host: str = "127.0.0.1", port: int = 8000,
          shutdown_timeout: float = 30.0, log_level: str = "info") -> int:
    """Serve ``llm`` until SIGTERM / SIGINT; returns the exit status (0)."""
    server = make_server(llm, config, host=host, port=port, shutdown_timeout=shutdown_timeout,
                         log_level=log_level)
    server.run()
    return 0
