"""Models: list, describe, export and import as zip archives (model.json + safetensors, never pickles)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from pydantic import ValidationError
from starlette.background import BackgroundTask

from ...engine.checkpoint import MODEL_FILE, ModelFolderError
from ..predictor_pool import validate_model_in_worker
from ..schemas import (
    DeletedOut,
    ModelOut,
)
from ..store import check_id, new_id
from ..uploads import UploadError, stream_to_file
from .common import Service, download

MAX_ARCHIVE_FILES = 64


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
    summary = {"method": field(method, "name", str, "method"),
               "hparams": field(method, "hparams", dict, "method", False),
               "labels": field(task, "labels", dict, "task"), "modalities": field(task, "modalities", dict, "task"),
               "target": field(task, "target", str, "task"),
               "members": field(method, "members", dict, "method", False),
               "training": {k: training.get(k) for k in ("epochs", "iterations", "seconds", "val_dice", "val_on",
                                                           "init_from", "device")}}
    # The answer's own schema, down to the values inside (members {"x": 5} once passed, was stored, and made every
    # later GET /models answer 500).
    try:
        ModelOut.model_validate({"id": "-", "name": "-", "state": "ready", "job": None, "created": 0.0, **summary},
                                strict=True)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ModelFolderError(f"model.json: {where}: {first['msg']}") from None
    return summary




def models_router(svc: Service) -> APIRouter:
    router = APIRouter(tags=["models"])
    store, pool, max_upload_bytes, redact = svc.store, svc.pool, svc.max_upload_bytes, svc.redact

    def _model_view(model: dict[str, Any]) -> dict[str, Any]:
        view = {"id": model["id"], "name": model["name"], "state": model["state"], "job": model["job"],
                "created": model["created"]}
        if not model["meta"]:
            return view
        try:
            return {**view, **model_summary(model["meta"])}
        except ModelFolderError as e:  # stored before imports were checked: listed as unusable, never a 500
            return {**view, "state": "unreadable", "error": redact(str(e))}

    @router.get("/models")
    def list_models() -> list[ModelOut]:
        return [_model_view(m) for m in store.models()]

    @router.get("/models/{model_id}")
    def get_model(model_id: str) -> ModelOut:
        return _model_view(store.model(check_id(model_id, "model id")))

    @router.delete("/models/{model_id}")
    def delete_model(model_id: str) -> DeletedOut:
        """Deletes a model and its files (409 while a job makes or uses it): imported models could fill the disk
        with no way to free it through the API."""
        folder = store.delete_model(check_id(model_id, "model id"))
        shutil.rmtree(folder, ignore_errors=True)  # after the commit: a crash in between leaves only a stray folder
        return {"deleted": model_id}

    @router.get("/models/{model_id}/archive", **download("application/zip", "model.json and the weights, zipped"))
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

    @router.post("/models", status_code=201, openapi_extra={"requestBody": {"required": True, "content": {
        "application/zip": {"schema": {"type": "string", "format": "binary"}}}}})
    async def import_model(request: Request, name: str | None = None) -> ModelOut:
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

    return router


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
        if sum(e.file_size for e in entries) > limit_bytes + (1 << 20):  # weights hardly compress
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


