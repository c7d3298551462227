"""What every router uses: the server's parts, and the OpenAPI declarations of streamed bodies and file answers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi.responses import FileResponse

from ..jobs import JobRunner
from ..predictor_pool import PredictorPool
from ..store import Store
from ..uploads import ImageReaders


@dataclass
class Service:
    store: Store
    runner: JobRunner
    pool: PredictorPool
    readers: ImageReaders  # every uploaded image is read in one of these processes
    max_upload_bytes: int
    redact: Callable[[str | None], str | None]  # replaces the server's folders in any text a client sees


# Bodies read as streams are declared here, so that the OpenAPI schema says what to send.
BINARY_BODY = {"requestBody": {"required": True, "content": {"application/octet-stream": {
    "schema": {"type": "string", "format": "binary"}}}}}
NRRD = "application/octet-stream"  # NRRD has no registered media type


def download(media_type: str, description: str) -> dict[str, Any]:
    """A route's arguments for a file answer: documented with its media type instead of JSON."""
    return {"response_class": FileResponse, "responses": {200: {"description": description, "content": {
        media_type: {"schema": {"type": "string", "format": "binary"}}}}}}
