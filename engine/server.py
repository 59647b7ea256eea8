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

import json
import logging
import os
import secrets
import socket
import sys
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine import __version__
from engine.api_models import AskRequest, CaptionBatchAnswer, CaptionBatchRequest, CaptionRequest, ErrorBody, HealthAnswer, JobList, JobRequest, JobResult, JobStatus, MAX_BATCH_ITEMS, RegionAnswer
from engine.errors import RSMoEError, UserInputError
from engine.job_manager import JobManager
from engine.pipeline import Pipeline

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_MAX_BODY_BYTES = 64 * 2**20
TOKEN_HEADER = "x-rsmoe-token"
ENGINE_FILE = "engine.json"


def default_token_file() -> Path:
    """``$RSMOE_HOME/engine.json`` or ``~/.cache/rsmoe/engine.json``."""
    from engine.base_models import cache_root

    return cache_root() / ENGINE_FILE


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
        return jobs.submit(req.params(), req.ray_options()).status()

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
