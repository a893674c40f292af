"""The dashboard's FastAPI application: server-rendered pages, each with the JSON endpoint it is built from.

====================================  =====================================================================
page                                  JSON
====================================  =====================================================================
``/``  run overview                   ``GET /api/run``
``/saes/{sae}/features``  list        ``GET /api/saes/{sae}/features?q=&token=&order=&offset=&limit=``
``/saes/{sae}/features/{idx}``        ``GET /api/saes/{sae}/features/{idx}``
``/inspect``  prompt inspector        ``POST /api/inspect`` with ``{"text": ..., "top": 5}``
``/steer``  steering playground       ``POST /api/steer`` with ``{"prompts": [...], "edits": [{"sae", "feature", "mode",
                                      "strength", "unit"}], "positions", "max_new_tokens", "temperature", "seed"}``
``/plots/{sae}/{file}.png``           the evaluation plots
====================================  =====================================================================

Errors are ``{"error", "fix", "status"}`` JSON under ``/api/`` (and for any client that does not ask for HTML), an
HTML page otherwise, with the same status: 404 for an unknown SAE or a feature index out of range, 413 for an
over-long prompt (or too many prompts or feature edits in one steering request), 400/422 for other bad input, 503
when the model cannot be loaded.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

from fastapi import Body, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from markupsafe import Markup, escape
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from saeforge import __version__
from saeforge.errors import SaeforgeError
from saeforge.web.data import (MAX_LIST_LIMIT, MAX_STEER_EDITS, MAX_STEER_NEW_TOKENS, MAX_STEER_PROMPTS,
                                MAX_STEER_TEMPERATURE, ORDERS, RunData, WebError)

HERE = Path(__file__).parent


class SteerEdit(BaseModel):
    """One feature edit of a steering request (``sae`` empty: the run's first SAE). ``strength`` null (what a browser
    sends for NaN) is refused with the allowed range, like NaN itself and absurd values."""

    sae: str = ""
    feature: int | None = None
    mode: str = "add"
    strength: float | None = 4.0
    unit: str = "max"


class SteerRequest(BaseModel):
    prompts: list[str]
    edits: list[SteerEdit]
    positions: str = "all"
    max_new_tokens: int = 32
    temperature: float = 0.7
    seed: int = 0


def fmt(value, digits: int = 4) -> str:
    """A number for people: integers with separators, floats to ``digits`` significant digits."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}g}"
    return str(value)


def show_token(text: str) -> str:
    """A token as shown in the page: newlines and tabs made visible (spaces stay, the CSS keeps them)."""
    return text.replace("\n", "↵").replace("\t", "⇥").replace("\r", "␍") if text else "∅"


def example_html(e: dict, max_act: float) -> Markup:
    """One example window as token spans shaded by activation / the feature's max, the peak token boxed. Built here
    rather than in the template: a feature page has ~2,000 tokens, and this is several times faster."""
    parts = []
    for i, (t, a) in enumerate(zip(e["tokens"], e["acts"])):
        cls, attrs = "t", ""
        if a > 0:
            alpha = min(a / max_act, 1.0) if max_act > 0 else 1.0
            cls = "t on"
            attrs = (f' style="background: rgba(238, 108, 0, {0.15 + 0.85 * alpha:.3f})"'
                     f' data-act="{a:.4g}" title="{a:.4g}"')
        if i == e["peak_offset"]:
            cls += " peak"
        parts.append(f'<span class="{cls}"{attrs}>{escape(show_token(t))}</span>')
    return Markup("".join(parts))


def _wants_html(request: Request) -> bool:
    return not request.url.path.startswith("/api/") and "text/html" in request.headers.get("accept", "")


def create_app(run_dir: str | Path, *, model: str = "", device: str = "auto", max_prompt_chars: int = 20_000,
               data: RunData | None = None) -> FastAPI:
    """The dashboard of one run directory (opened and checked now, so a bad run fails before serving)."""
    data = data or RunData(run_dir, model=model, device=device, max_prompt_chars=max_prompt_chars)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        data.close()  # the store connections of the server's threads

    app = FastAPI(title=f"saeforge · {data.path.name}", version=__version__, docs_url="/api/docs",
                  redoc_url=None, openapi_url="/api/openapi.json", lifespan=lifespan)
    app.state.data = data
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    templates = Jinja2Templates(directory=HERE / "templates")
    templates.env.filters["fmt"] = fmt
    templates.env.filters["tok"] = show_token
    templates.env.globals.update(run_name=data.path.name, version=__version__, default_sae=data.default_sae,
                                 example_html=example_html)

    def page(request: Request, name: str, status: int = 200, **ctx) -> HTMLResponse:
        return templates.TemplateResponse(request, name, ctx, status_code=status)

    def error_response(request: Request, err: WebError):
        if _wants_html(request):
            return page(request, "error.html", err.status, error=err)
        return JSONResponse(err.payload(), status_code=err.status)

    @app.exception_handler(WebError)
    async def _web_error(request: Request, err: WebError):
        return error_response(request, err)

    @app.exception_handler(SaeforgeError)
    async def _saeforge_error(request: Request, err: SaeforgeError):  # anything the checks above did not foresee
        return error_response(request, WebError(500, err.problem, err.fix))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        problem = "no such page" if err.status_code == 404 else str(err.detail)
        return error_response(request, WebError(err.status_code, problem, "start from the overview: /"
                                                if err.status_code == 404 else None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError):
        parts = ["{} {}: {}".format(e["loc"][0], ".".join(str(x) for x in e["loc"][1:]), e["msg"])
                 for e in err.errors()]
        return error_response(request, WebError(422, "invalid request: " + "; ".join(parts)))

    # ------------------------------------------------------------------------------------------- JSON
    # JSONResponse directly: plain json.dumps of dicts the store built (FastAPI's generic encoder is several times
    # slower on a feature's examples)
    @app.get("/api/run")
    def api_run() -> JSONResponse:
        return JSONResponse(data.overview())

    @app.get("/api/saes/{sae}/features")
    def api_features(sae: str, q: str = "", token: str = "", order: str = "density", offset: int = 0,
                     limit: int = 50) -> JSONResponse:
        return JSONResponse(data.feature_list(sae, q=q, token=token, order=order, offset=offset, limit=limit))

    @app.get("/api/saes/{sae}/features/{idx}")
    def api_feature(sae: str, idx: int) -> JSONResponse:
        return JSONResponse(data.feature(sae, idx))

    @app.post("/api/inspect")
    def api_inspect(text: str = Body(..., embed=True), top: int = Body(5, embed=True)) -> JSONResponse:
        return JSONResponse(data.inspect(text, top))

    @app.post("/api/steer")
    def api_steer(req: SteerRequest) -> JSONResponse:
        return JSONResponse(data.steer(req.prompts, [e.model_dump() for e in req.edits], positions=req.positions,
                                       max_new_tokens=req.max_new_tokens, temperature=req.temperature, seed=req.seed))

    # ------------------------------------------------------------------------------------------- pages
    @app.get("/", response_class=HTMLResponse)
    def overview(request: Request):
        return page(request, "overview.html", ov=data.overview())

    @app.get("/features")
    def features_default():
        sae = data.default_sae()
        if sae is None:
            raise WebError(404, "this run has no SAEs")
        return RedirectResponse(f"/saes/{sae}/features", status_code=307)

    @app.get("/saes/{sae}/features", response_class=HTMLResponse)
    def features(request: Request, sae: str, q: str = "", token: str = "", order: str = "density", offset: int = 0,
                 limit: int = 50):
        listing = data.feature_list(sae, q=q, token=token, order=order, offset=offset, limit=limit)
        return page(request, "features.html", listing=listing, orders=ORDERS, max_limit=MAX_LIST_LIMIT,
                    saes=[s["name"] for s in data.store().saes()])

    @app.get("/saes/{sae}/features/{idx}", response_class=HTMLResponse)
    def feature(request: Request, sae: str, idx: int):
        return page(request, "feature.html", f=data.feature(sae, idx))

    @app.get("/inspect", response_class=HTMLResponse)
    def inspect(request: Request):
        return page(request, "inspect.html", max_chars=data.max_prompt_chars, max_tokens=data.max_prompt_tokens(),
                    saes=list(data.sae_folders), loaded=data.inspector_loaded)

    @app.get("/steer", response_class=HTMLResponse)
    def steer(request: Request, sae: str = "", feature: str = "", mode: str = "add", strength: str = "4",
              unit: str = "max", prompt: str = ""):
        from saeforge.interventions.steering import MAX_STRENGTH, MODES, UNITS

        saes = data.steer_saes()
        names = [s["name"] for s in saes]
        # the form's first feature row, pre-filled from the query (a feature page's "steer with this feature" link);
        # nothing is checked here: the request says what is wrong when the form is sent
        row = {"sae": sae if sae in names else (names[0] if names else ""), "feature": feature,
               "mode": mode if mode in MODES else "add", "strength": strength,
               "unit": unit if unit in UNITS else "max"}
        return page(request, "steer.html", saes=saes, row=row, prompt=prompt, modes=MODES, units=UNITS,
                    max_strength=MAX_STRENGTH, max_prompts=MAX_STEER_PROMPTS, max_edits=MAX_STEER_EDITS,
                    max_new_tokens=MAX_STEER_NEW_TOKENS, max_temperature=MAX_STEER_TEMPERATURE,
                    max_chars=data.max_prompt_chars, loaded=data.inspector_loaded)

    @app.get("/plots/{sae}/{name}")
    def plot(sae: str, name: str):
        return FileResponse(data.plot_file(sae, name), media_type="image/png")

    return app
