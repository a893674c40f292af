"""Requests that run the model are bounded: a time limit (504), a bounded wait for the busy model (503 with
Retry-After), cancellation when the client leaves, and a prompt stop on SIGTERM/SIGINT.

The steering generation honours ``run_steering(..., cancel=event)`` (raising ``SteeringCancelled`` at its next token).
Most tests here stand a scripted generation in for ``run_steering`` that keeps that contract (or ignores it), so they
test the server's side; ``test_real_generation_stops_at_the_limit`` uses the real one and skips until it has the
``cancel`` parameter.
"""

from __future__ import annotations

import json
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest



class FakeGeneration:
    """Stands in for run_steering: runs ``seconds`` unless its cancel event is set (when ``honour``)."""

    def __init__(self, honour: bool = True, seconds: float = 60.0):
        from saeforge.interventions import generate

        self.generate, self.honour, self.seconds = generate, honour, seconds
        self.started, self.finished = threading.Event(), threading.Event()
        self.stopped_after: float | None = None

    def __call__(self, steerer, prompts, edits, *, cancel=None, **kw):
        from saeforge.interventions.generate import SteeringRun

        self.started.set()
        t0 = time.monotonic()
        try:
            while time.monotonic() - t0 < self.seconds:
                if self.honour and cancel is not None and cancel.wait(0.02):
                    self.stopped_after = time.monotonic() - t0
                    raise self.generate.SteeringCancelled()
                time.sleep(0.02)
            n = len(prompts)
            return SteeringRun(list(prompts), [""] * n, [""] * n, {"edits": [], "perplexity_baseline": [1.0] * n,
                                                                 "perplexity_steered": [1.0] * n, "kl_prompt": 0.0})
        finally:
            self.finished.set()


@pytest.fixture
def fake(monkeypatch):
    from saeforge.interventions import generate

    gen = FakeGeneration()
    monkeypatch.setattr(generate, "run_steering", gen)
    return gen


def _app(web_run, **kw):
    from saeforge.web.app import create_app
    from saeforge.web.model import ModelRequest

    app = create_app(web_run[0], **kw)
    host = app.state.data.model
    with host.hold(ModelRequest("warm-up")):
        host.steerer()  # loaded now, so that the limits below measure the request, not the loading
    return app


STEER = {"prompts": ["To be, or not to be"], "edits": [{"feature": 1, "strength": 2, "unit": "raw"}],
         "max_new_tokens": 8}


def _post(url, path, body, timeout=60):
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, err.headers, json.loads(err.read())


def test_a_request_past_the_limit_is_stopped_with_a_504(web_run, fake, tiny_llama):
    from fastapi.testclient import TestClient

    app = _app(web_run, request_timeout=1.0)
    with TestClient(app) as client:
        t0 = time.monotonic()
        r = client.post("/api/steer", json=STEER)
        took = time.monotonic() - t0
    assert r.status_code == 504 and "ran past the server's limit of 1 s" in r.json()["error"]
    assert "--request-timeout" in r.json()["fix"]
    assert fake.stopped_after is not None and 0.9 < took < 5
    assert app.state.data.model.idle(timeout=0)  # the model is free again


def test_a_request_for_a_busy_model_gets_503_with_retry_after(web_run, fake, tiny_llama):
    from saeforge.web.serve import BackgroundServer

    app = _app(web_run, request_timeout=30.0, queue_timeout=0.3)
    srv = BackgroundServer(app).start()
    first: queue.Queue = queue.Queue()
    try:
        threading.Thread(target=lambda: first.put(_post(srv.url, "/api/steer", STEER)), daemon=True).start()
        assert fake.started.wait(30)
        t0 = time.monotonic()
        status, headers, body = _post(srv.url, "/api/inspect", {"text": "to be"})
        assert status == 503 and time.monotonic() - t0 < 5
        assert "busy with another request" in body["error"] and 1 <= int(headers["Retry-After"]) <= 30
        status, headers, body = _post(srv.url, "/api/steer", STEER)
        assert status == 503 and headers["Retry-After"]
        t0 = time.monotonic()
    finally:
        srv.stop()  # as on SIGTERM: the running generation is told to stop
    assert fake.finished.wait(5) and time.monotonic() - t0 < 8
    status, _, body = first.get(timeout=10)
    assert status == 503 and body["error"] == "the server is stopping"


def test_a_client_that_leaves_stops_its_generation(web_run, fake, tiny_llama):
    from saeforge.web.serve import BackgroundServer

    app = _app(web_run, request_timeout=60.0)
    with BackgroundServer(app) as srv:
        host, port = srv.sock.getsockname()[:2]
        body = json.dumps(STEER).encode()
        with socket.create_connection((host, port), timeout=10) as s:
            s.sendall(b"POST /api/steer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            assert fake.started.wait(30)
        t0 = time.monotonic()  # the client has gone
        assert fake.finished.wait(5) and fake.stopped_after is not None and time.monotonic() - t0 < 3
        assert app.state.data.model.idle(timeout=5)
        status, _, _ = _post(srv.url, "/api/inspect", {"text": "to be"})  # and the model serves the next one
        assert status == 200


SERVE_WITH_FAKE = """
import pathlib, sys, time
from saeforge.interventions import generate
marks = pathlib.Path(sys.argv[2])
honour = sys.argv[3] == "honour"
def fake(steerer, prompts, edits, *, cancel=None, **kw):
    (marks / "started").touch()
    t0 = time.monotonic()
    while time.monotonic() - t0 < 900:  # the 15-minute request
        if honour and cancel is not None and cancel.wait(0.05):
            (marks / "cancelled").touch()
            raise generate.SteeringCancelled()
        time.sleep(0.05)
generate.run_steering = fake
from saeforge.web import ServeConfig, run_serve
run_serve(ServeConfig(path=sys.argv[1], port=0))
"""


@pytest.mark.parametrize("sig, honour", [(signal.SIGTERM, "honour"), (signal.SIGINT, "ignore")])
def test_a_signal_stops_the_server_during_a_long_request(web_run, tmp_path, sig, honour):
    """SIGTERM with a generation that stops when told; Ctrl-C with one that never does (the server still exits)."""
    proc = subprocess.Popen([sys.executable, "-c", SERVE_WITH_FAKE, str(web_run[0]), str(tmp_path), honour],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()
        url = re.search(r"at (http://127\.0\.0\.1:\d+)", line).group(1)
        def request():
            try:
                _post(url, "/api/steer", STEER, timeout=120)
            except (OSError, ValueError):  # the server stopped under it: that is the point
                pass

        threading.Thread(target=request, daemon=True).start()
        deadline = time.monotonic() + 60
        while not (tmp_path / "started").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.05)
        t0 = time.monotonic()
        proc.send_signal(sig)
        proc.wait(timeout=15)
        assert time.monotonic() - t0 < 10
        assert (tmp_path / "cancelled").exists() == (honour == "honour")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_real_generation_stops_at_the_limit(web_run, tiny_llama, monkeypatch):
    from saeforge.interventions import generate

    from fastapi.testclient import TestClient

    app = _app(web_run, request_timeout=0.5)
    model = app.state.data.model.steerer().lm.model
    forward = model.forward

    def slow_forward(*a, **k):  # 20 ms a step: 64 new tokens would take well over a second
        time.sleep(0.02)
        return forward(*a, **k)

    monkeypatch.setattr(model, "forward", slow_forward)
    with TestClient(app) as client:
        t0 = time.monotonic()
        r = client.post("/api/steer", json={**STEER, "max_new_tokens": 64, "prompts": ["To be"] * 4})
        took = time.monotonic() - t0
    assert r.status_code == 504 and took < 1.2  # stopped at a token after the limit, not at the end
    monkeypatch.undo()
    with TestClient(app) as client:
        assert client.post("/api/steer", json=STEER).status_code == 200
