"""Jobs: train, fine-tune and predict in worker processes; state, paged events, cancel and resume."""

from __future__ import annotations

import os
from typing import Any

from fastapi import APIRouter
from fastapi.responses import FileResponse

from ...config import ConfigError
from ...errors import UserError
from ..jobs import append_event, job_progress
from ..schemas import (
    EventsOut,
    FinetuneJob,
    JobIn,
    JobOut,
    JobState,
    PredictJob,
    TrainJob,
)
from ..store import NotFound, check_id, new_id
from .common import Service, download

EVENTS_PAGE = 500


def jobs_router(svc: Service) -> APIRouter:
    router = APIRouter(tags=["jobs"])
    store, runner, redact = svc.store, svc.runner, svc.redact

    def _job_view(job: dict[str, Any]) -> dict[str, Any]:
        events = runner.events(job["id"])
        params = dict(job["params"])
        if isinstance(params.get("images"), dict):  # the stored files a predict job reads: modality names only
            params["images"] = sorted(params["images"])
        return {**{k: job[k] for k in ("id", "kind", "state", "created", "started", "finished", "model", "devices",
                                       "result")}, "params": params, "error": redact(job["error"]),
                "resumed": job["resume"], "progress": job_progress(events), "events": len(events)}

    def _check_devices(device: str, processes: int) -> None:
        """A job this server could never run is refused now, not left queued forever."""
        gpus = [d for d in runner.devices if d.startswith("cuda")]
        if device == "cuda" and not gpus:
            raise ConfigError("this server has no GPU: use device 'auto' or 'cpu'")
        on_gpu = runner.device_type(device) == "cuda"
        most = len(gpus) if on_gpu else max(2, os.cpu_count() or 1)
        if processes > most:
            raise ConfigError(f"processes: {processes} asked, this server runs at most {most} "
                              f"({'one per GPU' if on_gpu else 'CPU processes'})")

    @router.post("/jobs", status_code=202)
    def submit_job(body: JobIn) -> JobOut:
        params = body.model_dump()
        model_id = None
        _check_devices(body.device, getattr(body, "processes", 1))
        if isinstance(body, (TrainJob, FinetuneJob)):
            dataset = store.dataset(check_id(body.dataset, "dataset id"))
            if isinstance(body, FinetuneJob):
                base = store.ready_model(check_id(body.model, "model id"))["meta"]
                params.update(base_model=body.model, method=base["method"]["name"], target=base["task"]["target"],
                              assistants=base["task"]["assistants"], options={})
            else:
                from ...methods import METHODS

                local = [k for k in body.options if k in METHODS[body.method].Options.local_files]
                if local:
                    raise ConfigError(f"options {', '.join(local)} name files on the training machine: give them "
                                      f"on its command line (crossmodalseg train --option), not over HTTP")
                if body.target is None:
                    raise ConfigError(f"target: the modality to segment is missing (dataset {dataset['id']!r} has "
                                      f"{', '.join(dataset['modalities'])})")
            for m in [params["target"], *params["assistants"]]:
                if m not in dataset["modalities"]:
                    raise UserError(f"modality {m!r} is not in dataset {dataset['id']!r} (it has "
                                     f"{', '.join(dataset['modalities'])}); set `target` (and `assistants`)")
            model_id = new_id()
        else:
            assert isinstance(body, PredictJob)
            model = store.ready_model(check_id(body.model, "model id"))
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

    @router.get("/jobs")
    def list_jobs(state: JobState | None = None) -> list[JobOut]:
        return [_job_view(j) for j in store.jobs((state,) if state else None)]

    @router.get("/jobs/{job_id}")
    def get_job(job_id: str) -> JobOut:
        return _job_view(store.job(check_id(job_id, "job id")))

    @router.get("/jobs/{job_id}/events")
    def job_events(job_id: str, after: int = 0, limit: int = EVENTS_PAGE) -> EventsOut:
        """Events after the first `after` ones (paging: pass back `next`)."""
        store.job(check_id(job_id, "job id"))
        events = runner.events(job_id)
        page = events[max(after, 0): max(after, 0) + max(1, min(limit, EVENTS_PAGE))]
        return {"events": page, "next": max(after, 0) + len(page), "total": len(events)}

    @router.delete("/jobs/{job_id}")
    def cancel_job(job_id: str) -> JobOut:
        runner.cancel(check_id(job_id, "job id"))
        return _job_view(store.job(job_id))

    @router.post("/jobs/{job_id}/resume")
    def resume_job(job_id: str) -> JobOut:
        runner.resume(check_id(job_id, "job id"))
        return _job_view(store.job(job_id))

    @router.get("/jobs/{job_id}/files/{name}", **download("application/octet-stream", "an output file of the job"))
    def job_file(job_id: str, name: str) -> FileResponse:
        path = store.job_folder(check_id(job_id, "job id")) / "output" / check_id(name, "file name")
        if not path.is_file():
            raise NotFound(f"job {job_id} has no output file {name!r}")
        return FileResponse(path, filename=name, media_type="application/octet-stream")

    return router
