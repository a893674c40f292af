"""``saeforge serve RUN_DIR``: the web dashboard of a run (needs the ``web`` extra: ``pip install 'saeforge[web]'``)."""

from __future__ import annotations

import gc
import os
import socket
import threading
import time
from dataclasses import dataclass

from simple_parsing.helpers import field

from saeforge.errors import SaeforgeError
from saeforge.options import DeviceOptions, RunModelOptions, flat_options


@flat_options
@dataclass(frozen=True)
class ServeConfig:
    """Serve a run's web dashboard: overview (metrics, plots), feature search, feature pages, prompt inspector,
    steering playground."""

    path: str = field(default="", positional=True)
    """A run directory (saes/, eval.json, features.sqlite), as written by train, eval and harvest."""
    host: str = "127.0.0.1"
    """Address to listen on. The default serves this machine only; 0.0.0.0 exposes the dashboard to the network."""
    port: int = 8000
    """Port to listen on; 0 picks a free one."""
    model_options: RunModelOptions = field(default_factory=RunModelOptions)
    """The model of the prompt inspector and the steering playground (loaded on first use)."""
    device_options: DeviceOptions = field(default_factory=DeviceOptions)
    """Where the model of the inspector and the playground runs."""
    max_prompt_chars: int = 20_000
    """Longest prompt accepted, in characters (the token limit of the inspector applies as well)."""
    request_timeout: float = 120.0
    """Longest a request may use the model, in seconds: a steering request that runs longer stops and gets a 504."""
    queue_timeout: float = 10.0
    """Longest a request waits while another one uses the model, in seconds; then it gets a 503 with Retry-After."""
    log_level: str = "warning"
    """Server log level: critical, error, warning, info, debug."""


def _require_web():
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        raise SaeforgeError(f"the dashboard needs FastAPI and uvicorn ({err.name} is missing)",
                            "pip install 'saeforge[web]'") from err


# After SIGTERM/Ctrl-C, open connections get this long to finish before they are cut; a steering request in progress
# is told to stop at once (its next token), so this only bounds what cannot be interrupted (a forward pass).
GRACEFUL_SHUTDOWN_S = 3.0


def _uvicorn_server(app, log_level: str):
    """A uvicorn server for ``app`` that, when asked to stop (a signal, or ``should_exit``), also stops the model
    request in progress instead of waiting for it."""
    import uvicorn

    class DashboardServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            app.state.data.shutdown()
            super().handle_exit(sig, frame)

    return DashboardServer(uvicorn.Config(app, log_level=log_level, lifespan="on",
                                          timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S))


MAX_PORT = 65535


def check_config(cfg: ServeConfig) -> None:
    if not cfg.path:
        raise SaeforgeError("no run directory given", "saeforge serve RUN_DIR")
    if not cfg.request_timeout > 0:
        raise SaeforgeError(f"--request-timeout {cfg.request_timeout} must be positive",
                            f"saeforge serve {cfg.path} --request-timeout 120")
    if not cfg.queue_timeout >= 0:
        raise SaeforgeError(f"--queue-timeout {cfg.queue_timeout} is negative",
                            f"saeforge serve {cfg.path} --queue-timeout 10")
    if cfg.max_prompt_chars < 1:
        raise SaeforgeError(f"--max-prompt-chars {cfg.max_prompt_chars} must be at least 1",
                            f"saeforge serve {cfg.path} --max-prompt-chars 20000")
    if not 0 <= cfg.port <= MAX_PORT:
        raise SaeforgeError(f"--port {cfg.port} is not a TCP port (0 to {MAX_PORT})",
                            f"saeforge serve {cfg.path} --port 8000 (or --port 0: any free port)")


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (so that port 0 gives a known free port before the server starts)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP (not 0): asyncio then sets TCP_NODELAY on every connection, so a response written in two
    # parts (headers, body) is not held back by Nagle's algorithm for the client's delayed ACK (~40 ms a request)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except (OSError, OverflowError) as err:  # OverflowError: a port outside 0..65535
        sock.close()
        raise SaeforgeError(f"cannot listen on {host}:{port}: {getattr(err, 'strerror', None) or err}",
                            "pick another --port (0 picks a free one)") from err
    sock.listen(128)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


class BackgroundServer:
    """A uvicorn server for ``app`` on a thread (tests, benchmarks, screenshots). ``with`` starts and stops it."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.app = app
        self.sock = bind(host, port)
        self.url = url_of(self.sock)
        self.server = _uvicorn_server(app, log_level)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self, timeout: float = 20.0) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the dashboard server did not start within {timeout:.0f} s")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.app.state.data.shutdown()
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def run_serve(cfg: ServeConfig) -> None:
    check_config(cfg)
    _require_web()
    from saeforge.web.app import create_app

    app = create_app(cfg.path, model=cfg.model, device=cfg.device, max_prompt_chars=cfg.max_prompt_chars,
                     request_timeout=cfg.request_timeout, queue_timeout=cfg.queue_timeout)
    sock = bind(cfg.host, cfg.port)
    print(f"saeforge dashboard of {app.state.data.path} at {url_of(sock)}  (Ctrl-C stops it)", flush=True)
    if cfg.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"  note: listening on {cfg.host}, so other machines can reach it; it has no authentication",
              flush=True)
    server = _uvicorn_server(app, cfg.log_level)
    # The objects loaded so far (torch, transformers, ...) live as long as the server: keep them out of the garbage
    # collector's full passes, which otherwise stall a request now and then for a few hundred milliseconds.
    gc.collect()
    gc.freeze()
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        # a model request that ignored its cancel event (a forward pass, or a generation without the cancel
        # contract) would keep the interpreter alive at exit: give it a moment, then leave without it
        if not app.state.data.model.idle(timeout=GRACEFUL_SHUTDOWN_S):
            print("a model request was still running after the stop signal; exiting without waiting for it",
                  flush=True)
            os._exit(0)
