"""The dashboard's FastAPI application: server-rendered pages, each with the JSON endpoint it is built from.

====================================  =====================================================================
page                                  JSON
====================================  =====================================================================
``/``  run overview                   ``GET /api/run``
``/saes/{sae}/features``  list        ``GET /api/saes/{sae}/features?q=&token=&order=&offset=&limit=&alive=``
``/saes/{sae}/features/{idx}``        ``GET /api/saes/{sae}/features/{idx}``
``/inspect``  prompt inspector        ``POST /api/inspect`` with ``{"text": ..., "top": 5}``;
                                      ``POST /api/inspect/feature`` with ``{"text", "sae", "feature"}``: one
                                      feature's activation at every token
``/steer``  steering playground       ``POST /api/steer`` with ``{"prompts": [...], "edits": [{"sae", "feature", "mode",
                                      "strength", "unit"}], "positions", "max_new_tokens", "temperature", "seed"}``
``/plots/{sae}/{file}.png``           the evaluation plots
====================================  =====================================================================

Errors are ``{"error", "fix", "status"}`` with a 4xx/5xx status (an HTML page for a browser asking for a page).
Requests that run the model wait at most ``queue_timeout`` s for it (then 503 with ``Retry-After``) and run at most
``request_timeout`` s (then 504); a steering request stops when its client disconnects. The model is loaded on the
first such request.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import anyio
from fastapi import Body, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from saeforge import __version__
from saeforge.errors import SaeforgeError
from saeforge.web.data import RunData
from saeforge.web.errors import WebError
from saeforge.web.features import MAX_LIST_LIMIT, ORDER_LABELS
from saeforge.web.model import ModelRequest
from saeforge.web.render import chip, example_html, fmt, share, show_token, token_html, window_peak
from saeforge.web.steering import (MAX_STEER_EDITS, MAX_STEER_NEW_TOKENS, MAX_STEER_PROMPT_TOKENS, MAX_STEER_PROMPTS,
                                   MAX_STEER_TEMPERATURE)

HERE = Path(__file__).parent
DISCONNECT_POLL_S = 0.25

__all__ = ["create_app", "fmt", "show_token"]


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


def _wants_html(request: Request) -> bool:
    return not request.url.path.startswith("/api/") and "text/html" in request.headers.get("accept", "")


async def run_cancellable(request: Request, what: str, work):
    """``work(model_request)`` on a worker thread; the model request's cancel event is set when the client
    disconnects (the model's own bounds set it on a timeout or when the server stops)."""
    claim = ModelRequest(what)
    outcome: dict = {}

    async def watch() -> None:
        while not claim.cancel.is_set():
            if await request.is_disconnected():
                claim.stop("disconnected")
                return
            await anyio.sleep(DISCONNECT_POLL_S)

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        try:
            outcome["result"] = await anyio.to_thread.run_sync(work, claim, abandon_on_cancel=True)
        except Exception as err:  # re-raised outside the task group, unwrapped
            outcome["error"] = err
        finally:
            tg.cancel_scope.cancel()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def create_app(run_dir: str | Path, *, model: str = "", device: str = "auto", max_prompt_chars: int = 20_000,
               request_timeout: float = 120.0, queue_timeout: float = 10.0, data: RunData | None = None) -> FastAPI:
    """The dashboard of one run directory (opened and checked now, so a bad run fails before serving)."""
    data = data or RunData(run_dir, model=model, device=device, max_prompt_chars=max_prompt_chars,
                           request_timeout=request_timeout, queue_timeout=queue_timeout)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        data.model.stopping.clear()  # an app served again (a second test client, a restarted server) takes requests
        yield
        data.shutdown()  # a request still running stops at its next step
        data.close()  # the store connections of the server's threads

    app = FastAPI(title=f"saeforge · {data.path.name}", version=__version__, docs_url="/api/docs",
                  redoc_url=None, openapi_url="/api/openapi.json", lifespan=lifespan)
    app.state.data = data
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    templates = Jinja2Templates(directory=HERE / "templates")
    templates.env.filters.update(fmt=fmt, tok=show_token, chip=chip, token_html=token_html, share=share)
    templates.env.globals.update(run_name=data.path.name, version=__version__, default_sae=data.default_sae,
                                 example_html=example_html, window_peak=window_peak)

    def page(request: Request, name: str, status: int = 200, **ctx) -> HTMLResponse:
        return templates.TemplateResponse(request, name, ctx, status_code=status)

    def error_response(request: Request, err: WebError):
        if _wants_html(request):
            response = page(request, "error.html", err.status, error=err)
        else:
            response = JSONResponse(err.payload(), status_code=err.status)
        response.headers.update(err.headers)
        return response

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
    def api_features(sae: str, q: str = "", token: str = "", order: str = "", offset: int = 0, limit: int = 50,
                     alive: bool = False) -> JSONResponse:
        return JSONResponse(data.feature_list(sae, q=q, token=token, order=order, offset=offset, limit=limit,
                                              alive=alive))

    @app.get("/api/saes/{sae}/features/{idx}")
    def api_feature(sae: str, idx: int) -> JSONResponse:
        return JSONResponse(data.feature(sae, idx))

    @app.post("/api/inspect")
    def api_inspect(text: str = Body(..., embed=True), top: int = Body(5, embed=True)) -> JSONResponse:
        return JSONResponse(data.inspect(text, top))

    @app.post("/api/inspect/feature")
    def api_inspect_feature(text: str = Body(..., embed=True), sae: str = Body(..., embed=True),
                            feature: int = Body(..., embed=True)) -> JSONResponse:
        return JSONResponse(data.feature_across(text, sae, feature))

    @app.post("/api/steer")
    async def api_steer(req: SteerRequest, request: Request) -> JSONResponse:
        edits = [e.model_dump() for e in req.edits]
        result = await run_cancellable(request, "steering", lambda claim: data.steer(
            req.prompts, edits, positions=req.positions, max_new_tokens=req.max_new_tokens,
            temperature=req.temperature, seed=req.seed, request=claim))
        return JSONResponse(result)

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
    def features(request: Request, sae: str, q: str = "", token: str = "", order: str = "", offset: int = 0,
                 limit: int = 50, alive: bool = False):
        listing = data.feature_list(sae, q=q, token=token, order=order, offset=offset, limit=limit, alive=alive)
        return page(request, "features.html", listing=listing, orders=ORDER_LABELS, max_limit=MAX_LIST_LIMIT,
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
                    max_new_tokens=MAX_STEER_NEW_TOKENS, max_prompt_tokens=MAX_STEER_PROMPT_TOKENS,
                    max_temperature=MAX_STEER_TEMPERATURE, max_chars=data.max_prompt_chars,
                    loaded=data.inspector_loaded, request_timeout=data.model.request_timeout)

    @app.get("/plots/{sae}/{name}")
    def plot(sae: str, name: str):
        return FileResponse(data.plot_file(sae, name), media_type="image/png")

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon():
        return FileResponse(HERE / "static" / "favicon.svg", media_type="image/svg+xml")

    from saeforge.web.circuits import register_circuit_routes
    from saeforge.web.flow import register_flow_routes
    from saeforge.web.hierarchy import register_hierarchy_routes

    register_flow_routes(app)
    hierarchy = register_hierarchy_routes(app, data, templates)
    circuits = register_circuit_routes(app, data, templates)
    # the navigation links to what the run holds: match tables of a suite, feature trees or modules, circuits
    templates.env.globals.update(
        has_flow=lambda: (data.path / "flow").is_dir(),
        has_circuits=lambda: bool(circuits.files()),
        has_hierarchy=lambda: bool(hierarchy._tree_files() or hierarchy._module_files()))
    return app
