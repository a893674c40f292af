"""The one language model behind the prompt inspector and the steering playground.

It is loaded on the first request that needs it and then used by one request at a time (steering hooks the model, so
nothing else may run through it meanwhile). Every use is bounded:

- a request waits at most ``queue_timeout`` seconds for the model, then gets a 503 with ``Retry-After`` (when the
  request holding the model must end at the latest);
- a request holds it for at most ``request_timeout`` seconds: then its cancel event is set, and a steering generation
  stops at its next token (:func:`saeforge.interventions.generate.run_steering`'s ``cancel``), giving a 504;
- the server's web layer sets the event too when the client disconnects, and :meth:`ModelHost.shutdown` sets every
  request's event when the server is asked to stop (SIGTERM, Ctrl-C).

A forward pass (the inspector) cannot be interrupted half-way; its prompt length is bounded instead.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from pathlib import Path
from typing import Iterator

from saeforge.errors import SaeforgeError
from saeforge.web.errors import WebError


class ModelRequest:
    """One request's claim on the model: its cancel event, its deadline once it holds the model, and why it was
    cancelled (``timeout``, ``disconnected`` or ``stopping``)."""

    def __init__(self, what: str):
        self.what = what
        self.cancel = threading.Event()
        self.deadline: float | None = None
        self.reason: str | None = None

    def stop(self, reason: str) -> None:
        if not self.cancel.is_set():
            self.reason = reason
            self.cancel.set()


class ModelHost:
    def __init__(self, path: Path, *, model: str = "", device: str = "auto", request_timeout: float = 120.0,
                 queue_timeout: float = 10.0):
        self.path, self.model, self.device = path, model, device
        self.request_timeout, self.queue_timeout = float(request_timeout), float(queue_timeout)
        self._inspector = None
        self._steerer = None
        self._lock = threading.Lock()
        self._current: ModelRequest | None = None
        self._requests: set[ModelRequest] = set()
        self._requests_lock = threading.Lock()
        self.stopping = threading.Event()

    @property
    def loaded(self) -> bool:
        return self._inspector is not None or self._steerer is not None  # either way the model is in memory

    # ---------------------------------------------------------------------------------------------- holding it
    def _retry_after(self) -> int:
        current = self._current
        if current is None or current.deadline is None:
            return max(1, math.ceil(self.queue_timeout))
        return max(1, math.ceil(current.deadline - time.monotonic()))

    @contextlib.contextmanager
    def hold(self, request: ModelRequest) -> Iterator[ModelRequest]:
        """Use the model for ``request`` (see the module docstring for the bounds); raises a 503 :class:`WebError`
        when it stays busy or the server is stopping."""
        if self.stopping.is_set():
            raise WebError(503, "the server is stopping", "start it again", {"Retry-After": "30"})
        with self._requests_lock:
            self._requests.add(request)
        try:
            if not self._lock.acquire(timeout=self.queue_timeout):
                wait = self._retry_after()
                raise WebError(503, f"the model is busy with another request (it waited {self.queue_timeout:g} s)",
                               f"try again in {wait} s; one inspection or steering request runs at a time",
                               {"Retry-After": str(wait)})
            timer = threading.Timer(self.request_timeout, request.stop, ("timeout",))
            timer.daemon = True
            try:
                request.deadline = time.monotonic() + self.request_timeout
                self._current = request
                if self.stopping.is_set():
                    request.stop("stopping")
                if request.cancel.is_set():  # its client left, or the server stopped, while it waited
                    raise self.cancelled(request)
                timer.start()
                yield request
            finally:
                timer.cancel()
                self._current = None
                self._lock.release()
        finally:
            with self._requests_lock:
                self._requests.discard(request)

    def cancelled(self, request: ModelRequest) -> WebError:
        """The error for a request whose cancel event stopped its work."""
        if request.reason == "timeout":
            return WebError(504, f"the {request.what} request ran past the server's limit of "
                                 f"{self.request_timeout:g} s and was stopped",
                            "ask for less (fewer prompts, shorter prompts, fewer new tokens), or start the server "
                            "with a longer --request-timeout")
        if request.reason == "stopping":
            return WebError(503, "the server is stopping", "start it again", {"Retry-After": "30"})
        return WebError(499, f"the {request.what} request was stopped: the client went away")

    def shutdown(self) -> None:
        """Refuse new requests and stop the running one at its next step."""
        self.stopping.set()
        with self._requests_lock:
            requests = list(self._requests)
        for r in requests:
            r.stop("stopping")

    # ---------------------------------------------------------------------------------------------- loading it
    def inspector(self):
        """The inspector (loaded now if need be, on the steerer's model when that is loaded). Hold the model."""
        if self._inspector is None:
            from saeforge.features.inspect import Inspector

            lm = self._steerer.lm if self._steerer is not None else None
            try:
                self._inspector = Inspector(self.path, model=self.model, device=self.device, lm=lm)
            except SaeforgeError as err:
                raise WebError(503, f"the prompt inspector could not load the model: {err.problem}",
                               err.fix) from err
        return self._inspector

    def steerer(self):
        """The steerer (loaded now if need be, on the inspector's model when that is loaded). Hold the model."""
        if self._steerer is None:
            from saeforge.interventions.steering import Steerer

            lm = self._inspector.lm if self._inspector is not None else None
            try:
                self._steerer = Steerer.from_run(self.path, lm=lm, model=self.model, device=self.device)
            except SaeforgeError as err:
                raise WebError(503, f"the steering playground could not load the model: {err.problem}",
                               err.fix) from err
        return self._steerer

    def idle(self, timeout: float) -> bool:
        """Whether no request holds the model (waiting up to ``timeout`` s for the one that does to finish)."""
        if not self._lock.acquire(timeout=timeout):
            return False
        self._lock.release()
        return True
