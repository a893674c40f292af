"""The web dashboard (``saeforge serve RUN_DIR``). Importing this package needs no web framework; serving does
(the ``web`` extra: FastAPI and uvicorn)."""

from saeforge.web.serve import ServeConfig, run_serve

__all__ = ["ServeConfig", "run_serve"]
