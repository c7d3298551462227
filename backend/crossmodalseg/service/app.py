"""`crossmodalseg serve`: the HTTP API (FastAPI on uvicorn) over the store, the job runner and the predictor pool.

Resources: datasets (cases, images per modality, labels per modality tagged `final` or `original`), jobs (train,
finetune, predict; state, paged events, cancel, resume), models (list, describe, import/export as a zip archive) and
a synchronous /predict for one case. Errors are JSON `{"detail": "..."}` with a 4xx status that says whose fault.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import threading
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from .. import __version__
from ..config import ConfigError, describe_errors
from ..data.io import ImageError
from ..data.spec import DatasetError
from ..engine.checkpoint import ModelFolderError
from ..errors import user_message
from .auth import browser_attack, check_bind, token_matches
from .connections import HeaderTimeoutProtocol
from .jobs import JobRunner
from .predictor_pool import PredictorPool
from .processes import hold_home
from .routes.common import Service
from .routes.datasets import datasets_router
from .routes.info import info_router
from .routes.jobs import jobs_router
from .routes.models import models_router
from .routes.predict import predict_router
from .schemas import (
    ERROR_RESPONSES,
    JsonBodyGate,
)
from .store import Conflict, NotFound, Store
from .uploads import (
    ImageReaders,
    UploadError,
)

logger = logging.getLogger("crossmodalseg.service")


# The middlewares are plain ASGI: Starlette's BaseHTTPMiddleware (@app.middleware) wraps `receive` so that a route
# never sees its client disconnect, and /predict must stop the prediction of a client that went away.
class HeadAsGet:
    """HEAD on any GET route: the GET's status and headers, no body (HTTP requires HEAD wherever GET is). The GET
    runs to its end unsent (its own background tasks, e.g. removing a temporary file, run too)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            return await self.app(scope, receive, send)

        async def headers_only(message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, headers_only)


class RequestGuard:
    """Answers `refusal(request)` instead of running the app when that is not None (`request`: headers only)."""

    def __init__(self, app, refusal) -> None:
        self.app, self.refusal = app, refusal

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            refused = self.refusal(Request(scope))
            if refused is not None:
                return await refused(scope, receive, send)
        await self.app(scope, receive, send)


def create_app(home: str | Path, token: str | None = None, max_upload_bytes: int = 2 << 30,
               devices: list[str] | None = None, min_free_bytes: int | None = None) -> FastAPI:
    """`min_free_bytes`: requests that store something (PUT, POST) are refused with 507 while the home's disk has
    less free space (default: $CROSSMODALSEG_MIN_FREE_MB, else 1 GiB); reads and DELETE always work, so space can
    be freed through the API."""
    if min_free_bytes is None:
        min_free_bytes = int(float(os.environ.get("CROSSMODALSEG_MIN_FREE_MB", 1024)) * 2**20)
    store = Store(home)
    runner = JobRunner(store, devices)
    pool = PredictorPool()
    readers = ImageReaders()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        runner.start()
        yield
        runner.stop()
        pool.shutdown()
        readers.shutdown()

    app = FastAPI(title="CrossModalSeg", version=__version__, lifespan=lifespan, responses=ERROR_RESPONSES,
                  description="Cross-modality segmentation with few labels: datasets, training jobs, models, "
                              "prediction. Send `Authorization: Bearer <token>` when the server has a token.")
    # Innermost of the middlewares (added first): bodies are bounded only after the token was checked.
    app.add_middleware(JsonBodyGate, routes={("POST", "/datasets"), ("POST", "/jobs")})

    # ---- errors and guards ----------------------------------------------------------------------------------
    # Where the server keeps its files is none of a client's business: any message that names them says
    # "<server>/..." instead, whichever check or library wrote it.
    private_roots = sorted({str(store.home), str(store.home.resolve()), tempfile.gettempdir(),
                            str(Path(tempfile.gettempdir()).resolve())}, key=len, reverse=True)

    def redact(message: str | None) -> str | None:
        for root in private_roots:
            message = message.replace(root, "<server>") if message else message
        return message

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"detail": redact(message)}, status_code=status)

    @app.exception_handler(NotFound)
    async def _not_found(_: Request, e: NotFound):
        return error(404, str(e))

    @app.exception_handler(Conflict)
    async def _conflict(_: Request, e: Conflict):
        return error(409, str(e))

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(_: Request, e: RequestValidationError):
        """One readable line per problem, naming the field; never echoing the input (it may be huge, binary, or
        a float JSON cannot encode)."""
        return error(422, describe_errors(e))

    @app.exception_handler(ConfigError)
    async def _invalid_settings(_: Request, e: ConfigError):
        return error(422, str(e))

    @app.exception_handler(UploadError)
    async def _refused_upload(_: Request, e: UploadError):
        return error(e.status, str(e))

    def internal(request: Request, e: BaseException) -> JSONResponse:
        """A bug: logged with its traceback (the answer names no server path)."""
        logger.error("internal error on %s %s", request.method, request.url.path, exc_info=e)
        return error(500, f"internal error ({type(e).__name__}); see the server log")

    @app.exception_handler(ValueError)  # ids, dataset specs, images, model folders: the request is at fault
    async def _invalid(request: Request, e: ValueError):
        message = user_message(e)
        if message is None:  # a ValueError from deep inside a library is our bug, not the client's
            return internal(request, e)
        return error(422 if isinstance(e, (ImageError, ModelFolderError, DatasetError)) else 400, message)

    @app.exception_handler(RuntimeError)  # GPU out of memory, a prediction worker that died
    async def _unavailable(request: Request, e: RuntimeError):
        message = user_message(e)
        return error(503, message) if message else internal(request, e)

    def refusal(request: Request) -> JSONResponse | None:
        """The answer to a request that goes no further: another site's, without the token, storing on a nearly
        full disk, or a body past the upload limit."""
        refused = browser_attack(request.headers.get("host"), request.headers.get("origin"), bool(token))
        if refused:
            return error(403, refused)
        if token and not token_matches(request.headers.get("authorization"), token):
            return error(401, "missing or wrong token: send the header 'Authorization: Bearer <token>'")
        free = shutil.disk_usage(store.home).free if request.method in ("PUT", "POST") else None
        if free is not None and free < min_free_bytes:
            return error(507, f"the server's disk is nearly full ({free / 2**20:.0f} MiB free, {min_free_bytes / 2**20:.0f} "
                              f"MiB needed to accept work): delete cases (DELETE /datasets/{{id}}/cases/{{case}}) or "
                              f"free space on the server")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_upload_bytes + (1 << 20)):
            return error(413, f"request body larger than the server's limit of {max_upload_bytes / 2**20:.0f} MiB "
                              f"(start the server with a larger --max-upload-mb)")
        return None

    app.add_middleware(HeadAsGet)
    app.add_middleware(RequestGuard, refusal=refusal)  # outermost: nothing runs for a refused request

    service = Service(store, runner, pool, readers, max_upload_bytes, redact)
    for make_router in (info_router, datasets_router, jobs_router, models_router, predict_router):
        app.include_router(make_router(service))
    return app


def serve(home: Path, host: str = "127.0.0.1", port: int = 8765, token: str | None = None,
          max_upload_bytes: int = 2 << 30, stop_on_stdin_eof: bool = False) -> None:
    """Binds first (port 0 = a free one), prints one JSON line with the URL on stdout, then serves.

    `stop_on_stdin_eof`: shut down (jobs interrupted, resumable) when standard input reaches its end. The process that
    started the server closes the pipe to stop it, and the system closes it when that process dies: it reaches the
    server through launchers that do not pass signals on (Slicer's PythonSlicer runs python-real as a child)."""
    import uvicorn

    check_bind(host, token)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)  # clients that connect before uvicorn is up wait in the backlog instead of being refused
    bound = sock.getsockname()[1]
    url = f"http://{host if family == socket.AF_INET else f'[{host}]'}:{bound}"
    lock = hold_home(home, {"pid": os.getpid(), "url": url})  # noqa: F841 - held until this function returns
    app = create_app(home, token, max_upload_bytes)
    print(json.dumps({"event": "listening", "url": url, "home": str(Path(home).resolve()), "pid": os.getpid()}),
          flush=True)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=10, http=HeaderTimeoutProtocol)
    server = uvicorn.Server(config)
    if stop_on_stdin_eof:
        threading.Thread(target=_exit_at_end_of_input, args=(server,), daemon=True, name="stdin-eof").start()
    server.run(sockets=[sock])


def _exit_at_end_of_input(server) -> None:
    try:
        while sys.stdin.buffer.read(4096):
            pass
    except (OSError, ValueError, AttributeError):  # no usable stdin: the end of input as well
        pass
    server.should_exit = True  # uvicorn's graceful shutdown: the lifespan stops the jobs
