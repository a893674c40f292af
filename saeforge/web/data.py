"""What the dashboard shows, as plain dicts; :class:`RunData` is the run as the dashboard sees it.

Nothing here knows about HTTP: :mod:`saeforge.web.app` turns these dicts into JSON responses and HTML pages. The
concerns live in their own modules and :class:`RunData` delegates to them:

- :mod:`~saeforge.web.overview`: the run, its evaluation metrics and plots;
- :mod:`~saeforge.web.features`: the feature list and the feature pages;
- :mod:`~saeforge.web.inspector`: the prompt inspector;
- :mod:`~saeforge.web.steering`: the steering playground;
- :mod:`~saeforge.web.model`: the one language model the last two share, with its time bounds and cancellation.

Every store read goes through :class:`~saeforge.features.store.FeatureStore` (one read-only connection per server
thread); everything else comes from the files a run already has (``run.json``, ``eval.json``, ``saes/<name>/plots``).
"""

from __future__ import annotations

import threading
from pathlib import Path

from saeforge.errors import SaeforgeError
from saeforge.features.store import STORE_FILE, FeatureStore
from saeforge.web import features as _features
from saeforge.web import inspector as _inspector
from saeforge.web import overview as _overview
from saeforge.web import steering as _steering
from saeforge.web.errors import WebError  # noqa: F401  (importable from here, as before)
from saeforge.web.model import ModelHost, ModelRequest

__all__ = ["RunData", "WebError", "check_store_schema"]


def check_store_schema(path: Path) -> None:
    """Refuse (or migrate) a store written by another schema version before the dashboard reads it."""
    FeatureStore.ensure_current(path)


class RunData:
    """A run directory as the dashboard sees it. Thread-safe: each thread gets its own read-only store connection;
    the model behind the inspector and the playground is :attr:`model` (one request at a time, bounded)."""

    def __init__(self, run_dir: str | Path, *, model: str = "", device: str = "auto", max_prompt_chars: int = 20_000,
                 request_timeout: float = 120.0, queue_timeout: float = 10.0):
        from saeforge.runs import find_saes

        self.path = Path(run_dir).resolve()
        if not self.path.is_dir():
            raise SaeforgeError(f"{run_dir} is not a directory", "pass a run directory: saeforge serve RUN_DIR")
        try:
            self.sae_folders = find_saes(self.path)
        except SaeforgeError:
            self.sae_folders = {}
        self.store_path = self.path / STORE_FILE
        if self.store_path.is_file():
            check_store_schema(self.store_path)
        elif not self.sae_folders and not (self.path / "eval.json").is_file():
            raise SaeforgeError(f"{run_dir} holds no run: no saes/, eval.json or {STORE_FILE}",
                                "pass a run directory from `saeforge train` (then eval and harvest it)")
        self.max_prompt_chars = max_prompt_chars
        self.model = ModelHost(self.path, model=model, device=device, request_timeout=request_timeout,
                               queue_timeout=queue_timeout)
        self._stores: dict[int, FeatureStore] = {}  # thread id -> its connection
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------------------- store
    @property
    def has_store(self) -> bool:
        return self.store_path.is_file()

    def store(self) -> FeatureStore:
        """This thread's read-only connection to the store (opened on first use). A re-harvest copies the new store
        into the same file (SQLite's backup API), so an open connection sees it at its next read."""
        key = threading.get_ident()
        store = self._stores.get(key)
        if store is None:
            if not self.has_store:
                raise WebError(404, f"this run has no feature store ({STORE_FILE})",
                               f"run `saeforge harvest {self.path}` to fill it")
            store = FeatureStore(self.store_path, readonly=True)
            with self._lock:
                self._stores[key] = store
        return store

    def close(self) -> None:
        """Close every thread's connection (the server is stopping); a later request opens a new one."""
        with self._lock:
            stores, self._stores = list(self._stores.values()), {}
        for s in stores:
            s.close()

    def shutdown(self) -> None:
        """The server was asked to stop: refuse new model requests and stop the running one at its next step."""
        self.model.shutdown()

    def sae_info(self, sae: str) -> dict:
        saes = self.store().saes()
        for s in saes:
            if s["name"] == sae:
                return s
        raise WebError(404, f"no SAE named {sae!r} in this run",
                       f"the feature store holds: {', '.join(s['name'] for s in saes)}")

    def default_sae(self) -> str | None:
        if self.has_store:
            saes = self.store().saes()
            if saes:
                return saes[0]["name"]
        return next(iter(self.sae_folders), None)

    # ------------------------------------------------------------------------------------------------- concerns
    def plots(self, sae: str) -> list[str]:
        return _overview.plots(self, sae)

    def plot_file(self, sae: str, name: str) -> Path:
        return _overview.plot_file(self, sae, name)

    def overview(self) -> dict:
        return _overview.overview(self)

    def feature_list(self, sae: str, **kw) -> dict:
        return _features.feature_list(self, sae, **kw)

    def feature(self, sae: str, idx: int) -> dict:
        return _features.feature(self, sae, idx)

    @property
    def inspector_loaded(self) -> bool:
        return self.model.loaded

    def max_prompt_tokens(self) -> int:
        return _inspector.max_prompt_tokens(self)

    def inspect(self, text: str, top: int = 5, request: ModelRequest | None = None) -> dict:
        return _inspector.inspect(self, text, top, request)

    def feature_across(self, text: str, sae: str, feature: int, request: ModelRequest | None = None) -> dict:
        return _inspector.feature_across(self, text, sae, feature, request)

    def steer_saes(self) -> list[dict]:
        return _steering.steer_saes(self)

    def steer(self, prompts: list[str], edits: list[dict], **kw) -> dict:
        return _steering.steer(self, prompts, edits, **kw)
