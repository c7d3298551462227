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
import tempfile
import zipfile
import zlib
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.background import BackgroundTask

from .. import __version__
from ..data.io import Geometry, ImageError
from ..data.spec import DatasetError, parse_spec
from ..engine.checkpoint import MODEL_FILE, ModelFolderError
from ..errors import UserError, user_message
from .auth import check_bind, token_matches
from .jobs import JobRunner, append_event, job_progress
from .predictor_pool import PredictorPool, predict_in_worker, validate_model_in_worker
from .processes import hold_home
from .store import LABEL_TAGS, Conflict, NotFound, Store, StoredFile, check_id, new_id
from .uploads import (
    UploadError,
    check_same_grid,
    load_checked,
    receive,
    store_image,
    stream_to_file,
)

logger = logging.getLogger("crossmodalseg.service")


async def _drain(response) -> None:
    """Runs a GET response's body to its end unsent (its own background tasks, e.g. removing a temporary file)."""
    async for _ in response.body_iterator:
        pass
MAX_ARCHIVE_FILES = 64
EVENTS_PAGE = 500
# Bodies read as streams are declared here, so that the OpenAPI schema says what to send.
BINARY_BODY = {"requestBody": {"required": True, "content": {"application/octet-stream": {
    "schema": {"type": "string", "format": "binary"}}}}}
PREDICT_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["model"],
    "properties": {"model": {"type": "string"}, "members": {"type": "boolean"}, "uncertainty": {"type": "boolean"}},
    "additionalProperties": {"type": "string", "format": "binary", "description": "one image per modality"}}}}}}


class DatasetIn(BaseModel):
    id: str | None = Field(None, description="optional; generated when absent")
    name: str
    labels: dict[str, int] = Field(description='structure name -> label value, background 0, e.g. {"background": 0}')
    modalities: dict[str, str] = Field(description='modality name -> "CT" or "MR"')


class JobIn(BaseModel):
    kind: Literal["train", "finetune", "predict"]
    dataset: str | None = Field(None, description="train/finetune: the data; predict: with `case`, the input case")
    case: str | None = None
    model: str | None = Field(None, description="predict: the model; finetune: the model to start from")
    name: str | None = Field(None, description="a name for the model a training makes")
    method: str = "single"
    target: str | None = None
    assistants: list[str] = []
    preset: Literal["fast", "full"] = "fast"
    epochs: int | None = Field(None, ge=1)
    minutes: float | None = Field(None, gt=0)
    iterations_per_epoch: int | None = Field(None, ge=1)
    options: dict[str, float | int | bool | str] = Field(
        {}, description="the method's options (see GET /info), each a number, string or boolean")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    processes: int = Field(1, ge=1, le=64, description="DDP processes (one per GPU) under torchrun")
    seed: int = 0
    val_every: int = Field(5, ge=1)
    checkpoint_every: int = Field(1, ge=1)
    members: bool = False
    uncertainty: bool = False


def model_summary(meta: Any) -> dict[str, Any]:
    """What GET /models shows of a model.json; ModelFolderError naming the first field of the wrong shape."""
    def field(container: Any, key: str, kind: type | tuple[type, ...], where: str, required: bool = True) -> Any:
        if not isinstance(container, dict):
            raise ModelFolderError(f"model.json: {where or 'the file'} must be an object")
        if key not in container:
            if required:
                raise ModelFolderError(f"model.json: {where + '.' if where else ''}{key} is missing")
            return None
        value = container[key]
        if value is not None and not isinstance(value, kind):
            raise ModelFolderError(f"model.json: {where + '.' if where else ''}{key} has the wrong type")
        return value

    method, task = field(meta, "method", dict, ""), field(meta, "task", dict, "")
    training = field(meta, "training", dict, "", required=False) or {}
    return {"method": field(method, "name", str, "method"), "hparams": field(method, "hparams", dict, "method", False),
            "labels": field(task, "labels", dict, "task"), "modalities": field(task, "modalities", dict, "task"),
            "target": field(task, "target", str, "task"), "members": field(method, "members", dict, "method", False),
            "training": {k: training.get(k) for k in ("epochs", "iterations", "seconds", "val_dice", "val_on",
                                                        "init_from", "device")}}


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

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        runner.start()
        yield
        runner.stop()
        pool.shutdown()

    app = FastAPI(title="CrossModalSeg", version=__version__, lifespan=lifespan,
                  description="Cross-modality segmentation with few labels: datasets, training jobs, models, "
                              "prediction. Send `Authorization: Bearer <token>` when the server has a token.")
    app.state.store, app.state.runner = store, runner

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

    @app.middleware("http")
    async def head_like_get(request: Request, call_next):
        """HEAD on any GET route: the GET's status and headers, no body (HTTP requires HEAD wherever GET is)."""
        if request.method != "HEAD":
            return await call_next(request)
        request.scope["method"] = "GET"
        response = await call_next(request)
        return Response(status_code=response.status_code, headers=dict(response.headers),
                        background=BackgroundTask(_drain, response))

    @app.middleware("http")
    async def guard(request: Request, call_next):
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
        return await call_next(request)

    # ---- health and info ------------------------------------------------------------------------------------
    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/info")
    def info() -> dict[str, Any]:
        from ..methods import METHODS

        return {"version": __version__, "devices": runner.devices, "methods": {n: m.description for n, m in
                                                                               METHODS.items()},
                "method_options": {n: dict(m.default_hparams) for n, m in METHODS.items()},
                "presets": ["fast", "full"], "label_tags": list(LABEL_TAGS), "max_upload_bytes": max_upload_bytes}

    # ---- datasets -------------------------------------------------------------------------------------------
    @app.post("/datasets", status_code=201)
    def create_dataset(body: DatasetIn) -> dict[str, Any]:
        dataset_id = check_id(body.id, "dataset id") if body.id else new_id()
        parse_spec({"name": body.name, "labels": body.labels, "modalities": body.modalities, "cases": []},
                   store.home)  # the same rules as a dataset.json, every problem listed
        store.create_dataset(dataset_id, body.name, body.labels, body.modalities)
        return store.describe_dataset(dataset_id)

    @app.get("/datasets")
    def list_datasets() -> list[dict[str, Any]]:
        return store.datasets()

    @app.get("/datasets/{dataset_id}")
    def get_dataset(dataset_id: str) -> dict[str, Any]:
        return store.describe_dataset(check_id(dataset_id, "dataset id"))

    def _modality(dataset: dict[str, Any], modality: str) -> str:
        if modality not in dataset["modalities"]:
            raise NotFound(f"dataset {dataset['id']!r} has no modality {modality!r} (it has "
                           f"{', '.join(dataset['modalities'])})")
        return modality

    async def _upload(request: Request, dataset_id: str, case_id: str, modality: str, kind: str,
                      tag: str = "") -> dict[str, Any]:
        dataset = store.dataset(check_id(dataset_id, "dataset id"))
        check_id(case_id, "case id")
        _modality(dataset, modality)
        tmp = await receive(request.stream(), store.home / "tmp", max_upload_bytes)
        try:
            stored = await run_in_threadpool(_check_and_store, dataset, case_id, modality, kind, tag, tmp)
        finally:
            tmp.unlink(missing_ok=True)
        return {"dataset": dataset_id, "case": case_id, "modality": modality, "kind": kind, "tag": tag or None,
                "sha256": stored.sha256, "geometry": stored.geometry}

    def _check_and_store(dataset: dict[str, Any], case_id: str, modality: str, kind: str, tag: str,
                         tmp: Path) -> StoredFile:
        label_values = sorted(dataset["labels"].values())
        image = load_checked(tmp, kind, label_values)
        geometry = Geometry.of(image)
        folder = store.dataset_folder(dataset["id"], case_id)
        name = f"image_{modality}" if kind == "image" else f"label_{modality}_{tag}"
        with store.file_lock:
            # The grid check and the commit under one lock: an image and a label uploaded to one case at the same
            # moment cannot both pass against the state before the other (which left labels on a wrong grid).
            others = {(f["kind"], f["tag"]): f for f in store.files(dataset["id"], case_id)
                      if f["modality"] == modality}
            if kind == "label":
                if ("image", "") not in others:
                    raise UploadError(f"case {case_id!r} has no {modality!r} image yet; upload the image before its "
                                      f"label")
                check_same_grid(geometry, Geometry.from_json(others["image", ""]["geometry"]),
                                f"{modality} label of case {case_id!r}")
            else:
                for (other_kind, other_tag), f in others.items():
                    if other_kind == "label":
                        check_same_grid(Geometry.from_json(f["geometry"]), geometry,
                                        f"new {modality} image of case {case_id!r} vs its stored {other_tag} label")
            path, sha = store_image(image, folder / name)
            stored = StoredFile(path, sha, geometry.to_json())
            store.put_file(dataset["id"], case_id, kind, modality, tag, stored)
        return stored

    @app.put("/datasets/{dataset_id}/cases/{case_id}/images/{modality}", status_code=201, openapi_extra=BINARY_BODY)
    async def put_image(dataset_id: str, case_id: str, modality: str, request: Request) -> dict[str, Any]:
        """The request body is the image file (NIfTI, NRRD or MetaImage)."""
        return await _upload(request, dataset_id, case_id, modality, "image")

    @app.put("/datasets/{dataset_id}/cases/{case_id}/labels/{modality}", status_code=201, openapi_extra=BINARY_BODY)
    async def put_label(dataset_id: str, case_id: str, modality: str, request: Request,
                        tag: Literal["final", "original"] = "final") -> dict[str, Any]:
        """The body is a label map on the grid of the case's `modality` image; `final` = drawn or corrected by a
        clinician (trains models), `original` = a model's output (kept for comparison)."""
        return await _upload(request, dataset_id, case_id, modality, "label", tag)

    @app.get("/datasets/{dataset_id}/cases/{case_id}/images/{modality}")
    def get_image(dataset_id: str, case_id: str, modality: str) -> FileResponse:
        f = store.file(check_id(dataset_id, "dataset id"), check_id(case_id, "case id"), "image", modality)
        return FileResponse(f["path"], filename=f"{case_id}_{modality}.nrrd")

    @app.get("/datasets/{dataset_id}/cases/{case_id}/labels/{modality}")
    def get_label(dataset_id: str, case_id: str, modality: str,
                  tag: Literal["final", "original"] = "final") -> FileResponse:
        f = store.file(check_id(dataset_id, "dataset id"), check_id(case_id, "case id"), "label", modality, tag)
        return FileResponse(f["path"], filename=f"{case_id}_{modality}_{tag}.nrrd")

    @app.delete("/datasets/{dataset_id}/cases/{case_id}")
    def delete_case(dataset_id: str, case_id: str) -> dict[str, Any]:
        with store.file_lock:  # not between an upload's (or a finished job's) check and its commit
            paths = store.delete_case(check_id(dataset_id, "dataset id"), check_id(case_id, "case id"))
            for p in paths:  # after the commit: a crash in between leaves only unreferenced files
                p.unlink(missing_ok=True)
        return {"deleted": case_id}

    # ---- jobs -----------------------------------------------------------------------------------------------
    def _job_view(job: dict[str, Any]) -> dict[str, Any]:
        events = runner.events(job["id"])
        params = dict(job["params"])
        if isinstance(params.get("images"), dict):  # the stored files a predict job reads: modality names only
            params["images"] = sorted(params["images"])
        return {**{k: job[k] for k in ("id", "kind", "state", "created", "started", "finished", "model", "devices",
                                       "result")}, "params": params, "error": redact(job["error"]),
                "resumed": job["resume"], "progress": job_progress(events), "events": len(events)}

    @app.post("/jobs", status_code=202)
    def submit_job(body: JobIn) -> dict[str, Any]:
        params = body.model_dump()
        model_id = None
        if body.kind in ("train", "finetune"):
            dataset = store.dataset(check_id(body.dataset or "", "dataset id"))
            if body.kind == "finetune":
                base = store.ready_model(check_id(body.model or "", "model id"))["meta"]
                params.update(base_model=body.model, method=base["method"]["name"], target=base["task"]["target"],
                              assistants=base["task"]["assistants"])
            from ..methods import METHODS

            if params["method"] not in METHODS:
                raise UserError(f"unknown method {params['method']!r}; choose one of {', '.join(METHODS)}")
            params["options"] = METHODS[params["method"]].check_options(params["options"])
            for m in [params["target"], *params["assistants"]]:
                if m not in dataset["modalities"]:
                    raise UserError(f"modality {m!r} is not in dataset {dataset['id']!r} (it has "
                                     f"{', '.join(dataset['modalities'])}); set `target` (and `assistants`)")
            model_id = new_id()
        else:
            model = store.ready_model(check_id(body.model or "", "model id"))
            if not (body.dataset and body.case):
                raise UserError("a predict job needs `dataset` and `case` (or use POST /predict with the images)")
            files = store.files(check_id(body.dataset, "dataset id"), check_id(body.case, "case id"))
            wanted = model["meta"]["task"]["modalities"]
            images = {f["modality"]: str(f["path"]) for f in files if f["kind"] == "image" and f["modality"] in wanted}
            if not images:
                raise UserError(f"case {body.case!r} has none of the model's modalities ({', '.join(wanted)})")
            params["images"] = images
        job_id = store.create_job(body.kind, params, model=model_id)
        folder = store.job_folder(job_id)
        folder.mkdir(parents=True, exist_ok=True)
        append_event(folder / "events.jsonl", "queued")
        return _job_view(store.job(job_id))

    @app.get("/jobs")
    def list_jobs(state: str | None = None) -> list[dict[str, Any]]:
        return [_job_view(j) for j in store.jobs((state,) if state else None)]

    @app.get("/jobs/{job_id}")
    def get_job(job_id: str) -> dict[str, Any]:
        return _job_view(store.job(check_id(job_id, "job id")))

    @app.get("/jobs/{job_id}/events")
    def job_events(job_id: str, after: int = 0, limit: int = EVENTS_PAGE) -> dict[str, Any]:
        """Events after the first `after` ones (paging: pass back `next`)."""
        store.job(check_id(job_id, "job id"))
        events = runner.events(job_id)
        page = events[max(after, 0): max(after, 0) + max(1, min(limit, EVENTS_PAGE))]
        return {"events": page, "next": max(after, 0) + len(page), "total": len(events)}

    @app.delete("/jobs/{job_id}")
    def cancel_job(job_id: str) -> dict[str, Any]:
        runner.cancel(check_id(job_id, "job id"))
        return _job_view(store.job(job_id))

    @app.post("/jobs/{job_id}/resume")
    def resume_job(job_id: str) -> dict[str, Any]:
        runner.resume(check_id(job_id, "job id"))
        return _job_view(store.job(job_id))

    @app.get("/jobs/{job_id}/files/{name}")
    def job_file(job_id: str, name: str) -> FileResponse:
        path = store.job_folder(check_id(job_id, "job id")) / "output" / check_id(name, "file name")
        if not path.is_file():
            raise NotFound(f"job {job_id} has no output file {name!r}")
        return FileResponse(path, filename=name)

    # ---- models ---------------------------------------------------------------------------------------------
    def _model_view(model: dict[str, Any]) -> dict[str, Any]:
        view = {"id": model["id"], "name": model["name"], "state": model["state"], "job": model["job"],
                "created": model["created"]}
        if not model["meta"]:
            return view
        try:
            return {**view, **model_summary(model["meta"])}
        except ModelFolderError as e:  # stored before imports were checked: listed as unusable, never a 500
            return {**view, "state": "unreadable", "error": redact(str(e))}

    @app.get("/models")
    def list_models() -> list[dict[str, Any]]:
        return [_model_view(m) for m in store.models()]

    @app.get("/models/{model_id}")
    def get_model(model_id: str) -> dict[str, Any]:
        return _model_view(store.model(check_id(model_id, "model id")))

    @app.get("/models/{model_id}/archive")
    def export_model(model_id: str) -> FileResponse:
        store.ready_model(check_id(model_id, "model id"))
        folder = store.model_folder(model_id)
        fd, name = tempfile.mkstemp(dir=store.home / "tmp", suffix=".zip")
        os.close(fd)
        with zipfile.ZipFile(name, "w", zipfile.ZIP_DEFLATED) as z:
            for p in sorted(folder.glob("*.safetensors")) + [folder / MODEL_FILE]:
                z.write(p, p.name)
        return FileResponse(name, filename=f"crossmodalseg-model-{model_id}.zip", media_type="application/zip",
                            background=BackgroundTask(os.unlink, name))

    @app.post("/models", status_code=201, openapi_extra={"requestBody": {"required": True, "content": {
        "application/zip": {"schema": {"type": "string", "format": "binary"}}}}})
    async def import_model(request: Request, name: str | None = None) -> dict[str, Any]:
        """The body is a model archive (zip of model.json and *.safetensors, as GET /models/{id}/archive makes)."""
        tmp = await stream_to_file(request.stream(), store.home / "tmp", max_upload_bytes, ".zip")
        model_id = new_id()
        staging = Path(tempfile.mkdtemp(dir=store.home / "models", prefix=".import-"))
        try:
            await run_in_threadpool(_extract_model_archive, tmp, staging, max_upload_bytes)
            meta = await pool.run(validate_model_in_worker, str(staging))
            model_summary(meta)  # what GET /models shows must be readable, or the archive is refused
            os.replace(staging, store.model_folder(model_id))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            tmp.unlink(missing_ok=True)
        store.add_model(model_id, name or f"imported {meta['method']['name']} model", meta)
        return _model_view(store.model(model_id))

    # ---- synchronous prediction -----------------------------------------------------------------------------
    @app.post("/predict", openapi_extra=PREDICT_BODY, response_class=FileResponse,
              responses={200: {"content": {"application/zip": {}}, "description": "the prediction as a zip"}})
    async def predict(request: Request) -> FileResponse:
        """multipart/form-data: `model` (id), one file field per modality (e.g. `ct`), optional `members` and
        `uncertainty` ("true"). Answers a zip: segmentation.nrrd (label values of the model's labels, on the grid
        of the target image, or of the first given), member label maps, the disagreement map, segmentation.json."""
        if "content-length" not in request.headers:
            raise UploadError("send the Content-Length header with the images", 411)
        form = await request.form(max_files=16, max_fields=16)
        model_id = check_id(str(form.get("model") or ""), "model id")
        model = store.ready_model(model_id)
        wanted = model["meta"]["task"]["modalities"]
        work = Path(tempfile.mkdtemp(dir=store.home / "tmp", prefix="predict-"))
        try:
            images: dict[str, str] = {}
            for key, value in form.multi_items():
                if key in ("model", "members", "uncertainty"):
                    continue
                if not hasattr(value, "read"):
                    raise UserError(f"form field {key!r}: expected an image file for modality {key!r}")
                if key not in wanted:
                    raise UserError(f"this model uses modalities {', '.join(wanted)}; {key!r} is not one of them")
                tmp = await receive(_chunks(value), work, max_upload_bytes)
                await run_in_threadpool(load_checked, tmp, "image")
                images[key] = str(tmp)
            if not images:
                raise UserError(f"no image given: add a file field named after a modality ({', '.join(wanted)})")
            flag = lambda k: str(form.get(k, "")).lower() in ("1", "true", "yes")  # noqa: E731
            outputs = await pool.run(predict_in_worker, str(store.model_folder(model_id)), images, str(work / "out"),
                                     flag("members"), flag("uncertainty"), "auto")
            archive = work / "prediction.zip"
            with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
                for path in outputs.values():
                    z.write(path, Path(path).name)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        finally:
            await form.close()
        return FileResponse(archive, media_type="application/zip", filename="prediction.zip",
                            background=BackgroundTask(shutil.rmtree, work, True))

    return app


async def _chunks(upload, size: int = 1 << 20):
    while True:
        chunk = await upload.read(size)
        if not chunk:
            return
        yield chunk


def _extract_model_archive(archive: Path, folder: Path, limit_bytes: int) -> None:
    """Only model.json and flat *.safetensors files; sizes checked before extraction (no zip bombs)."""
    try:
        z = zipfile.ZipFile(archive)
    except zipfile.BadZipFile:
        raise UploadError("not a zip archive; export one with GET /models/{id}/archive") from None
    with z:
        entries = z.infolist()
        names = [e.filename for e in entries]
        if MODEL_FILE not in names:
            raise UploadError(f"the archive holds no {MODEL_FILE}")
        bad = [n for n in names if n != MODEL_FILE and not (n.endswith(".safetensors") and "/" not in n
                                                              and "\\" not in n and not n.startswith("."))]
        if bad or len(entries) > MAX_ARCHIVE_FILES:
            raise UploadError(f"a model archive may hold only {MODEL_FILE} and *.safetensors files; found "
                              f"{', '.join(bad[:5]) or f'{len(entries)} files'}")
        if len(set(names)) != len(names):
            raise UploadError("the archive holds a file twice; export it again with GET /models/{id}/archive")
        if sum(e.file_size for e in entries) > 4 * limit_bytes:
            raise UploadError("the archive unpacks to more than the server accepts")
        for e in entries:
            if e.flag_bits & 0x1:
                raise UploadError(f"{e.filename} in the archive is encrypted; export the model without a password")
            try:
                with z.open(e) as src, open(folder / e.filename, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as error:
                # A bad CRC, corrupt deflate data, a compression method zipfile cannot read: the client's file.
                raise UploadError(f"{e.filename} in the archive cannot be unpacked ({type(error).__name__}: "
                                  f"{str(error)[:120]}); export the model again") from None
    try:
        meta = json.loads((folder / MODEL_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise UploadError(f"{MODEL_FILE} in the archive is not valid JSON") from None
    if not isinstance(meta, dict):
        raise UploadError(f"{MODEL_FILE} in the archive must hold a JSON object")


def serve(home: Path, host: str = "127.0.0.1", port: int = 8765, token: str | None = None,
          max_upload_bytes: int = 2 << 30) -> None:
    """Binds first (port 0 = a free one), prints one JSON line with the URL on stdout, then serves."""
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
    uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=10)).run(sockets=[sock])
