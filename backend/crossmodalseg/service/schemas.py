"""What the HTTP API accepts and answers, as typed models (the OpenAPI schema is generated from them).

A training job's body is the run configuration's client-facing part (`config.TrainSettings`) plus the job's own
fields, so the API, the CLI and the worker share one definition of a run. Every model is strict (`StrictModel`):
unknown fields, NaN/Inf, out-of-range numbers and control characters are a 422 at submission, before anything is
stored. JSON bodies themselves are bounded in size and depth before they are parsed (`JsonBodyGate`).
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..config import Device, Identifier, RunBudget, StrictModel, Text, TrainSettings

MAX_JSON_BYTES = 1 << 20
MAX_JSON_DEPTH = 16
JSON_BODY_TIMEOUT_S = 30.0
MAX_PROCESSES = 64


class ErrorOut(BaseModel):
    detail: str = Field(description="what went wrong and what to do about it")


ERROR_STATUSES = {400: "the request cannot be carried out as it is", 401: "missing or wrong token",
                  404: "no such dataset, case, job or model", 408: "the upload stalled or trickled",
                  409: "conflicts with the current state", 411: "Content-Length required",
                  413: "body larger than the server accepts", 415: "not an image file", 422: "invalid request: the fields, an image or an "
                  "archive", 503: "out of GPU memory or a prediction worker failed",
                  507: "the server's disk is nearly full"}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {status: {"model": ErrorOut, "description": text}
                                                    for status, text in ERROR_STATUSES.items()}


class DatasetIn(StrictModel):
    id: Identifier | None = Field(None, description="optional; generated when absent")
    name: Text
    labels: dict[Text, int] = Field(max_length=256,
                                    description='structure name -> label value, background 0, e.g. {"background": 0}')
    modalities: dict[Identifier, Text] = Field(max_length=16, description='modality name -> "CT" or "MR"')


class TrainJob(TrainSettings):
    """Train a new model on a dataset (the fields after `kind`, `dataset`, `name` and `processes` are the run's
    settings, as the CLI's `train` options)."""
    kind: Literal["train"]
    dataset: Identifier
    name: Text | None = Field(None, description="a name for the model the training makes")
    processes: int = Field(1, ge=1, le=MAX_PROCESSES, description="DDP processes (one per GPU) under torchrun")


class FinetuneJob(RunBudget):
    """Fine-tune a model on a dataset (with its corrections): method, modalities and options are the model's."""
    kind: Literal["finetune"]
    dataset: Identifier
    model: Identifier = Field(description="the model to start from")
    name: Text | None = None
    processes: int = Field(1, ge=1, le=MAX_PROCESSES)


class PredictJob(StrictModel):
    """Segment a stored case; the result is stored as the case's `original` label."""
    kind: Literal["predict"]
    model: Identifier
    dataset: Identifier
    case: Identifier
    members: bool = False
    uncertainty: bool = False
    device: Device = "auto"


JobIn = Annotated[TrainJob | FinetuneJob | PredictJob, Field(discriminator="kind")]


# ---- JSON bodies: bounded before parsing -------------------------------------------------------------------------
class JsonBodyError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _reject_constant(name: str) -> Any:
    raise JsonBodyError(422, f"{name} is not a JSON number; send finite numbers")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 parses as infinity
        raise JsonBodyError(422, f"the number {text[:40]} is out of range; send finite numbers")
    return value


def check_json_body(body: bytes) -> None:
    """Refuses what the typed models cannot refuse cleanly: NaN/Infinity literals, nesting deeper than
    MAX_JSON_DEPTH (a deep document costs recursion before any field is checked). Invalid JSON is left to the
    request's validation (422 naming the position)."""
    try:
        value = json.loads(body, parse_constant=_reject_constant, parse_float=_finite)
    except RecursionError:
        raise JsonBodyError(422, f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError):
        return
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise JsonBodyError(422, f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, depth + 1) for child in children)


class JsonBodyGate:
    """ASGI middleware for the routes that take a JSON body: reads it (chunked or not) up to MAX_JSON_BYTES within
    JSON_BODY_TIMEOUT_S, answers 413 past that size, 408 past that time and 422 for NaN/Infinity or deep nesting,
    and hands the body on unchanged."""

    def __init__(self, app, routes: set[tuple[str, str]]):
        self.app, self.routes = app, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or (scope["method"], scope["path"]) not in self.routes:
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        deadline = asyncio.get_running_loop().time() + JSON_BODY_TIMEOUT_S
        while True:
            try:
                message = await asyncio.wait_for(receive(), deadline - asyncio.get_running_loop().time())
            except (asyncio.TimeoutError, ValueError):
                return await _answer(send, 408, f"the JSON body did not arrive within {JSON_BODY_TIMEOUT_S:.0f} s")
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_JSON_BYTES:
                return await _answer(send, 413, f"JSON body larger than {MAX_JSON_BYTES // 1024} KiB")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            check_json_body(body)
        except JsonBodyError as e:
            return await _answer(send, e.status, str(e))
        delivered = False

        async def replay():
            nonlocal delivered
            if delivered:
                return await receive()  # after the body: the disconnect, when it comes
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


async def _answer(send, status: int, detail: str) -> None:
    payload = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


# ---- answers: what the routes return, documented exactly ----------------------------------------------------------
class Answer(BaseModel):
    """A response body; `extra="forbid"` makes its schema say exactly which fields come back."""
    model_config = ConfigDict(extra="forbid")


class HealthOut(Answer):
    status: Literal["ok"]


class InfoOut(Answer):
    version: str
    devices: list[str]
    methods: dict[str, str] = Field(description="method name -> what it is for")
    method_options: dict[str, dict[str, Any]] = Field(description="method name -> its options and their defaults")
    presets: list[str]
    label_tags: list[str]
    max_upload_bytes: int


class DatasetOut(Answer):
    id: str
    name: str
    labels: dict[str, int]
    modalities: dict[str, str]
    created: float


class StoredFileOut(Answer):
    sha256: str
    geometry: dict[str, Any] = Field(description="size, spacing, origin, direction (LPS)")
    created: float


class CaseOut(Answer):
    id: str
    images: dict[str, StoredFileOut] = Field(description="modality -> image")
    labels: dict[str, dict[str, StoredFileOut]] = Field(description="modality -> tag (final, original) -> label")


class DatasetDetailOut(DatasetOut):
    cases: list[CaseOut]


class UploadOut(Answer):
    dataset: str
    case: str
    modality: str
    kind: Literal["image", "label"]
    tag: str | None
    sha256: str
    geometry: dict[str, Any]


class DeletedOut(Answer):
    deleted: str


class CancelledPredictionOut(Answer):
    request: str
    cancelled: bool


class ProgressOut(Answer):
    fraction: float
    eta_s: float | None
    epoch: int | None
    epochs: int | None
    metrics: dict[str, Any] = Field(description="the last loss and validation Dice")


JobState = Literal["queued", "running", "succeeded", "failed", "cancelled", "interrupted"]


class JobOut(Answer):
    id: str
    kind: Literal["train", "finetune", "predict"]
    state: JobState
    created: float
    started: float | None
    finished: float | None
    model: str | None = Field(description="the model a training makes")
    devices: list[str] | None
    result: dict[str, Any] | None
    params: dict[str, Any] = Field(description="the job as submitted (a predict job's images as modality names)")
    error: str | None
    resumed: bool
    progress: ProgressOut
    events: int = Field(description="how many events the job has logged (GET /jobs/{id}/events)")


class EventsOut(Answer):
    events: list[dict[str, Any]]
    next: int = Field(description="pass as `after` for the next page")
    total: int


class ModelOut(Answer):
    id: str
    name: str
    state: str = Field(description="training, ready, failed, cancelled, interrupted or unreadable")
    job: str | None
    created: float
    method: str | None = None
    hparams: dict[str, Any] | None = None
    labels: dict[str, int] | None = None
    modalities: dict[str, str] | None = None
    target: str | None = None
    members: dict[str, list[str]] | None = None
    training: dict[str, Any] | None = None
    error: str | None = Field(None, description="why an unreadable model cannot be used")
