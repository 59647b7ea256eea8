"""The engine's local HTTP service (FastAPI + uvicorn) that the QGIS plugin talks to.

Security
    Bound to 127.0.0.1 unless told otherwise. Every start draws a random token
    (``secrets.token_urlsafe``); every request, ``/openapi.json`` included, must carry it as
    ``Authorization: Bearer <token>`` or ``X-RSMoE-Token: <token>`` (missing: 401, wrong: 403).
    The URL, token and process id are written to a file only the user can read (mode 0600):
    ``$RSMOE_HOME/engine.json`` or ``~/.cache/rsmoe/engine.json`` by default
    (``{"url": ..., "token": ..., "pid": ..., "version": ...}``), removed again at shutdown.
    Request bodies above ``max_body_bytes`` are refused with 413 before they are read in full.

Lifetime
    With ``stop_on_stdin_eof`` (``rsmoe serve --stop-on-stdin-eof``) the service stops cleanly when its
    standard input reaches end-of-file. The QGIS plugin starts the engine with a pipe as stdin, so the
    engine also stops when QGIS exits or crashes (the OS closes the pipe), on every platform.

Errors
    Every failure is JSON ``{"error": "<message a person can act on>"}``: engine errors with their
    ``http_status`` (400 bad input, 404 missing file or job, 409 job state, 422 unreadable raster,
    503 missing base weights), request validation 422, unknown route 404, bad token 401/403,
    too large 413 (``GET /openapi.json`` documents them per endpoint, with every field's limits and the
    token as security scheme); anything unexpected is logged and answered 500 without a traceback. The
    service keeps serving.

Endpoints: see :func:`create_app` (and ``GET /openapi.json``).
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import secrets
import socket
import sys
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, Any, AsyncIterator, Callable, Literal, get_type_hints

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, create_model
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine import __version__
from engine.bands import BandSelection
from engine.errors import RSMoEError, UserInputError
from engine.georef import Window
from engine.inputs import ImageInput
from engine.job_manager import JobManager
from engine.jobs import AnnotateParams
from engine.model.routing import MAX_QUESTION_CHARS
from engine.pipeline import ModelInfo, Pipeline

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_MAX_BODY_BYTES = 64 * 2**20
TOKEN_HEADER = "x-rsmoe-token"
ENGINE_FILE = "engine.json"
#: Longest file path or CRS text a request may hold.
MAX_PATH_CHARS = 4096
MAX_CRS_CHARS = 10_000
#: Largest pixel offset or size (GDAL's raster size limit).
MAX_PIXELS = 2**31 - 1
#: Most images in one ``POST /caption/batch`` (its bytes are bounded by the body limit).
MAX_BATCH_ITEMS = 64


def default_token_file() -> Path:
    """``$RSMOE_HOME/engine.json`` or ``~/.cache/rsmoe/engine.json``."""
    from engine.base_models import cache_root

    return cache_root() / ENGINE_FILE


# --------------------------------------------------------------------------------------------
# Request bodies
# --------------------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorBody(BaseModel):
    """Every failure: one line saying what went wrong and what to do."""

    error: str = Field(..., description="a message a person can act on (one line, no traceback)")


def _plain_text(value: str) -> str:
    """Text that reaches file systems, GDAL and the tokenizer: no NUL character, valid Unicode."""
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (it holds a lone surrogate)") from None
    return value


#: A file path on the engine's machine.
LocalPath = Annotated[str, Field(min_length=1, max_length=MAX_PATH_CHARS),
                      AfterValidator(_plain_text)]
CrsText = Annotated[str, Field(min_length=1, max_length=MAX_CRS_CHARS),
                    AfterValidator(_plain_text)]
BandName = Annotated[str, Field(min_length=1, max_length=64), AfterValidator(_plain_text)]
BandChoice = (Annotated[str, Field(max_length=200), AfterValidator(_plain_text)]
              | Annotated[list[Annotated[int, Field(ge=1, le=65535)] | BandName], Field(min_length=1, max_length=3)])
PixelWindow = Annotated[list[Annotated[int, Field(ge=0, le=MAX_PIXELS)]], Field(min_length=4, max_length=4)]
Coordinate = Annotated[float, Field(allow_inf_nan=False)]
Extent = Annotated[list[Coordinate], Field(min_length=4, max_length=4)]
Style = Literal["concise", "detailed"]


class RegionRequest(_Strict):
    """An image: ``image_base64`` (PNG / JPEG / GeoTIFF bytes) or a local raster ``path``, and a part of it."""

    image_base64: str | None = Field(None, min_length=1,
                                     description="base64 of PNG, JPEG or GeoTIFF bytes (instead of path)")
    path: LocalPath | None = Field(None, description="a raster file on the engine's machine (instead of "
                                                     "image_base64)")
    window: PixelWindow | None = Field(None, description="pixel window [col_off, row_off, width, height] (width and "
                                                         "height at least 1; instead of extent)")
    extent: Extent | None = Field(None, description="[minx, miny, maxx, maxy] in the raster CRS or extent_crs "
                                                    "(instead of window)")
    extent_crs: CrsText | None = Field(None, description="CRS of extent, e.g. EPSG:4326")
    bands: BandChoice | None = Field(None, description='1 or 3 bands, e.g. "4,3,2", [4, 3, 2] or ["B04","B03","B02"]')
    ground_resolution_m: float | None = Field(
        None, gt=0, allow_inf_nan=False,
        description="metres per pixel of the image as sent (e.g. a rendered map image without georeferencing); "
                    "default: from the raster's georeferencing, else unknown")

    def image_input(self) -> ImageInput:
        data = None
        if self.image_base64 is not None:
            try:
                data = base64.b64decode(self.image_base64, validate=True)
            except (binascii.Error, ValueError):
                raise UserInputError("image_base64 is not valid base64") from None
        return ImageInput(path=self.path, data=data, window=Window.from_list(self.window) if self.window else None,
                          extent=tuple(self.extent) if self.extent else None,  # type: ignore[arg-type]
                          extent_crs=self.extent_crs, bands=BandSelection.parse(self.bands),
                          ground_resolution_m=self.ground_resolution_m)


class CaptionRequest(RegionRequest):
    style: Style = Field("concise", description="concise: one sentence; detailed: every expert")


class AskRequest(RegionRequest):
    question: Annotated[str, AfterValidator(_plain_text)] = Field(
        ..., min_length=1, max_length=MAX_QUESTION_CHARS,
        description=f"the question (at most {MAX_QUESTION_CHARS} characters)")


class CaptionBatchRequest(_Strict):
    """Several images or raster regions captioned in one request, through the model in batches."""

    items: list[RegionRequest] = Field(..., min_length=1, max_length=MAX_BATCH_ITEMS,
                                       description=f"1 to {MAX_BATCH_ITEMS} regions, as for POST /caption (without "
                                                   f"style); all together within the request body limit")
    style: Style = Field("concise", description="for every item: concise (one sentence) or detailed (every expert)")

    def image_inputs(self) -> list[ImageInput]:
        """The items as engine inputs; a bad item fails the whole request, naming it (``items[2]: ...``)."""
        inputs = []
        for i, item in enumerate(self.items):
            try:
                inputs.append(item.image_input())
            except RSMoEError as exc:
                raise type(exc)(f"items[{i}]: {exc}") from None
        return inputs


class JobRequest(_Strict):
    """A batch annotation job (see ``rsmoe annotate``)."""

    path: LocalPath = Field(..., description="the raster to annotate (on the engine's machine)")
    out: LocalPath = Field(..., description="the GeoJSON file to write")
    tile_size: (Annotated[str, Field(min_length=1, max_length=32),
                          AfterValidator(_plain_text)]
                | Annotated[int, Field(ge=1, le=MAX_PIXELS)] | None) = Field(
        None, description='pixels (512, "512px") or ground size ("500m", "2km"); default: the model\'s ground '
                          "footprint where it has one and the raster is georeferenced, else 512 pixels")
    overlap: int = Field(0, ge=0, le=MAX_PIXELS, description="pixels shared by neighbouring tiles (less than a tile)")
    window: PixelWindow | None = Field(None, description="pixel window [col_off, row_off, width, height]")
    extent: Extent | None = Field(None, description="[minx, miny, maxx, maxy] in the raster CRS or extent_crs")
    extent_crs: CrsText | None = None
    bands: BandChoice | None = None
    style: Style = "concise"
    batch_size: int | None = Field(None, ge=1, le=256)
    gpkg: LocalPath | None = Field(None, description="also write a GeoPackage here")
    restart: bool = Field(False, description="ignore an existing journal instead of resuming it")
    min_valid_fraction: float = Field(0.5, ge=0.0, le=1.0)
    timing: bool = False

    def params(self) -> AnnotateParams:
        if self.window is not None and self.extent is not None:
            raise UserInputError("give either a window or an extent, not both")
        if self.extent_crs is not None and self.extent is None:
            raise UserInputError("extent_crs was given without an extent")
        return AnnotateParams(
            raster=self.path, out=self.out, tile_size=self.tile_size, overlap=self.overlap,
            window=Window.from_list(self.window) if self.window else None,
            extent=tuple(self.extent) if self.extent else None,  # type: ignore[arg-type]
            extent_crs=self.extent_crs, bands=BandSelection.parse(self.bands), style=self.style,
            batch_size=self.batch_size, gpkg=self.gpkg, restart=self.restart,
            min_valid_fraction=self.min_valid_fraction, timing=self.timing)


# --------------------------------------------------------------------------------------------
# Answers (documented in the OpenAPI document; further fields may be added, so they allow extras)
# --------------------------------------------------------------------------------------------
class _Answer(BaseModel):
    model_config = ConfigDict(extra="allow")


class SegmentAnswer(_Answer):
    expert: str = Field(..., description="theme, objects or relations")
    prompt: str = Field(..., description="what the router asked the expert")
    text: str


class RegionAnswer(_Answer):
    """A caption or an answer about one region (see the README for every field)."""

    text: str
    task: Literal["caption", "ask"]
    style: Style | None
    router: str = Field(..., description="generative or template")
    scene: str | None = Field(..., description="the scene head's class; null where it was unsure or absent")
    scene_confidence: float | None
    experts: list[str]
    segments: list[SegmentAnswer]
    ground_resolution_m: float | None = Field(..., description="native metres per pixel of the region")
    model_resolution_m: float | None = Field(..., description="metres per pixel of the model input")
    uncertain: bool
    uncertainty: list[str] = Field(..., description="why the result may be wrong")
    window: list[int] = Field(..., description="the pixel window read [col_off, row_off, width, height]")
    source: dict[str, Any] = Field(..., description="the raster: path (null for bytes), size, bands, CRS, ...")
    cached: bool = Field(..., description="the visual features came from the cache")
    seconds: float


class CaptionBatchAnswer(_Answer):
    results: list[RegionAnswer] = Field(..., description="one per item, in the items' order")
    seconds: float


class JobStatus(_Answer):
    id: str
    state: Literal["queued", "running", "done", "failed", "cancelled"]
    done: int
    total: int
    skipped: int
    resumed: int
    message: str | None
    error: str | None
    cancel_requested: bool
    out: str
    gpkg: str | None
    raster: str
    tile_size: str | None
    warnings: list[str]
    created: float
    started: float | None
    finished: float | None
    result: dict[str, Any] | None


class JobList(_Answer):
    jobs: list[JobStatus]


class JobResult(_Answer):
    """Where a finished job wrote; with ``geojson`` (its content) unless ``content=false``."""

    id: str
    out: str
    gpkg: str | None
    total: int
    captioned: int
    skipped: int
    resumed: int
    seconds: float
    journal: str | None


def _model_facts() -> dict[str, Any]:
    """:class:`ModelInfo`'s fields as pydantic field definitions: the health answer carries them all."""
    hints = get_type_hints(ModelInfo)
    return {f.name: (hints[f.name], ...) for f in fields(ModelInfo)}


HealthAnswer = create_model(
    "HealthAnswer", __base__=_Answer, status=(Literal["ok"], ...), **_model_facts(),
    batch_size=(int, Field(..., description="images per model call")),
    image_size=(int, Field(..., description="the model's input size in pixels")),
    resolution=(dict[str, Any], Field(..., description="conditioned, min_m, max_m, tile_m")),
    cache=(dict[str, Any], ...), jobs=(dict[str, int], ...), uptime_s=(float, ...), pid=(int, ...))


# --------------------------------------------------------------------------------------------
# ASGI guard: token and body size, before any body is read
# --------------------------------------------------------------------------------------------
async def _send_json(send: Callable[..., Any], status: int, payload: dict[str, Any],
                     headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class GuardMiddleware:
    """Refuse requests without the token (401 / 403) and bodies over ``max_body_bytes`` (413)."""

    def __init__(self, app: Any, token: str, max_body_bytes: int) -> None:
        self.app = app
        self.token = token.encode()
        self.max_body_bytes = max_body_bytes

    def _token_of(self, headers: dict[bytes, bytes]) -> bytes | None:
        auth = headers.get(b"authorization", b"")
        if auth[:7].lower() == b"bearer ":
            return auth[7:].strip()
        return headers.get(TOKEN_HEADER.encode())

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        given = self._token_of(headers)
        if not given:
            await _send_json(send, 401, {"error": "missing token: send 'Authorization: Bearer <token>' with the "
                                                  "token from the engine's engine.json"},
                             [(b"www-authenticate", b"Bearer")])
            return
        if not secrets.compare_digest(given, self.token):
            await _send_json(send, 403, {"error": "wrong token: the engine was restarted? read the token again "
                                                  "from its engine.json"})
            return
        length = headers.get(b"content-length")
        too_large = {"error": f"request body too large: the limit is {self.max_body_bytes // 2**20} MB"}
        try:
            if length is not None and int(length) > self.max_body_bytes:
                await _send_json(send, 413, too_large)
                return
        except ValueError:
            await _send_json(send, 400, {"error": "invalid Content-Length header"})
            return
        received = 0
        started = False

        async def limited_receive() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:  # FastAPI passes HTTPException through its body parsing
                    raise StarletteHTTPException(413, too_large["error"])
            return message

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except StarletteHTTPException as exc:
            if started or exc.status_code != 413:
                raise
            await _send_json(send, 413, too_large)


# --------------------------------------------------------------------------------------------
# The application
# --------------------------------------------------------------------------------------------
def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err.get("loc", ()) if p != "body")
        where = where.lstrip(".")
        if err.get("type") == "json_invalid":
            parts.append("the request body is not valid JSON")
            continue
        if err.get("type") == "extra_forbidden":
            parts.append(f"unknown field '{where}'")
            continue
        message = str(err.get("msg"))
        if err.get("type") == "string_unicode":
            message = "must be valid Unicode text (it holds a lone surrogate)"
        elif err.get("type") == "value_error":  # our validators' own words, without pydantic's prefix
            message = str((err.get("ctx") or {}).get("error") or message)
        parts.append(f"{where}: {message}" if where else message)
    return "invalid request: " + "; ".join(dict.fromkeys(parts))


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """``{"error": message}``: one line, valid UTF-8 whatever the request held, at most 2000 characters."""
    text = " ".join(str(message).split()).encode("utf-8", "backslashreplace").decode("utf-8")
    if len(text) > 2000:
        text = text[:1997] + "..."
    return JSONResponse({"error": text}, status_code=status, headers=headers)


#: What each error status means (the OpenAPI document's response descriptions).
ERROR_STATUSES: dict[int, str] = {
    400: "bad input: the message says what to change (also a body nested too deeply to parse, an invalid "
         "Content-Length header)",
    401: "missing token: send 'Authorization: Bearer <token>' with the token of engine.json",
    403: "wrong token: the engine was restarted? read its engine.json again",
    404: "a file, a job or an endpoint that does not exist",
    409: "the job's state does not allow this (not done yet, failed, cancelled; another job writes the same file)",
    413: "request body over the engine's limit (rsmoe serve --max-body-mb), refused before it is read",
    422: "invalid request (wrong type, out of range, unknown field, not JSON, text with a NUL character or a lone "
         "surrogate) or an unreadable raster",
    500: "an engine bug: logged with its traceback in the engine's log; the service keeps serving",
}


def _responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI responses of an endpoint: the given error statuses and those every request can get."""
    every = (400, 401, 403, 500)
    return {status: {"model": ErrorBody, "description": ERROR_STATUSES[status]}
            for status in sorted(set(statuses) | set(every))}


def _openapi(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """The OpenAPI document with the token as its security scheme (both headers; one of them is needed)."""

    def build() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            error = {"description": ERROR_STATUSES[422],
                     "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}}
            for operation in (op for methods in schema["paths"].values() for op in methods.values()):
                if "HTTPValidationError" in json.dumps(operation["responses"].get("422", {})):
                    operation["responses"]["422"] = error  # FastAPI's default: ours answers ErrorBody
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer",
                           "description": "the token of the engine's engine.json (new at every start)"},
                "token": {"type": "apiKey", "in": "header", "name": "X-RSMoE-Token",
                          "description": "the same token in a header of its own"},
            }
            schema["security"] = [{"bearer": []}, {"token": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    return build


def create_app(pipeline: Pipeline, jobs: JobManager, token: str, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               lifespan: Callable[[FastAPI], Any] | None = None) -> FastAPI:
    """The FastAPI application over one pipeline and its job manager.

    Endpoints (all need the token; bodies and answers are JSON):

    - ``GET /health``: model id, variant, trained, backend, device, providers, gpu, version, jobs.
    - ``POST /caption``: :class:`CaptionRequest` -> caption with expert segments and the window read, the
      native and the seen ground resolution (``ground_resolution_m``, ``model_resolution_m``) and whether the
      model is unsure (``uncertain``, ``uncertainty``).
    - ``POST /caption/batch``: :class:`CaptionBatchRequest` -> ``results`` in the items' order.
    - ``POST /ask``: :class:`AskRequest` -> answer.
    - ``POST /jobs``: :class:`JobRequest` -> 202 and the job's status.
    - ``GET /jobs``: every job's status. ``GET /jobs/{id}``: one job's status.
    - ``POST /jobs/{id}/cancel``: ask a job to stop after its current batch.
    - ``GET /jobs/{id}/result[?content=false]``: where the GeoJSON is, and its content.
    """
    app = FastAPI(title="RS-MoE engine", version=__version__, docs_url=None, redoc_url=None, lifespan=lifespan,
                  description="Local RS-MoE service for the QGIS plugin. Every request needs the token of "
                              "engine.json: `Authorization: Bearer <token>` or `X-RSMoE-Token: <token>`.")
    started = time.time()

    @app.exception_handler(RSMoEError)
    async def _engine_error(request: Request, exc: RSMoEError) -> JSONResponse:
        if exc.http_status >= 500:
            log.error("%s %s: %s", request.method, request.url.path, exc)
        return _error(exc.http_status, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        kind = request.headers.get("content-type", "")
        if request.method == "POST" and kind and "json" not in kind.lower():
            return _error(422, f"invalid request: the body is {kind.split(';')[0]}; send JSON with "
                               f"'Content-Type: application/json'")
        return _error(422, _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no such endpoint: {request.method} {request.url.path}"
        elif exc.status_code == 400 and message == "There was an error parsing the body":  # FastAPI's words
            message = "the request body cannot be parsed as JSON (nested too deeply?); send a JSON object"
        return _error(exc.status_code, message, exc.headers)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return _error(500, f"internal error ({type(exc).__name__}: {exc}); see the engine's log")

    app.openapi = _openapi(app)  # type: ignore[method-assign]

    @app.get("/health", summary="model, backend, device and whether a GPU is used", responses=_responses(),
             response_model=HealthAnswer)
    def health() -> dict[str, Any]:
        jobs_now = jobs.list()
        res = pipeline.model.config.resolution
        return {"status": "ok", **pipeline.info.to_dict(), "batch_size": pipeline.batch_size,
                "image_size": pipeline.image_size,
                "resolution": {"conditioned": bool(res.prompt), "min_m": res.min_m, "max_m": res.max_m,
                               "tile_m": res.tile_m},
                "uptime_s": round(time.time() - started, 1), "pid": os.getpid(),
                "cache": pipeline.cache.stats(),
                "jobs": {"active": sum(j.active for j in jobs_now), "total": len(jobs_now)}}

    region_errors = _responses(404, 413, 422)

    @app.post("/caption", summary="caption an image or a raster region", responses=region_errors,
              response_model=RegionAnswer)
    def caption(req: CaptionRequest) -> dict[str, Any]:
        return pipeline.caption(req.image_input(), req.style).to_dict()

    @app.post("/caption/batch", summary="caption several images or raster regions in one request",
              responses=region_errors, response_model=CaptionBatchAnswer,
              description=f"1 to {MAX_BATCH_ITEMS} items (as for POST /caption) go through the model in batches; "
                          "`results` answers them in order. A bad item rejects the whole request before any "
                          "model work, with the item named (`items[2]: ...`) and its status.")
    def caption_batch(req: CaptionBatchRequest) -> dict[str, Any]:
        start = time.perf_counter()
        names = [f"items[{i}]" for i in range(len(req.items))]
        results = pipeline.caption_batch(req.image_inputs(), req.style, names=names)
        return {"results": [r.to_dict() for r in results], "seconds": round(time.perf_counter() - start, 3)}

    @app.post("/ask", summary="answer a question about an image or a raster region", responses=region_errors,
              response_model=RegionAnswer)
    def ask(req: AskRequest) -> dict[str, Any]:
        return pipeline.ask(req.image_input(), req.question).to_dict()

    @app.post("/jobs", status_code=202, summary="start a batch annotation job",
              responses=_responses(404, 409, 413, 422), response_model=JobStatus)
    def create_job(req: JobRequest) -> dict[str, Any]:
        return jobs.submit(req.params()).status()

    @app.get("/jobs", summary="every job of this session", responses=_responses(), response_model=JobList)
    def list_jobs() -> dict[str, Any]:
        return {"jobs": [j.status() for j in jobs.list()]}

    @app.get("/jobs/{job_id}", summary="a job's state and progress", responses=_responses(404),
             response_model=JobStatus)
    def job_status(job_id: str) -> dict[str, Any]:
        return jobs.get(job_id).status()

    @app.post("/jobs/{job_id}/cancel", summary="stop a job after its current batch", responses=_responses(404),
              response_model=JobStatus)
    def cancel_job(job_id: str) -> dict[str, Any]:
        return jobs.cancel(job_id).status()

    @app.get("/jobs/{job_id}/result", summary="the finished job's GeoJSON (path and content)",
             responses=_responses(404, 409, 422), response_model=JobResult)
    def job_result(job_id: str, content: bool = True) -> dict[str, Any]:
        result = jobs.result(job_id)
        body: dict[str, Any] = {"id": job_id, **result.to_dict()}
        if content:
            try:
                body["geojson"] = json.loads(result.out.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise UserInputError(f"cannot read the job's output '{result.out}': {exc}") from None
        return body

    app.add_middleware(GuardMiddleware, token=token, max_body_bytes=max_body_bytes)
    return app


# --------------------------------------------------------------------------------------------
# Running the service
# --------------------------------------------------------------------------------------------
@dataclass
class ServeOptions:
    """Where and how the service listens."""

    host: str = DEFAULT_HOST
    port: int = 0
    token_file: Path | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    log_level: str = "warning"
    stop_on_stdin_eof: bool = False


def write_engine_file(path: Path, info: dict[str, Any]) -> None:
    """Write ``info`` as JSON readable by the user only (0600), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(info, fh)
            fh.write("\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class EngineService:
    """The service: a pipeline, its job manager, a token, a bound socket and uvicorn.

    ``run()`` blocks (the CLI); ``start()`` / ``stop()`` run it in a thread (tests, embedding).
    """

    def __init__(self, pipeline: Pipeline, options: ServeOptions | None = None) -> None:
        self.pipeline = pipeline
        self.options = options or ServeOptions()
        self.token = secrets.token_urlsafe(32)
        self.token_file = Path(self.options.token_file) if self.options.token_file else default_token_file()
        self.jobs = JobManager(pipeline)
        self.socket = self._bind()
        host, port = self.socket.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{port}"
        self.app = create_app(pipeline, self.jobs, self.token, self.options.max_body_bytes, self._lifespan)
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.ready = threading.Event()

    def _bind(self) -> socket.socket:
        host, port = self.options.host, int(self.options.port)
        if not 0 <= port <= 65535:
            raise UserInputError(f"port must lie in 0..65535, got {port}")
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise UserInputError(f"cannot resolve host {host!r}: {exc.strerror}") from None
        family, _, _, _, address = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            sock.close()
            raise UserInputError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        sock.listen(128)
        if host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("listening on %s: other machines may reach the engine (the token still guards it)", host)
        return sock

    @asynccontextmanager
    async def _lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        write_engine_file(self.token_file, {"url": self.url, "token": self.token, "pid": os.getpid(),
                                            "version": __version__, "model_id": self.pipeline.info.model_id})
        log.info("token written to %s", self.token_file)
        self.ready.set()
        try:
            yield
        finally:
            self.jobs.shutdown(timeout=5.0)
            self._remove_engine_file()

    def _remove_engine_file(self) -> None:
        try:
            if json.loads(self.token_file.read_text()).get("token") == self.token:
                self.token_file.unlink()
        except (OSError, ValueError):
            pass

    def _make_server(self) -> Any:
        import uvicorn

        config = uvicorn.Config(self.app, log_level=self.options.log_level, lifespan="on", access_log=False,
                                timeout_graceful_shutdown=5)
        self._server = uvicorn.Server(config)
        return self._server

    def run(self) -> None:
        """Serve until interrupted (Ctrl+C / SIGTERM), or until stdin closes with ``stop_on_stdin_eof``."""
        server = self._make_server()
        if self.options.stop_on_stdin_eof:
            threading.Thread(target=self._stop_at_stdin_eof, name="rsmoe-stdin-watch", daemon=True).start()
        server.run(sockets=[self.socket])

    def _stop_at_stdin_eof(self) -> None:
        """Read stdin to its end (nothing is expected on it), then ask uvicorn to shut down cleanly."""
        stream = sys.stdin.buffer if sys.stdin is not None else None
        try:
            while stream is not None and stream.read(4096):
                pass
        except (OSError, ValueError):
            pass
        log.warning("standard input closed (the program that started the engine has gone): stopping")
        if self._server is not None:
            self._server.should_exit = True

    def start(self, timeout: float = 30.0) -> EngineService:
        """Serve in a background thread; returns when requests are answered."""
        server = self._make_server()
        self._thread = threading.Thread(target=server.run, kwargs={"sockets": [self.socket]}, name="rsmoe-server",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the engine service did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        self.socket.close()
