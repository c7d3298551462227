"""Jobs (train, fine-tune, predict) run in worker processes, never in the web process.

One job per device at a time, first come first served; a DDP training job takes as many devices as processes.
A worker is the CLI in its own process group: its JSON-lines events go to the job's `events.jsonl`, its stderr to
`worker.log`, and cancel ends the whole group (torchrun and its ranks included).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ..config import TrainConfig
from ..data.io import Geometry, read_image
from ..data.spec import write_json_atomic
from ..engine.checkpoint import MODEL_FILE, latest_checkpoint, read_model_meta
from ..engine.events import read_events
from ..errors import user_message
from . import processes
from .store import Conflict, Store, StoredFile
from .uploads import store_image

TRAIN_KINDS = ("train", "finetune")
JOB_KINDS = (*TRAIN_KINDS, "predict")
FINISHED = ("succeeded", "failed", "cancelled", "interrupted")
STOP_GRACE_S = 5.0
WORKER_FILE = "worker.json"  # what the worker runs, as data (service/worker.py)


def list_devices() -> list[str]:
    """The devices jobs are scheduled on: every GPU, or the CPU when there is none."""
    import torch

    n = torch.cuda.device_count()
    return [f"cuda:{i}" for i in range(n)] or ["cpu"]


def append_event(path: Path, event: str, **fields: Any) -> None:
    with open(path, "a") as f:
        f.write(json.dumps({"event": event, "time": round(time.time(), 3), **fields}) + "\n")


def job_progress(events: list[dict[str, Any]]) -> dict[str, Any]:
    """What a client shows: fraction done, ETA, last losses and validation Dice."""
    out: dict[str, Any] = {"fraction": 0.0, "eta_s": None, "epoch": None, "epochs": None, "metrics": {}}
    for e in events:
        if e.get("event") == "epoch":
            out.update(fraction=round(min(e["epoch"] / max(e["of"], 1), 1.0), 4), eta_s=e.get("eta_s"),
                       epoch=e["epoch"], epochs=e["of"])
            out["metrics"]["loss"] = e.get("loss")
            if e.get("val_dice"):
                out["metrics"]["val_dice"] = e["val_dice"]
        elif e.get("event") == "done":
            out["fraction"] = 1.0
            out["eta_s"] = 0.0
            if e.get("val_dice"):
                out["metrics"]["val_dice"] = e["val_dice"]
    return out


def worker_error(log: Path, returncode: int) -> str:
    """The worker's own message (the CLI prints `error: ...` last, with the list of problems where there are
    several), else the end of its log."""
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("error: "):
            return "\n".join([lines[i][len("error: "):], *lines[i + 1:i + 60]])
    if returncode < 0:
        name = signal.Signals(-returncode).name
        hint = " (the system may have run out of memory)" if returncode == -signal.SIGKILL else ""
        return f"the worker was killed by {name}{hint}"
    tail = "\n".join(lines[-15:])
    return f"the worker failed with exit code {returncode}:\n{tail}"


class JobRunner:
    """Schedules queued jobs onto free devices and supervises their workers (a thread of the server)."""

    def __init__(self, store: Store, devices: list[str] | None = None, poll_s: float = 0.25):
        self.store = store
        self.devices = devices or list_devices()
        self.poll_s = poll_s
        self.procs: dict[str, subprocess.Popen] = {}
        self.lock = threading.RLock()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="job-runner", daemon=True)

    # ---- life cycle ----------------------------------------------------------------------------------------------
    def start(self) -> None:
        self.recover()
        self.thread.start()

    def stop(self) -> None:
        """Server shutdown: workers are stopped and their jobs marked interrupted (resumable)."""
        self.stopping.set()
        self.thread.join(timeout=10)
        with self.lock:
            for job_id, proc in list(self.procs.items()):
                processes.end_tree(proc.pid, STOP_GRACE_S)
                proc.wait()
                self._finish(job_id, "interrupted", error="the server stopped while this job ran; resume it")
            self.procs.clear()

    def recover(self) -> None:
        """After a crash: jobs that were running have no worker any more (it died with the server; a DDP rank
        that outlived it is ended here) and become `interrupted`."""
        for job in self.store.jobs(("running",)):
            pid = job["pgid"]  # the worker's pid (also its process group on POSIX)
            if pid and processes.runs_job(pid, job["id"]):
                processes.end_tree(pid, grace_s=1.0)
            self._finish(job["id"], "interrupted",
                         error="the server stopped while this job ran; resume it to continue from its last checkpoint"
                         if job["kind"] in TRAIN_KINDS else "the server stopped while this job ran; submit it again")

    # ---- requests ------------------------------------------------------------------------------------------------
    def cancel(self, job_id: str) -> dict[str, Any]:
        with self.lock:
            job = self.store.job(job_id)
            if job["state"] in FINISHED:
                raise Conflict(f"job {job_id} has already finished ({job['state']})")
            proc = self.procs.pop(job_id, None)
            if proc is not None:
                processes.end_tree(proc.pid, STOP_GRACE_S)
                proc.wait()
            self._finish(job_id, "cancelled", error="cancelled by the user")
            return self.store.job(job_id)

    def resume(self, job_id: str) -> dict[str, Any]:
        with self.lock:
            job = self.store.job(job_id)
            if job["kind"] not in TRAIN_KINDS or job["state"] not in ("interrupted", "failed", "cancelled"):
                raise Conflict(f"job {job_id} ({job['kind']}, {job['state']}) cannot be resumed; only an "
                               f"interrupted, failed or cancelled training can")
            resumable = latest_checkpoint(self.store.model_folder(job["model"])) is not None
            self.store.update_job(job_id, state="queued", resume=int(resumable), error=None, finished=None)
            self.store.set_model_state(job["model"], "training")
            append_event(self.events_path(job_id), "queued", resume=resumable)
            return self.store.job(job_id)

    def events_path(self, job_id: str) -> Path:
        return self.store.job_folder(job_id) / "events.jsonl"

    def events(self, job_id: str) -> list[dict[str, Any]]:
        return read_events(self.events_path(job_id))

    # ---- the loop ------------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self.stopping.is_set():
            try:
                with self.lock:
                    self._reap()
                    self._schedule()
            except Exception as e:  # noqa: BLE001 - the supervisor must outlive any one job's failure
                print(f"job runner: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            self.stopping.wait(self.poll_s)

    def _reap(self) -> None:
        for job_id, proc in list(self.procs.items()):
            code = proc.poll()
            if code is None:
                continue
            del self.procs[job_id]
            job = self.store.job(job_id)
            if code == 0:
                try:
                    result = self._collect(job)
                except Exception as e:  # noqa: BLE001 - a job whose output cannot be registered has failed
                    self._finish(job_id, "failed", error=f"the job's output could not be registered: {e}")
                    continue
                self._finish(job_id, "succeeded", result=result)
            else:
                self._finish(job_id, "failed", error=worker_error(self.store.job_folder(job_id) / "worker.log", code))

    def _busy(self) -> set[str]:
        busy: set[str] = set()
        for job_id in self.procs:
            busy.update(self.store.job(job_id)["devices"] or [])
        return busy

    def _schedule(self) -> None:
        busy = self._busy()
        for job in self.store.jobs(("queued",)):
            wanted = self._wanted(job)
            free = [d for d in self.devices if d not in busy]
            if wanted["type"] == "cpu":
                free = ["cpu"] if "cpu" not in busy else []
            elif wanted["type"] == "cuda":
                free = [d for d in free if d.startswith("cuda")]
            if len(free) < wanted["count"]:
                continue  # stays queued until enough devices are free
            devices = free[: wanted["count"]]
            try:
                self._launch(job, devices)
            except Exception as e:  # noqa: BLE001 - a job that cannot start fails alone; the queue goes on
                self.procs.pop(job["id"], None)
                self._finish(job["id"], "failed", error=f"the job could not start: {user_message(e) or repr(e)}")
                continue
            busy.update(devices)

    def device_type(self, device: str) -> str:
        """Where a job asking for `device` (auto, cpu, cuda) runs on this server: "cuda" or "cpu"."""
        gpus_here = any(d.startswith("cuda") for d in self.devices)
        return "cuda" if device == "cuda" or (device == "auto" and gpus_here) else "cpu"

    def _wanted(self, job: dict[str, Any]) -> dict[str, Any]:
        params = job["params"]
        kind = self.device_type(params.get("device", "auto"))
        count = int(params.get("processes", 1)) if kind == "cuda" else 1
        return {"type": kind, "count": count}

    def _launch(self, job: dict[str, Any], devices: list[str]) -> None:
        folder = self.store.job_folder(job["id"])
        folder.mkdir(parents=True, exist_ok=True)
        job_file = folder / WORKER_FILE
        write_json_atomic(job_file, self._worker_job(job, folder))
        env = dict(os.environ)
        cuda = [d.split(":")[1] for d in devices if d.startswith("cuda")]
        env["CUDA_VISIBLE_DEVICES"] = ",".join(cuda)  # "" hides every GPU from a CPU job
        # Each worker may use every core; jobs do not overlap on a device, and the web process is idle meanwhile.
        env.setdefault("PYTHONUNBUFFERED", "1")
        append_event(folder / "events.jsonl", "started", devices=devices)
        with open(folder / "events.jsonl", "ab") as stdout, open(folder / "worker.log", "ab") as stderr:
            proc = processes.spawn([sys.executable, "-m", "crossmodalseg.service.worker", str(os.getpid()),
                                    str(job_file)], stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL, env=env,
                                   cwd=folder)
        self.procs[job["id"]] = proc
        self.store.update_job(job["id"], state="running", started=time.time(), pgid=proc.pid, devices=devices)

    def _worker_job(self, job: dict[str, Any], folder: Path) -> dict[str, Any]:
        """What the worker runs, as data: the typed run configuration for a training (the same TrainConfig the CLI
        builds from its options), the inputs and outputs for a prediction."""
        p = job["params"]
        device = "cpu" if not any(d.startswith("cuda") for d in self.devices) else p.get("device", "auto")
        if job["kind"] == "predict":
            return {"kind": "predict", "model": str(self.store.model_folder(p["model"])), "images": p["images"],
                    "out": str(folder / "output"), "members": bool(p.get("members")),
                    "uncertainty": bool(p.get("uncertainty")), "device": device}
        if job["resume"]:  # the interrupted run's own settings (run.json); only the budget and device may change
            config = TrainConfig.parse({"epochs": p.get("epochs"), "device": device})
        else:
            self.store.training_spec(p["dataset"], folder / "dataset")
            config = TrainConfig.parse({**{k: v for k, v in p.items() if k in TrainConfig.model_fields},
                                        "device": device, "init_from": str(self.store.model_folder(p["base_model"]))
                                        if job["kind"] == "finetune" else None})
        return {"kind": "train", "dataset": str(folder / "dataset"), "out": str(self.store.model_folder(job["model"])),
                "resume": bool(job["resume"]), "processes": int(p.get("processes", 1)),
                "config": config.model_dump(mode="json")}

    def _collect(self, job: dict[str, Any]) -> dict[str, Any]:
        """Registers what a finished worker made: a model, or label maps on the case it segmented."""
        if job["kind"] in TRAIN_KINDS:
            folder = self.store.model_folder(job["model"])
            if not (folder / MODEL_FILE).exists():
                raise RuntimeError(f"the worker ended without writing {MODEL_FILE}")
            meta = read_model_meta(folder)
            self.store.set_model_state(job["model"], "ready", meta)
            return {"model": job["model"], "val_dice": meta["training"].get("val_dice")}
        out = self.store.job_folder(job["id"]) / "output"
        files = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
        p = job["params"]
        if p.get("dataset") and p.get("case"):
            meta = read_model_meta(self.store.model_folder(p["model"]))
            target = meta["task"]["target"] if meta["task"]["target"] in p["images"] else next(iter(p["images"]))
            destination = self.store.dataset_folder(p["dataset"], p["case"]) / f"label_{target}_original"
            image = read_image(out / "segmentation.nrrd")
            with self.store.file_lock:
                # The case may have been deleted while the job ran: its result then stays with the job only,
                # never bringing the case back as a label without an image.
                still_there = any(f["kind"] == "image" and f["modality"] == target
                                  for f in self.store.files(p["dataset"], p["case"]))
                if not still_there:
                    return {"files": files, "note": f"case {p['case']!r} was deleted while the job ran; the "
                                                    f"segmentation is only in this job's files"}
                path, sha = store_image(image, destination)
                self.store.put_file(p["dataset"], p["case"], "label", target, "original",
                                    StoredFile(path, sha, Geometry.of(image).to_json()))
        return {"files": files}

    def _finish(self, job_id: str, state: str, error: str | None = None, result: dict | None = None) -> None:
        job = self.store.job(job_id)
        self.store.update_job(job_id, state=state, finished=time.time(), error=error, result=result)
        if job["model"] and state != "succeeded":
            self.store.set_model_state(job["model"], state)
        folder = self.store.job_folder(job_id)
        if folder.exists():
            append_event(folder / "events.jsonl", "finished", state=state, error=error)
