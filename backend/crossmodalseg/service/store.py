"""The service's persistent state: one home folder, SQLite (WAL) for metadata, files for images and weights.

    <home>/store.db                      datasets, case files, jobs, models
    <home>/datasets/<id>/<case>/...      uploaded images and labels (NRRD: geometry kept in double precision)
    <home>/jobs/<id>/                    events.jsonl, worker.log, the dataset snapshot a job trained on, outputs
    <home>/models/<id>/                  model folders (model.json + safetensors), also the training run's folder

Every file is written to a temporary name and renamed, and its row is committed after the rename: a server killed at
any moment has either the old state or the new one, and whatever it acknowledged (answered 2xx) is on disk.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data.io import Geometry
from ..data.spec import ID_PATTERN, Case, DatasetSpec
from ..errors import UserError

SCHEMA = """
CREATE TABLE IF NOT EXISTS datasets (
  id TEXT PRIMARY KEY, name TEXT NOT NULL, labels TEXT NOT NULL, modalities TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS files (
  dataset TEXT NOT NULL, case_id TEXT NOT NULL, kind TEXT NOT NULL, modality TEXT NOT NULL, tag TEXT NOT NULL,
  path TEXT NOT NULL, sha256 TEXT NOT NULL, geometry TEXT NOT NULL, created REAL NOT NULL,
  PRIMARY KEY (dataset, case_id, kind, modality, tag));
CREATE TABLE IF NOT EXISTS jobs (
  id TEXT PRIMARY KEY, kind TEXT NOT NULL, state TEXT NOT NULL, params TEXT NOT NULL, created REAL NOT NULL,
  started REAL, finished REAL, error TEXT, pgid INTEGER, devices TEXT, model TEXT, resume INTEGER NOT NULL DEFAULT 0,
  result TEXT);
CREATE TABLE IF NOT EXISTS models (
  id TEXT PRIMARY KEY, name TEXT NOT NULL, state TEXT NOT NULL, job TEXT, created REAL NOT NULL, meta TEXT);
"""

LABEL_TAGS = ("final", "original")  # a clinician's label or correction / a model's output
JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled", "interrupted")
ACTIVE_STATES = ("queued", "running")


class NotFound(LookupError):
    """An id that names nothing; the message says which."""


class Conflict(ValueError):
    """A request that contradicts the stored state (an existing id, a job that cannot be resumed ...)."""


def new_id() -> str:
    return uuid.uuid4().hex[:12]


def check_id(value: str, what: str) -> str:
    """Ids become folder names: letters, digits, '_', '-', '.', starting with a letter or digit (no '/', no '..')."""
    if not isinstance(value, str) or not ID_PATTERN.match(value):
        raise UserError(f"invalid {what} {value!r}: use 1-128 letters, digits, '_', '-' or '.', starting with a "
                         f"letter or digit")
    return value


@dataclass
class StoredFile:
    path: Path
    sha256: str
    geometry: dict[str, Any]


class Store:
    def __init__(self, home: str | Path):
        self.home = Path(home).resolve()
        for sub in ("datasets", "jobs", "models", "tmp"):
            (self.home / sub).mkdir(parents=True, exist_ok=True)
        self._remove_leftovers()
        self.db_path = self.home / "store.db"
        self._local = threading.local()
        self.file_lock = threading.Lock()  # a file's rename and its row go together, one upload at a time
        self._connection().executescript(SCHEMA)  # (executescript commits on its own)

    def _remove_leftovers(self) -> None:
        """Partial uploads and unfinished model imports of a server that was killed: never acknowledged."""
        for path in list((self.home / "tmp").iterdir()) + list((self.home / "models").glob(".import-*")):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)

    # ---- connections -------------------------------------------------------------------------------------
    def _connection(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.db_path, timeout=30, isolation_level=None, check_same_thread=False)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # a commit is on disk before the client hears "done"
            self._local.db = db
        return db

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        db = self._connection()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def query(self, sql: str, *args: Any) -> list[sqlite3.Row]:
        return self._connection().execute(sql, args).fetchall()

    # ---- datasets ------------------------------------------------------------------------------------------
    def create_dataset(self, dataset_id: str, name: str, labels: dict[str, int], modalities: dict[str, str]) -> None:
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM datasets WHERE id=?", (dataset_id,)).fetchone():
                raise Conflict(f"dataset {dataset_id!r} already exists")
            db.execute("INSERT INTO datasets VALUES (?,?,?,?,?)",
                       (dataset_id, name, json.dumps(labels), json.dumps(modalities), time.time()))

    def dataset(self, dataset_id: str) -> dict[str, Any]:
        rows = self.query("SELECT * FROM datasets WHERE id=?", dataset_id)
        if not rows:
            raise NotFound(f"no dataset {dataset_id!r}")
        row = rows[0]
        return {"id": row["id"], "name": row["name"], "labels": json.loads(row["labels"]),
                "modalities": json.loads(row["modalities"]), "created": row["created"]}

    def datasets(self) -> list[dict[str, Any]]:
        return [self.dataset(r["id"]) for r in self.query("SELECT id FROM datasets ORDER BY created")]

    def dataset_folder(self, dataset_id: str, case_id: str) -> Path:
        return self.home / "datasets" / check_id(dataset_id, "dataset id") / check_id(case_id, "case id")

    def put_file(self, dataset_id: str, case_id: str, kind: str, modality: str, tag: str, stored: StoredFile) -> None:
        """Records a file already renamed into place (the row is the acknowledgement)."""
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO files VALUES (?,?,?,?,?,?,?,?,?)",
                       (dataset_id, case_id, kind, modality, tag, str(stored.path.relative_to(self.home)),
                        stored.sha256, json.dumps(stored.geometry), time.time()))

    def files(self, dataset_id: str, case_id: str | None = None) -> list[dict[str, Any]]:
        sql, args = "SELECT * FROM files WHERE dataset=?", [dataset_id]
        if case_id is not None:
            sql, args = sql + " AND case_id=?", args + [case_id]
        return [{"case": r["case_id"], "kind": r["kind"], "modality": r["modality"], "tag": r["tag"],
                 "path": self.home / r["path"], "sha256": r["sha256"], "geometry": json.loads(r["geometry"]),
                 "created": r["created"]} for r in self.query(sql + " ORDER BY case_id, kind, modality, tag", *args)]

    def file(self, dataset_id: str, case_id: str, kind: str, modality: str, tag: str = "") -> dict[str, Any]:
        for f in self.files(dataset_id, case_id):
            if (f["kind"], f["modality"], f["tag"]) == (kind, modality, tag):
                return f
        what = f"{tag} label" if kind == "label" else "image"
        raise NotFound(f"dataset {dataset_id!r} case {case_id!r} has no {modality!r} {what}")

    def delete_case(self, dataset_id: str, case_id: str) -> list[Path]:
        files = self.files(dataset_id, case_id)
        if not files:
            raise NotFound(f"dataset {dataset_id!r} has no case {case_id!r}")
        with self.transaction() as db:
            db.execute("DELETE FROM files WHERE dataset=? AND case_id=?", (dataset_id, case_id))
        return [f["path"] for f in files]

    def describe_dataset(self, dataset_id: str) -> dict[str, Any]:
        out = self.dataset(dataset_id)
        cases: dict[str, dict[str, Any]] = {}
        for f in self.files(dataset_id):
            case = cases.setdefault(f["case"], {"id": f["case"], "images": {}, "labels": {}})
            entry = {"sha256": f["sha256"], "geometry": f["geometry"], "created": f["created"]}
            if f["kind"] == "image":
                case["images"][f["modality"]] = entry
            else:
                case["labels"].setdefault(f["modality"], {})[f["tag"]] = entry
        out["cases"] = list(cases.values())
        return out

    def training_spec(self, dataset_id: str, folder: Path) -> DatasetSpec:
        """A dataset.json snapshot for one job: every image, and the `final` labels (clinician-made or corrected).
        Model outputs (`original`) never train a model: they would teach it its own mistakes."""
        meta = self.dataset(dataset_id)
        cases: dict[str, Case] = {}
        grids: dict[str, list[Geometry]] = {}
        for f in self.files(dataset_id):
            case = cases.setdefault(f["case"], Case(f["case"], {}, {}))
            if f["kind"] == "image":
                case.images[f["modality"]] = f["path"]
                grids.setdefault(f["case"], []).append(Geometry.from_json(f["geometry"]))
            elif f["tag"] == "final":
                case.labels[f["modality"]] = f["path"]
        for case in cases.values():  # a label whose image is missing cannot be used
            case.labels = {m: p for m, p in case.labels.items() if m in case.images}
            # Images uploaded on one voxel grid are co-registered by construction (a paired study resampled in
            # Slicer); images on different grids may be another patient's or misaligned: their labels stay apart.
            first, *rest = grids.get(case.id) or [None]
            case.co_registered = bool(rest) and all(first.matches(g) for g in rest)
        spec = DatasetSpec(meta["name"], meta["labels"], meta["modalities"],
                           [c for c in cases.values() if c.images], folder)
        spec.save(folder)
        return spec

    # ---- jobs ------------------------------------------------------------------------------------------------
    def create_job(self, kind: str, params: dict[str, Any], model: str | None = None) -> str:
        job_id = new_id()
        with self.transaction() as db:
            db.execute("INSERT INTO jobs (id, kind, state, params, created, model) VALUES (?,?,?,?,?,?)",
                       (job_id, kind, "queued", json.dumps(params), time.time(), model))
            if model is not None:
                db.execute("INSERT INTO models (id, name, state, job, created) VALUES (?,?,?,?,?)",
                           (model, params.get("name") or model, "training", job_id, time.time()))
        return job_id

    def job(self, job_id: str) -> dict[str, Any]:
        rows = self.query("SELECT * FROM jobs WHERE id=?", job_id)
        if not rows:
            raise NotFound(f"no job {job_id!r}")
        row = dict(rows[0])
        row["params"] = json.loads(row["params"])
        row["devices"] = json.loads(row["devices"]) if row["devices"] else None
        row["result"] = json.loads(row["result"]) if row["result"] else None
        row["resume"] = bool(row["resume"])
        return row

    def jobs(self, states: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
        sql = "SELECT id FROM jobs"
        args: tuple = ()
        if states:
            sql += f" WHERE state IN ({','.join('?' * len(states))})"
            args = states
        return [self.job(r["id"]) for r in self.query(sql + " ORDER BY created", *args)]

    def update_job(self, job_id: str, **fields: Any) -> None:
        for key in ("devices", "result"):
            if key in fields and fields[key] is not None:
                fields[key] = json.dumps(fields[key])
        sets = ", ".join(f"{k}=?" for k in fields)
        with self.transaction() as db:
            db.execute(f"UPDATE jobs SET {sets} WHERE id=?", (*fields.values(), job_id))

    def job_folder(self, job_id: str) -> Path:
        return self.home / "jobs" / check_id(job_id, "job id")

    # ---- models ----------------------------------------------------------------------------------------------
    def model_folder(self, model_id: str) -> Path:
        return self.home / "models" / check_id(model_id, "model id")

    def add_model(self, model_id: str, name: str, meta: dict[str, Any], job: str | None = None) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO models (id, name, state, job, created, meta) VALUES (?,?,?,?,?,?)",
                       (model_id, name, "ready", job, time.time(), json.dumps(meta)))

    def set_model_state(self, model_id: str, state: str, meta: dict[str, Any] | None = None) -> None:
        with self.transaction() as db:
            if meta is None:
                db.execute("UPDATE models SET state=? WHERE id=?", (state, model_id))
            else:
                db.execute("UPDATE models SET state=?, meta=? WHERE id=?", (state, json.dumps(meta), model_id))

    def model(self, model_id: str) -> dict[str, Any]:
        rows = self.query("SELECT * FROM models WHERE id=?", model_id)
        if not rows:
            raise NotFound(f"no model {model_id!r}")
        row = dict(rows[0])
        row["meta"] = json.loads(row["meta"]) if row["meta"] else None
        return row

    def models(self) -> list[dict[str, Any]]:
        return [self.model(r["id"]) for r in self.query("SELECT id FROM models ORDER BY created")]

    def delete_model(self, model_id: str) -> Path:
        """Forgets a model (its folder is then the caller's to remove); Conflict while a queued or running job makes
        or uses it."""
        self.model(model_id)
        busy = self.query("SELECT id FROM jobs WHERE state IN ('queued','running') AND (model=? OR params LIKE ?)",
                          model_id, f'%"{model_id}"%')
        if busy:
            raise Conflict(f"model {model_id!r} is in use by job {busy[0]['id']!r}; cancel it first")
        with self.transaction() as db:
            db.execute("DELETE FROM models WHERE id=?", (model_id,))
        return self.model_folder(model_id)

    def ready_model(self, model_id: str) -> dict[str, Any]:
        model = self.model(model_id)
        if model["state"] != "ready":
            raise Conflict(f"model {model_id!r} is {model['state']}, not ready yet")
        return model
