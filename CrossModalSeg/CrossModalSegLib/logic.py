"""The module's logic, free of Qt: talks to a backend over HTTP and moves volumes and segmentations between the
MRML scene and the backend. The Widget calls it; tests drive it with slicer-core's real MRML scene.

Workflow: connect (local or remote) -> add cases (volumes + optional segmentations) -> train (method suggested from
the data) and poll progress -> segment -> QA (members, disagreement, agreement table) -> correct in the Segment
Editor -> submit the correction (`final` label) -> fine-tune -> segment again.
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import scene as mrml
from .backend import LocalBackend, connect_remote
from .client import BackendClient, BackendError

MODALITY_TYPES = ("CT", "MR")
CANCEL_RETRY_S = 5.0  # how long a cancelled segmentation's stop is sent again while the backend has not seen it


@dataclass
class JobProgress:
    state: str
    job_id: str | None = None
    fraction: float = 0.0
    eta_s: float | None = None
    messages: list[str] = field(default_factory=list)
    error: str | None = None
    model: str | None = None

    @property
    def finished(self) -> bool:
        return self.state in ("succeeded", "failed", "cancelled", "interrupted")


@dataclass
class SegmentationResult:
    segmentation: Any  # vtkMRMLSegmentationNode
    members: dict[str, Any] = field(default_factory=dict)  # member name -> vtkMRMLSegmentationNode
    disagreement: Any = None  # vtkMRMLScalarVolumeNode
    agreement_table: Any = None  # vtkMRMLTableNode
    files: dict[str, Path] = field(default_factory=dict)
    case_id: str | None = None
    modality: str = ""
    volumes: dict[str, Any] = field(default_factory=dict)  # modality -> the volume node it was made from


class BackgroundRequest:
    """Backend requests that run in a worker thread, so that the GUI thread never waits for the network: poll
    `done()` (e.g. from a timer), then finish on the thread that owns the scene (MRML nodes are only made there)."""

    thread: threading.Thread | None = None
    error: BaseException | None = None
    cancelled: bool = False

    def cancel(self) -> None:
        """Stops waiting: the result, when it comes, is discarded and leaves nothing behind."""
        self.cancelled = True

    def start(self, work: Callable[[], None], name: str) -> None:
        def run() -> None:
            try:
                work()
            except BaseException as e:  # noqa: BLE001 - raised again by the finish call, on the scene's thread
                self.error = e

        self.thread = threading.Thread(target=run, name=name, daemon=True)
        self.thread.start()

    def done(self) -> bool:
        return self.thread is not None and not self.thread.is_alive()

    def wait(self, timeout_s: float | None = None) -> bool:
        if self.thread is not None:
            self.thread.join(timeout_s)
        return self.done()

    def result(self) -> None:
        """Raises the worker's error, if any (call once done)."""
        if not self.done():
            raise RuntimeError(f"{type(self).__name__} is still running; finish it once done() is true")
        if self.error is not None:
            raise self.error


@dataclass(eq=False)  # a request is itself: two alike are still two
class PendingSegmentation(BackgroundRequest):
    """A segmentation request (see CrossModalSegLogic.start_segment)."""

    model: dict[str, Any]
    volumes: dict[str, Any]
    modality: str
    members: bool
    uncertainty: bool
    files: dict[str, Path] = field(default_factory=dict)
    client: BackendClient | None = None  # the backend that predicts, asked to stop when this is cancelled
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def cancel(self) -> None:
        """Stops waiting (the answer, if it comes, is discarded) and asks the backend, from a worker thread, to stop
        the prediction: the backend is free at once for the next one."""
        if self.cancelled:
            return
        super().cancel()
        if self.client is not None and not self.done():
            threading.Thread(target=self._stop_on_backend, name="crossmodalseg-cancel-segment", daemon=True).start()

    def _stop_on_backend(self) -> None:
        # 404: the backend has not seen the prediction yet (the two requests race) or has finished it already
        give_up = time.monotonic() + CANCEL_RETRY_S
        while not self.done() and time.monotonic() < give_up:
            try:
                self.client.cancel_prediction(self.request_id)
                return
            except BackendError as e:
                if e.status != 404:  # the backend is gone, or too old to stop a prediction: it runs to its end
                    return
            time.sleep(0.2)


@dataclass(eq=False)  # a request is itself: two alike are still two
class PendingUpload(BackgroundRequest):
    """The uploads of one case's volumes and labels (see CrossModalSegLogic.start_add_case)."""

    case_id: str | None  # chosen in the worker thread when the case is new (see _reserve_case_id)
    volume_key: tuple[str, ...]


@dataclass(eq=False)  # a request is itself: two alike are still two
class PendingCall(BackgroundRequest):
    """Backend requests whose answer is `value` (see CrossModalSegLogic.start_call)."""

    what: str
    value: Any = None


class PendingConnection(PendingCall):
    """Starting the local backend or reaching a server, then listing what it has: a `Connection`."""


class PendingRefresh(PendingCall):
    """Listing the backend's datasets and models again: a `Catalogue`."""


class PendingPoll(PendingCall):
    """One progress poll of the current job: a `JobProgress`."""


class PendingJob(PendingCall):
    """A training or fine-tuning job being submitted: its id."""


class PendingDatasetCheck(PendingCall):
    """Finding, or creating, the dataset a case is about to be added to: its description (see `dataset_for`)."""


@dataclass
class Catalogue:
    """What the panel lists from the backend: dataset ids, ready models (newest first), the model chosen among them
    (None when there is none) and the number of cases of the current dataset (None when there is none)."""

    datasets: list[str]
    models: list[dict[str, Any]]
    chosen: str | None
    cases: int | None


@dataclass
class Connection:
    """A backend that answered: its /info and its catalogue."""

    info: dict[str, Any]
    catalogue: Catalogue


def safe_id(text: str, fallback: str = "case") -> str:
    """A backend id from a node name: letters, digits, '_', '-', '.'; starts with a letter or digit."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._-")[:100]
    return cleaned if cleaned else fallback


class CrossModalSegLogic:
    def __init__(self, scene, work_dir: str | Path | None = None):
        self.scene = scene
        self._own_work = work_dir is None
        self.work = Path(work_dir or tempfile.mkdtemp(prefix="crossmodalseg-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.client: BackendClient | None = None
        self.local: LocalBackend | None = None
        self.dataset_id: str | None = None
        self.labels: dict[str, int] = {}
        self.modalities: dict[str, str] = {}
        self.cases: list[dict[str, Any]] = []  # the current dataset's cases when last asked for
        self.model_id: str | None = None
        self.model: dict[str, Any] | None = None  # the chosen model as the backend described it
        self.job_id: str | None = None
        self._events_seen = 0
        self._cleaned_up = False
        self._following = threading.Lock()  # job_id and _events_seen change together (polls run in worker threads)
        self._case_of_volumes: dict[tuple[str, ...], str] = {}
        # Case ids chosen for uploads under way: two uploads started together (an unpaired CT and MR with one name)
        # must not pick one id before either reaches the backend, or the second would land in the first's case.
        self._ids_in_flight: set[tuple[str, str]] = set()
        self._choosing_id = threading.Lock()
        # Node IDs start again from 1 when the scene is closed: the next patient's volumes must not be taken for the
        # cases added from the last one's (a correction would be filed as that patient's label).
        self._scene_closed = scene.AddObserver(scene.EndCloseEvent, lambda *_: self.forget_scene())

    # ---- backend -------------------------------------------------------------------------------------------
    def start_local_backend(self, python: str | None = None, home: str | Path | None = None,
                            env: dict[str, str] | None = None,
                            base_env: dict[str, str] | None = None) -> dict[str, Any]:
        """Starts `crossmodalseg serve` on 127.0.0.1 (free port, random token) with `python` (default: this one)
        in `home` (default: the running local backend's, else ~/.crossmodalseg). The local backend this logic
        already runs with the same Python and home is kept, with its jobs. `base_env`: the environment to start it in
        (default: this process's; in Slicer, the one Slicer was started in, without the launcher's PYTHONHOME and
        PYTHONPATH that would break another Python); `env`: variables set on top."""
        running = self.local is not None and self.local.running()
        python = python or sys.executable
        home = Path(home) if home else self.local.home if running else Path.home() / ".crossmodalseg"
        if self.local is not None and self.local.running() and (self.local.python, self.local.home) == (python, home):
            return self._backend().info()
        self.stop_backend()
        self.local = LocalBackend(python, home, env, base_env)
        self.client = self.local.start()
        return self.client.info()

    def start_connection(self, url: str | None = None, token: str | None = None, select: str | None = None,
                         **local: Any) -> PendingConnection:
        """Reaches the server at `url`, else starts the local backend (`local`: start_local_backend's arguments), in
        a worker thread: starting a local backend takes up to START_TIMEOUT_S, and stopping the previous one up to
        STOP_GRACE_S. `finish_call` gives the Connection (its catalogue chooses `select` when listed)."""
        def connect() -> Connection:
            info = self.connect(url, token) if url is not None else self.start_local_backend(**local)
            if self._cleaned_up:  # the module went away meanwhile: no backend may outlive it
                self.stop_backend()
                raise BackendError("the module was closed while it connected")
            return Connection(info, self.catalogue(select))

        return self.start_call("connection to the backend", connect, PendingConnection)

    def start_refresh(self, select: str | None = None) -> PendingRefresh:
        """Lists the backend's datasets and models again in a worker thread (see `catalogue`)."""
        self._backend()
        return self.start_call("listing of datasets and models", lambda: self.catalogue(select), PendingRefresh)

    def catalogue(self, select: str | None = None) -> Catalogue:
        """The backend's datasets and ready models; chooses `select`, else the current model, else the newest (see
        `choose_model`: its dataset becomes the current one)."""
        models = self.models()
        ids = [m["id"] for m in models]
        chosen = next((m for m in (select, self.model_id) if m in ids), ids[0] if ids else None)
        if chosen is not None:
            self.choose_model(chosen)
        datasets = self.dataset_listing()
        return Catalogue(datasets, models, chosen, len(self.cases) if self.dataset_id in datasets else None)

    def start_call(self, what: str, work: Callable[[], Any], kind: type[PendingCall] = PendingCall) -> PendingCall:
        """Runs `work` (backend requests, files: never MRML, which belongs to the scene's thread) in a worker thread
        and returns at once; `finish_call` gives its value once `done()`."""
        pending = kind(what)

        def run() -> None:
            pending.value = work()

        pending.start(run, "crossmodalseg-" + what.split()[0])
        return pending

    def forget_scene(self) -> None:
        """Forgets which cases the scene's volumes were added as (called when the scene is closed)."""
        self._case_of_volumes.clear()

    def case_of(self, volumes: dict[str, Any]) -> str | None:
        """The case these volumes were added as, in this scene; None if they never were."""
        return self._case_of_volumes.get(self._volume_key(volumes))

    def connect(self, url: str, token: str | None = None) -> dict[str, Any]:
        self.stop_backend()
        self.client = connect_remote(url, token)
        return self.client.info()

    def stopping_loses_work(self) -> bool:
        """Whether stopping the backend now would stop a job: the local backend (a remote one runs on alone) has a
        queued or running job."""
        if self.local is None or not self.local.running() or self.client is None:
            return False
        try:
            return any(j.get("state") in ("queued", "running") for j in self.client.jobs())
        except BackendError:
            return False

    def stop_backend(self) -> None:
        if self.local is not None:
            self.local.stop()
        self.local, self.client = None, None

    def _backend(self) -> BackendClient:
        if self.client is None:
            raise BackendError("no backend: start the local one or connect to a server first")
        return self.client

    # ---- dataset and cases -----------------------------------------------------------------------------------
    @staticmethod
    def labels_from_segmentation(segmentation_node: Any) -> dict[str, int]:
        """Structure names and values from a segmentation: its segments in order, values 1, 2, ..."""
        names = list(mrml.segment_names(segmentation_node).values())
        if not names:
            raise mrml.SceneError(f"{segmentation_node.GetName()!r} has no segments to learn from")
        if len({n.lower() for n in names}) != len(names):
            raise mrml.SceneError(f"{segmentation_node.GetName()!r} has two segments with one name")
        return {"background": 0, **{name: i for i, name in enumerate(names, start=1)}}

    def datasets(self) -> list[dict[str, Any]]:
        """The backend's datasets (id, name, structures, modalities), to choose from after a restart."""
        return self._backend().datasets()

    def choose_dataset(self, dataset_id: str) -> dict[str, Any]:
        """Works on an existing dataset of the backend from now on (its structures and modalities)."""
        existing = self._backend().dataset(dataset_id)
        self.dataset_id, self.labels = dataset_id, dict(existing["labels"])
        self.modalities, self.cases = dict(existing["modalities"]), list(existing["cases"])
        return existing

    def dataset_listing(self) -> list[str]:
        """The backend's dataset ids; the current dataset's cases are asked for again (`cases`; none when the
        backend no longer has it)."""
        client = self._backend()
        ids = [d["id"] for d in client.datasets()]
        self.cases = list(client.dataset(self.dataset_id)["cases"]) if self.dataset_id in ids else []
        return ids

    def use_dataset(self, dataset_id: str, labels: dict[str, int], modalities: dict[str, str],
                    name: str | None = None) -> dict[str, Any]:
        """Creates the dataset on the backend, or reuses it when it exists with the same structures."""
        return self.adopt_dataset(self.dataset_for(dataset_id, labels, modalities, name), labels, modalities)

    def dataset_for(self, dataset_id: str, labels: dict[str, int], modalities: dict[str, str],
                    name: str | None = None) -> dict[str, Any]:
        """The dataset's description from the backend, which creates it when it has none by that id. Requests
        only, no state: the panel runs this in a worker thread, then `adopt_dataset` on its own."""
        for modality, kind in modalities.items():
            if kind not in MODALITY_TYPES:
                raise ValueError(f"modality {modality!r}: type {kind!r}, expected CT or MR")
        client = self._backend()
        try:
            return client.dataset(dataset_id)
        except BackendError as e:
            if e.status != 404:
                raise
            return client.create_dataset(dataset_id, name or dataset_id, labels, modalities)

    def adopt_dataset(self, existing: dict[str, Any], labels: dict[str, int],
                      modalities: dict[str, str]) -> dict[str, Any]:
        """Makes `existing` (from `dataset_for`) the current dataset, once it is known to hold a segmentation with
        `labels` and volumes of `modalities`; else ValueError saying what does not fit."""
        dataset_id = existing["id"]
        structures_fit(existing["labels"], labels, dataset_id)
        missing = {m: t for m, t in modalities.items() if m not in existing["modalities"]}
        if missing:
            raise ValueError(f"dataset {dataset_id!r} has modalities {list(existing['modalities'])}, not "
                             f"{list(missing)}; use another dataset for new modalities")
        self.dataset_id, self.labels, self.modalities = dataset_id, dict(existing["labels"]), dict(existing["modalities"])
        self.cases = list(existing.get("cases", []))
        return existing

    def add_case(self, volumes: dict[str, Any], segmentations: dict[str, Any] | None = None,
                 case_id: str | None = None) -> str:
        """Uploads one case and waits (see `start_add_case`, which the panel uses); returns the case id."""
        pending = self.start_add_case(volumes, segmentations, case_id)
        pending.wait()
        return self.finish_upload(pending)

    def start_add_case(self, volumes: dict[str, Any], segmentations: dict[str, Any] | None = None,
                       case_id: str | None = None) -> PendingUpload:
        """Starts uploading one case: modality -> volume node (co-registered when more than one: a paired case), and
        optional modality -> segmentation node (exported on that volume's grid, sent as the `final` label). The
        files are written here (uncompressed: no gzip pass) and sent from a worker thread; returns at once."""
        self._backend()
        if self.dataset_id is None:
            raise ValueError("choose the dataset first (its structures and modalities)")
        volumes = {m: v for m, v in volumes.items() if v is not None}
        if not volumes:
            raise ValueError("select at least one volume")
        for modality in volumes:
            if modality not in self.modalities:
                raise ValueError(f"modality {modality!r} is not in dataset {self.dataset_id!r} "
                                 f"({', '.join(self.modalities)})")
        segmentations = {m: s for m, s in (segmentations or {}).items() if s is not None}
        for modality in segmentations:
            if modality not in volumes:
                raise ValueError(f"a {modality} segmentation needs its {modality} volume in the same case")
        return self._start_upload(case_id, volumes, segmentations, send_volumes=True)

    def _start_upload(self, case_id: str | None, volumes: dict[str, Any], segmentations: dict[str, Any],
                      send_volumes: bool) -> PendingUpload:
        """Writes the files here and sends them from a worker thread, which also chooses a new case's id (named
        after its first volume) when `case_id` is None."""
        client, dataset_id, labels = self._backend(), self.dataset_id, self.labels
        name = case_id or safe_id(next(iter(volumes.values())).GetName())
        folder = Path(tempfile.mkdtemp(prefix=f"upload-{name}-", dir=self.work))
        try:  # MRML is read on this thread; the copies of the patient's data live only as long as the upload
            images = {m: mrml.write_volume(v, folder / f"{m}.nrrd", compress=False)
                      for m, v in volumes.items()} if send_volumes else {}
            label_files = {m: mrml.write_segmentation(s, volumes[m], labels, folder / f"{m}_label.nrrd")
                           for m, s in segmentations.items()}
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

        pending = PendingUpload(case_id, self._volume_key(volumes))

        def upload() -> None:
            reserved = None
            try:
                if pending.case_id is None:
                    pending.case_id = reserved = self._reserve_case_id(client, dataset_id, name)
                for modality, path in images.items():
                    client.put_image(dataset_id, pending.case_id, modality, path)
                for modality, path in label_files.items():
                    client.put_label(dataset_id, pending.case_id, modality, path, "final")
            finally:
                shutil.rmtree(folder, ignore_errors=True)
                with self._choosing_id:  # the backend lists the case now (or never will: the id is free again)
                    self._ids_in_flight.discard((dataset_id, reserved))
        pending.start(upload, f"crossmodalseg-upload-{name}")
        return pending

    def finish_upload(self, pending: PendingUpload) -> str:
        """The case id of a finished upload (the backend's error, if any, is raised here)."""
        pending.result()
        self._case_of_volumes[pending.volume_key] = pending.case_id
        return pending.case_id

    def _reserve_case_id(self, client: BackendClient, dataset_id: str, base: str) -> str:
        """`base`, or `base_2`, `base_3` ...: the first id that neither the backend's cases nor another upload under
        way use (asked for in the upload's worker thread, so that the id is fresh when the files go)."""
        with self._choosing_id:
            taken = {c["id"] for c in client.dataset(dataset_id)["cases"]}
            taken |= {case for dataset, case in self._ids_in_flight if dataset == dataset_id}
            case_id, k = base, 1
            while case_id in taken:
                k += 1
                case_id = f"{base}_{k}"
            self._ids_in_flight.add((dataset_id, case_id))
            return case_id

    @staticmethod
    def _volume_key(volumes: dict[str, Any]) -> tuple[str, ...]:
        return tuple(sorted(f"{m}={v.GetID()}" for m, v in volumes.items()))

    # ---- training --------------------------------------------------------------------------------------------
    def suggest_method(self, target: str, assistants: list[str], cases: list[dict[str, Any]] | None = None
                       ) -> tuple[str, str]:
        """(method, reason) from the dataset's cases (`cases`, else asked for now): unpaired -> mkd; paired with
        unlabelled pairs -> cmc; paired, every case complete -> single early fusion (the modalities as channels:
        measured above MAML on complete cases, backend/benchmarks/RESULTS.md); paired with cases missing a modality
        -> maml (segments any subset)."""
        if not assistants:
            return "single", "one modality: the single-modality baseline"
        if cases is None:
            cases = self._backend().dataset(self.dataset_id)["cases"]
        wanted = [target, *assistants]
        paired = [c for c in cases if all(m in c["images"] for m in wanted)]
        single = [c for c in cases if sum(m in c["images"] for m in wanted) == 1]
        labelled = lambda c: any("final" in tags for tags in c["labels"].values())  # noqa: E731
        if paired:
            if any(not labelled(c) for c in paired) and any(labelled(c) for c in paired):
                return "cmc", "paired cases, some unlabelled: semi-supervised cross-modality collaboration"
            if not single:
                return "single", ("paired, complete cases: early fusion (the modalities as input channels of one "
                                  "network) scored above MAML on complete cases; for one model that also segments "
                                  "cases with a modality missing, choose maml")
            return "maml", ("paired modalities, some cases with one missing: modality-aware mutual learning, which "
                            "segments with any subset of the modalities")
        if single:
            return "mkd", "unpaired modalities (different patients): mutual knowledge distillation"
        return "single", "no case holds these modalities yet"

    def train(self, target: str, assistants: list[str] | None = None, method: str | None = None,
              preset: str = "fast", epochs: int | None = None, minutes: float | None = None,
              iterations_per_epoch: int | None = None, options: dict[str, Any] | None = None,
              device: str = "auto") -> str:
        assistants = list(assistants or [])
        method = method or self.suggest_method(target, assistants)[0]
        job = self._backend().submit_job(kind="train", dataset=self.dataset_id, method=method, target=target,
                                         assistants=assistants, preset=preset, epochs=epochs, minutes=minutes,
                                         iterations_per_epoch=iterations_per_epoch, options=options or {},
                                         device=device, val_every=max(1, (epochs or 25) // 5))
        return self._follow(job)

    def finetune(self, epochs: int | None = None, minutes: float | None = None,
                 iterations_per_epoch: int | None = None, device: str = "auto") -> str:
        """Fine-tunes the current model on the dataset as it is now (with every submitted correction)."""
        if self.model_id is None:
            raise ValueError("no model to fine-tune: train one first (or choose one)")
        job = self._backend().submit_job(kind="finetune", dataset=self.dataset_id, model=self.model_id,
                                         epochs=epochs, minutes=minutes, iterations_per_epoch=iterations_per_epoch,
                                         device=device)
        return self._follow(job)

    def models(self) -> list[dict[str, Any]]:
        """The backend's ready models, newest first (what the model selector lists; see `model_title`)."""
        ready = [m for m in self._backend().models() if m.get("state") == "ready"]
        return sorted(ready, key=lambda m: m.get("created") or 0, reverse=True)

    def choose_model(self, model_id: str) -> dict[str, Any]:
        """Segments and fine-tunes with this model from now on; its training dataset becomes the current one when
        the backend still has it (fine-tuning trains on it)."""
        client = self._backend()
        model = client.model(model_id)
        if model.get("state") != "ready":
            raise ValueError(f"model {model_id!r} is {model.get('state')}, not ready: wait for its training or "
                             f"choose another")
        self.model_id, self.model = model_id, model
        try:
            dataset = client.job(model["job"])["params"].get("dataset") if model.get("job") else None
            if dataset:
                self.choose_dataset(dataset)
        except BackendError as e:
            if e.status != 404:  # an imported model has no job here, and a dataset may have been deleted
                raise
        return model

    def start_model_export(self, path: str | Path) -> PendingCall:
        """Starts saving the current model as a zip archive (model.json and weights) at `path` (.zip added)."""
        client, model_id = self._backend(), self.model_id
        if model_id is None:
            raise ValueError("choose a model to export first")
        path = Path(path) if Path(path).suffix == ".zip" else Path(str(path) + ".zip")
        if not path.parent.is_dir():
            raise ValueError(f"no folder {path.parent} to save the model in")
        return self.start_call(f"export of model {model_id} to {path}", lambda: client.export_model(model_id, path))

    def start_model_import(self, path: str | Path) -> PendingCall:
        """Starts adding a model archive (as exported) to the backend; `finish_call` gives the new model."""
        client, path = self._backend(), Path(path)
        if not path.is_file():
            raise ValueError(f"{path} is not a file: choose a model archive (.zip) exported by CrossModalSeg")
        return self.start_call(f"import of {path.name}", lambda: client.import_model(path))

    @staticmethod
    def finish_call(pending: PendingCall) -> Any:
        pending.result()
        return pending.value

    def resumable_trainings(self) -> list[dict[str, Any]]:
        """Trainings that stopped before their end (interrupted by a restart, cancelled or failed), newest first:
        `resume` continues one from its last checkpoint."""
        jobs = [j for j in self._backend().jobs()
                if j["kind"] in ("train", "finetune") and j["state"] in ("interrupted", "cancelled", "failed")]
        return sorted(jobs, key=lambda j: j.get("created") or 0, reverse=True)

    def resume(self, job_id: str) -> str:
        """Continues a stopped training from its last checkpoint; poll it like a new one."""
        job = self._backend().resume(job_id)
        if job["params"].get("dataset"):
            self.choose_dataset(job["params"]["dataset"])
        return self._follow(job)

    def _follow(self, job: dict[str, Any]) -> str:
        with self._following:
            self.job_id, self._events_seen = job["id"], 0
        return job["id"]

    def poll(self) -> JobProgress:
        """State, fraction, ETA and the new log lines of the current job (call it from a timer, or through
        `start_poll`). A poll answered after another job was started (in a worker thread) changes nothing of it."""
        client, job_id, seen = self._backend(), self.job_id, self._events_seen
        if job_id is None:
            return JobProgress("idle")
        job = client.job(job_id)
        page = client.events(job_id, after=seen)
        progress = job["progress"]
        result = JobProgress(job["state"], job_id, progress["fraction"], progress["eta_s"],
                             [m for m in (describe_event(e) for e in page["events"]) if m], job["error"], job["model"])
        with self._following:
            if self.job_id != job_id or self._events_seen != seen:  # another job, or these lines were shown
                return JobProgress("superseded", job_id)
            self._events_seen = page["next"]
            if job["state"] == "succeeded" and job["kind"] in ("train", "finetune"):
                self.model_id = job["model"]
        return result

    def start_poll(self) -> PendingPoll:
        """`poll` in a worker thread: a slow or lost server never holds up the GUI thread."""
        self._backend()
        return self.start_call("progress poll", self.poll, PendingPoll)

    def wait(self, timeout_s: float = 3600, poll_s: float = 0.5) -> JobProgress:
        """Blocks until the current job ends (scripts and tests; the Widget polls with a timer instead)."""
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            progress = self.poll()
            if progress.finished:
                return progress
            time.sleep(poll_s)
        raise TimeoutError(f"job {self.job_id} did not finish within {timeout_s} s")

    def cancel(self) -> None:
        if self.job_id is not None:
            self._backend().cancel(self.job_id)

    # ---- segmentation and QA ---------------------------------------------------------------------------------
    def segment(self, volumes: dict[str, Any], members: bool = False, uncertainty: bool = False,
                model_id: str | None = None) -> SegmentationResult:
        """Segments the given volumes (modality -> node) with the current model and waits; the panel uses
        `start_segment` / `finish_segment` instead, so that its GUI thread never waits for the backend."""
        pending = self.start_segment(volumes, members, uncertainty, model_id)
        pending.wait()
        return self.finish_segment(pending)

    def start_segment(self, volumes: dict[str, Any], members: bool = False, uncertainty: bool = False,
                      model_id: str | None = None) -> PendingSegmentation:
        """Writes the inputs (uncompressed: no gzip pass) and sends them to the backend from a worker thread;
        returns at once. Poll `done()` (e.g. from a timer), then call `finish_segment` on the thread that owns the
        scene: MRML nodes are only ever made there."""
        client = self._backend()
        model_id = model_id or self.model_id
        if model_id is None:
            raise ValueError("no model yet: train one first (or choose one)")
        # The chosen model's description as it was chosen: no request on the caller's (GUI) thread
        model = self.model if self.model is not None and self.model.get("id") == model_id else client.model(model_id)
        volumes = prediction_inputs(model, volumes)
        modality = model["target"] if model["target"] in volumes else next(iter(volumes))
        folder = Path(tempfile.mkdtemp(prefix="segment-", dir=self.work))
        inputs = {m: mrml.write_volume(v, folder / f"input_{m}.nrrd", compress=False) for m, v in volumes.items()}
        pending = PendingSegmentation(model, volumes, modality, members, uncertainty, client=client)

        def predict() -> None:
            try:
                files = client.predict(model_id, inputs, folder / "result", members=members,
                                       uncertainty=uncertainty, request_id=pending.request_id)
                if not pending.cancelled:
                    pending.files = files
            finally:  # the copies of the patient's volumes are not kept
                for path in inputs.values():
                    path.unlink(missing_ok=True)
                if pending.cancelled:  # nobody will read it: no copy of the patient's segmentation stays
                    shutil.rmtree(folder, ignore_errors=True)

        pending.start(predict, "crossmodalseg-segment")
        return pending

    def finish_segment(self, pending: PendingSegmentation) -> SegmentationResult:
        """The result nodes of a finished `start_segment`: a segmentation node named after the input volume, on its
        grid, beside it in the subject hierarchy, plus the QA nodes asked for; the backend's error, if any."""
        pending.result()
        if pending.cancelled:
            raise ValueError("this segmentation was cancelled; segment again")
        files, labels = pending.files, pending.model["labels"]
        reference = pending.volumes[pending.modality]
        base = reference.GetName()
        result = SegmentationResult(
            mrml.add_segmentation(self.scene, files["segmentation.nrrd"], reference, labels, f"{base} segmentation",
                                  on_reference_grid=True),
            files=files, case_id=self.case_of(pending.volumes),
            modality=pending.modality, volumes=dict(pending.volumes))
        for name, path in files.items():
            if name.startswith("segmentation_member_"):
                member = name[len("segmentation_member_"):].split(".")[0]
                result.members[member] = mrml.add_segmentation(self.scene, path, reference, labels,
                                                               f"{base} member {member}", on_reference_grid=True)
        if "segmentation_disagreement.nrrd" in files:
            result.disagreement = mrml.add_disagreement_volume(self.scene, files["segmentation_disagreement.nrrd"],
                                                               reference, f"{base} disagreement")
        if pending.uncertainty and "segmentation.json" in files:
            result.agreement_table = mrml.add_agreement_table(self.scene, files["segmentation.json"],
                                                              predicted_structures(labels), f"{base} member agreement")
        return result

    def submit_correction(self, segmentation_node: Any, volumes: dict[str, Any], modality: str) -> str:
        """Sends a corrected segmentation and waits (see `start_correction`, which the panel uses)."""
        pending = self.start_correction(segmentation_node, volumes, modality)
        pending.wait()
        return self.finish_upload(pending)

    def start_correction(self, segmentation_node: Any, volumes: dict[str, Any], modality: str) -> PendingUpload:
        """Starts sending a corrected segmentation of `volumes[modality]` as that case's `final` label (the case is
        added first when these volumes were never sent); `finish_upload` gives the case id."""
        volumes = {m: v for m, v in volumes.items() if v is not None}
        case_id = self.case_of(volumes)
        if case_id is None:
            return self.start_add_case(volumes, {modality: segmentation_node})
        return self._start_upload(case_id, volumes, {modality: segmentation_node}, send_volumes=False)

    def cleanup(self) -> None:
        """Stops the local backend and deletes the work folder this logic made (results it received included)."""
        self._cleaned_up = True
        self.scene.RemoveObserver(self._scene_closed)
        self.stop_backend()
        if self._own_work:
            shutil.rmtree(self.work, ignore_errors=True)


def describe_event(event: dict[str, Any]) -> str | None:
    """One log line for a progress event (None for the ones not worth a line)."""
    kind = event.get("event")
    if kind == "epoch":
        line = f"epoch {event['epoch']}/{event['of']}  loss {event.get('loss', float('nan')):.4f}"
        if event.get("val_dice"):
            line += f"  Dice ({event.get('val_on', 'validation')}) {event['val_dice'].get('mean', float('nan')):.3f}"
        return line
    if kind == "log":
        return event.get("message")
    if kind == "start":
        return f"training {event.get('method')} on {event.get('device')}"
    if kind == "resumed":
        return f"resumed from epoch {event.get('epoch')}"
    if kind == "finished":
        return f"job {event.get('state')}" + (f": {event['error']}" if event.get("error") else "")
    if kind == "started":
        return "job started on " + ", ".join(event.get("devices") or [])
    return None


# ---- the panel's decisions, as pure functions ----------------------------------------------------------------------
def model_title(model: dict[str, Any]) -> str:
    """How the model selector names a model: its method, modalities (target first), validation Dice (and on what)
    and date (local time), e.g. "mkd: ct + mr, Dice 0.83 (held-out), 2026-11-24 10:31"."""
    target = model.get("target", "")
    modalities = [target, *[m for m in model.get("modalities", {}) if m != target]]
    text = f"{model.get('method', '?')}: {' + '.join(m for m in modalities if m)}"
    dice = (model.get("training") or {}).get("val_dice")
    if isinstance(dice, dict) and isinstance(dice.get("mean"), (int, float)):
        text += f", Dice {dice['mean']:.2f}"
        on = (model.get("training") or {}).get("val_on")
        text += f" ({on})" if on else ""
    created = model.get("created")
    if isinstance(created, (int, float)):  # the backend's creation time (seconds since the epoch), shown local
        text += ", " + time.strftime("%Y-%m-%d %H:%M", time.localtime(created))
    return text


POLL_MS = 1000
REQUEST_TICK_MS = 20  # how often the panel looks at its background requests while any runs
WORKER_SLICE_S = 0.002  # the GIL handed to worker threads at each of those ticks (see let_workers_run)
POLL_MAX_MS = 30000
POLL_GIVE_UP_AFTER = 8  # failed polls in a row (at least 1.5 minutes with the back-off) before the panel stops


def predicted_structures(labels: dict[str, int]) -> list[str]:
    """The structures a model predicts: not background, and not "ignore" (any letter case; the backend's mark for
    voxels of unknown class, which no model predicts)."""
    return [name for name, value in labels.items() if value != 0 and name.strip().lower() != "ignore"]


def let_workers_run() -> None:
    """Hands the GIL to the worker threads for WORKER_SLICE_S. Slicer's Python (PythonQt, whose thread support
    CTK and Slicer do not enable) keeps the GIL on the GUI thread while the Qt event loop idles, so a worker thread
    moves only while the GUI thread runs Python. A segmentation request with 40 MB each way took 10.1 s at one
    200 ms tick, 0.85 s at 20 ms ticks with this slice, 0.16 s unhindered (backend/benchmarks/bench_panel_threads.py).
    """
    time.sleep(WORKER_SLICE_S)


def poll_interval_ms(failures: int) -> int:
    """Time to the next progress poll after `failures` failed polls in a row: 1 s while the backend answers,
    then doubling up to 30 s, so a slow or unreachable backend is not hammered and the panel stays responsive."""
    return min(POLL_MS * 2 ** max(0, failures), POLL_MAX_MS)


def training_budget(epochs: int, minutes: int, share: float = 1.0) -> dict[str, Any]:
    """The budget fields of a training job from the panel: its minutes when set (0 = off), else its epochs; `share`
    of it (a fine-tuning gets a quarter), at least one epoch or half a minute. One of the two, never both (the
    backend refuses both)."""
    if minutes > 0:
        return {"minutes": max(0.5, minutes * share), "epochs": None}
    return {"epochs": max(1, int(epochs * share)), "minutes": None}


def prediction_inputs(model: dict[str, Any], volumes: dict[str, Any]) -> dict[str, Any]:
    """The selected volumes a model reads at inference: `mkd` only its target (its ensemble runs on the target
    image), the others the modalities they use. Other selected volumes are not sent (an assistant still selected
    for a `single` model, the MR of an unpaired MKD workflow)."""
    given = {m: v for m, v in volumes.items() if v is not None}
    wanted = [model["target"]] if model.get("method") == "mkd" else list(model["modalities"])
    chosen = {m: given[m] for m in wanted if m in given}
    if not chosen:
        raise ValueError(f"this model takes {', '.join(wanted)}; got {', '.join(given) or 'nothing'}")
    return chosen


def correction_volumes(volumes: dict[str, Any], modality: str, paired: bool) -> dict[str, Any]:
    """The volumes a correction of `volumes[modality]` belongs with: all of them for a paired case (one patient,
    co-registered), only that volume otherwise (unpaired volumes are different patients: pairing them would make a
    case of two patients)."""
    given = {m: v for m, v in volumes.items() if v is not None}
    if modality not in given:
        raise ValueError(f"select the {modality} volume that the correction was drawn on")
    return dict(given) if paired else {modality: given[modality]}


def structures_fit(existing: dict[str, int], labels: dict[str, int], dataset_id: str) -> None:
    """A segmentation fits a dataset when each of its segments names one of the dataset's structures (letter case,
    order and a subset do not matter: segments are matched by name when exported); else ValueError naming those
    that do not."""
    known = {name.lower() for name, value in existing.items() if value != 0}
    unknown = [name for name, value in labels.items() if value != 0 and name.lower() not in known]
    if unknown:
        raise ValueError(f"dataset {dataset_id!r} has the structures {', '.join(n for n in existing if existing[n])}; "
                         f"segment(s) {', '.join(map(repr, unknown))} are not among them: rename them, or use "
                         f"another dataset")
