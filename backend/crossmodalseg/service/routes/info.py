"""Health and what the server offers (version, devices, methods and their options, limits)."""

from __future__ import annotations

from fastapi import APIRouter

from ... import __version__
from ..schemas import (
    HealthOut,
    InfoOut,
)
from ..store import LABEL_TAGS
from .common import Service


def info_router(svc: Service) -> APIRouter:
    router = APIRouter(tags=["info"])
    runner, max_upload_bytes = svc.runner, svc.max_upload_bytes

    @router.get("/health")
    def health() -> HealthOut:
        return {"status": "ok"}

    @router.get("/info")
    def info() -> InfoOut:
        from ...data.plan import PRESETS
        from ...methods import method_catalogue

        return {"version": __version__, "devices": runner.devices, **method_catalogue(),
                "presets": list(PRESETS), "label_tags": list(LABEL_TAGS), "max_upload_bytes": max_upload_bytes}

    return router
