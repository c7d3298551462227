"""Synchronous prediction of one case: images in (multipart), a zip of the label maps out; a prediction named by
its client (`?request=<id>`) can be cancelled, and one whose client goes away stops."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import zipfile
from pathlib import Path

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask

from ...errors import UserError
from ..predictor_pool import PredictionAbandoned, predict_in_worker
from ..schemas import CancelledPredictionOut
from ..store import Conflict, NotFound, check_id
from ..uploads import check_image, read_form, receive
from .common import Service, download

PREDICT_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["model"],
    "properties": {"model": {"type": "string"}, "members": {"type": "boolean"}, "uncertainty": {"type": "boolean"}},
    "additionalProperties": {"type": "string", "format": "binary", "description": "one image per modality"}}}}}}


def predict_router(svc: Service) -> APIRouter:
    router = APIRouter(tags=["predict"])
    store, pool, max_upload_bytes = svc.store, svc.pool, svc.max_upload_bytes
    cancelled: dict[str, asyncio.Event] = {}  # request id -> set once its client cancels it

    @router.post("/predict", openapi_extra=PREDICT_BODY, **download("application/zip", "the prediction as a zip"))
    async def predict(request: Request, request_id: str | None = Query(None, alias="request", description=(
            "an id the client chooses (e.g. a UUID), to cancel this prediction with DELETE /predict/{id}"))
            ) -> FileResponse:
        """multipart/form-data: `model` (id), one file field per modality (e.g. `ct`), optional `members` and
        `uncertainty` ("true"). Answers a zip: segmentation.nrrd (label values of the model's labels, on the grid
        of the target image, or of the first given), member label maps, the disagreement map, segmentation.json.
        A prediction cancelled, or whose client disconnects, stops (409) and frees the worker for the next one."""
        if request_id is None:
            return await _predict(request, asyncio.Event())
        check_id(request_id, "request id")
        if request_id in cancelled:
            raise Conflict(f"a prediction with request id {request_id!r} is under way; choose a new id")
        cancelled[request_id] = asyncio.Event()
        try:
            return await _predict(request, cancelled[request_id])
        finally:
            del cancelled[request_id]

    @router.delete("/predict/{request_id}")
    async def cancel_prediction(request_id: str) -> CancelledPredictionOut:
        """Cancels the prediction posted with `?request=<request_id>`: it answers 409 at once, and stops in the
        worker if it had started there. (async: it runs on the event loop, as asyncio.Event needs.)"""
        event = cancelled.get(check_id(request_id, "request id"))
        if event is None:
            raise NotFound(f"no prediction {request_id!r} is under way (it may have ended already)")
        event.set()
        return {"request": request_id, "cancelled": True}

    async def _predict(request: Request, cancel: asyncio.Event) -> FileResponse:
        async def abandoned() -> str | None:
            if cancel.is_set():
                return "the prediction was cancelled by its client"
            if await request.is_disconnected():
                return "the prediction's client went away"
            return None

        form = await read_form(request, max_files=16, max_fields=16)
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
                await run_in_threadpool(svc.readers.run, check_image, tmp)
                images[key] = str(tmp)
            if not images:
                raise UserError(f"no image given: add a file field named after a modality ({', '.join(wanted)})")
            flag = lambda k: str(form.get(k, "")).lower() in ("1", "true", "yes")  # noqa: E731
            if reason := await abandoned():  # cancelled while its images came
                raise PredictionAbandoned(reason)
            outputs = await pool.run(predict_in_worker, str(store.model_folder(model_id)), images, str(work / "out"),
                                     flag("members"), flag("uncertainty"), "auto", abandoned=abandoned)
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

    return router


async def _chunks(upload, size: int = 1 << 20):
    while True:
        chunk = await upload.read(size)
        if not chunk:
            return
        yield chunk
