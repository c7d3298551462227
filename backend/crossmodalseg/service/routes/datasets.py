"""Datasets, their cases, and the images and labels of each case (uploads checked before anything is stored)."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse

from ...data.io import Geometry
from ...data.spec import parse_spec
from ..schemas import (
    DatasetDetailOut,
    DatasetIn,
    DatasetOut,
    DeletedOut,
    UploadOut,
)
from ..store import NotFound, StoredFile, check_id, new_id
from ..uploads import StagedImage, UploadError, check_and_stage, check_same_grid, commit_staged, receive
from .common import BINARY_BODY, NRRD, Service, download


def datasets_router(svc: Service) -> APIRouter:
    router = APIRouter(tags=["datasets"])
    store, max_upload_bytes, readers = svc.store, svc.max_upload_bytes, svc.readers

    @router.post("/datasets", status_code=201)
    def create_dataset(body: DatasetIn) -> DatasetDetailOut:
        dataset_id = check_id(body.id, "dataset id") if body.id else new_id()
        parse_spec({"name": body.name, "labels": body.labels, "modalities": body.modalities, "cases": []},
                   store.home)  # the same rules as a dataset.json, every problem listed
        store.create_dataset(dataset_id, body.name, body.labels, body.modalities)
        return store.describe_dataset(dataset_id)

    @router.get("/datasets")
    def list_datasets() -> list[DatasetOut]:
        return store.datasets()

    @router.get("/datasets/{dataset_id}")
    def get_dataset(dataset_id: str) -> DatasetDetailOut:
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
            staged = await run_in_threadpool(readers.run, check_and_stage, tmp, kind,
                                             sorted(dataset["labels"].values()), store.home / "tmp")
        finally:
            tmp.unlink(missing_ok=True)
        try:
            stored = await run_in_threadpool(_commit, dataset, case_id, modality, kind, tag, staged)
        finally:
            staged.path.unlink(missing_ok=True)  # still there when the commit refused it
        return {"dataset": dataset_id, "case": case_id, "modality": modality, "kind": kind, "tag": tag or None,
                "sha256": stored.sha256, "geometry": stored.geometry}

    def _commit(dataset: dict[str, Any], case_id: str, modality: str, kind: str, tag: str,
                staged: StagedImage) -> StoredFile:
        geometry = staged.geometry
        folder = store.dataset_folder(dataset["id"], case_id)
        name = f"image_{modality}" if kind == "image" else f"label_{modality}_{tag}"
        with store.file_lock:
            # The grid check and the commit under one lock: an image and a label uploaded to one case at the same
            # moment cannot both pass against the state before the other (which left labels on a wrong grid).
            others = {(f["kind"], f["tag"]): f for f in store.files(dataset["id"], case_id)
                      if f["modality"] == modality}
            if kind == "label":
                if ("image", "") not in others:
                    raise UploadError(f"case {case_id!r} has no {modality!r} image yet; upload the image "
                                      f"before its label")
                check_same_grid(geometry, Geometry.from_json(others["image", ""]["geometry"]),
                                f"{modality} label of case {case_id!r}")
            else:
                for (other_kind, other_tag), f in others.items():
                    if other_kind == "label":
                        check_same_grid(Geometry.from_json(f["geometry"]), geometry,
                                        f"new {modality} image of case {case_id!r} vs its stored {other_tag} label")
            stored = StoredFile(commit_staged(staged, folder / name), staged.sha256, geometry.to_json())
            store.put_file(dataset["id"], case_id, kind, modality, tag, stored)
        return stored

    @router.put("/datasets/{dataset_id}/cases/{case_id}/images/{modality}", status_code=201, openapi_extra=BINARY_BODY)
    async def put_image(dataset_id: str, case_id: str, modality: str, request: Request) -> UploadOut:
        """The request body is the image file (NIfTI, NRRD or MetaImage)."""
        return await _upload(request, dataset_id, case_id, modality, "image")

    @router.put("/datasets/{dataset_id}/cases/{case_id}/labels/{modality}", status_code=201, openapi_extra=BINARY_BODY)
    async def put_label(dataset_id: str, case_id: str, modality: str, request: Request,
                        tag: Literal["final", "original"] = "final") -> UploadOut:
        """The body is a label map on the grid of the case's `modality` image; `final` = drawn or corrected by a
        clinician (trains models), `original` = a model's output (kept for comparison)."""
        return await _upload(request, dataset_id, case_id, modality, "label", tag)

    @router.get("/datasets/{dataset_id}/cases/{case_id}/images/{modality}", **download(NRRD, "the image as NRRD"))
    def get_image(dataset_id: str, case_id: str, modality: str) -> FileResponse:
        f = store.file(check_id(dataset_id, "dataset id"), check_id(case_id, "case id"), "image", modality)
        return FileResponse(f["path"], filename=f"{case_id}_{modality}.nrrd", media_type=NRRD)

    @router.get("/datasets/{dataset_id}/cases/{case_id}/labels/{modality}", **download(NRRD, "the label map as NRRD"))
    def get_label(dataset_id: str, case_id: str, modality: str,
                  tag: Literal["final", "original"] = "final") -> FileResponse:
        f = store.file(check_id(dataset_id, "dataset id"), check_id(case_id, "case id"), "label", modality, tag)
        return FileResponse(f["path"], filename=f"{case_id}_{modality}_{tag}.nrrd", media_type=NRRD)

    @router.delete("/datasets/{dataset_id}/cases/{case_id}")
    def delete_case(dataset_id: str, case_id: str) -> DeletedOut:
        with store.file_lock:  # not between an upload's (or a finished job's) check and its commit
            paths = store.delete_case(check_id(dataset_id, "dataset id"), check_id(case_id, "case id"))
            for p in paths:  # after the commit: a crash in between leaves only unreferenced files
                p.unlink(missing_ok=True)
        return {"deleted": case_id}

    return router
