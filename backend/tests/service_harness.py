"""A real `crossmodalseg serve` in a subprocess on 127.0.0.1 (random port), and helpers to drive it over HTTP."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import SimpleITK as sitk

PHANTOM_LABELS = {"background": 0, "liver": 1, "kidney": 2, "spleen": 3}


class Server:
    def __init__(self, home: Path, token: str | None = None, max_upload_mb: float = 64, env: dict | None = None):
        self.home, self.token, self.max_upload_mb, self.env = Path(home), token, max_upload_mb, env or {}
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.client: httpx.Client | None = None

    def start(self) -> "Server":
        env = {**os.environ, **self.env}
        env.pop("CROSSMODALSEG_TOKEN", None)
        if self.token:
            env["CROSSMODALSEG_TOKEN"] = self.token
        log = open(self.home.parent / f"{self.home.name}-server.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "crossmodalseg.cli", "serve", "--home", str(self.home),
                                      "--port", "0", "--max-upload-mb", str(self.max_upload_mb)],
                                     stdout=subprocess.PIPE, stderr=log, env=env)
        line = self.proc.stdout.readline()  # the server prints its URL once it is bound
        if not line:
            raise RuntimeError(f"server did not start; see {log.name}")
        self.url = json.loads(line)["url"]
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self.client = httpx.Client(base_url=self.url, headers=headers, timeout=300)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if self.client.get("/health").status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError("server did not answer /health")

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.client.close()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.client:
            self.client.close()

    # ---- helpers ---------------------------------------------------------------------------------------------
    def create_dataset(self, dataset_id: str, modalities=None) -> dict[str, Any]:
        r = self.client.post("/datasets", json={"id": dataset_id, "name": dataset_id, "labels": PHANTOM_LABELS,
                                                "modalities": modalities or {"ct": "CT", "mr": "MR"}})
        assert r.status_code == 201, r.text
        return r.json()

    def upload_case(self, dataset_id: str, case, labels: bool = True) -> None:
        for modality, path in case.images.items():
            r = self.client.put(f"/datasets/{dataset_id}/cases/{case.id}/images/{modality}", content=path.read_bytes())
            assert r.status_code == 201, r.text
            if labels and modality in case.labels:
                r = self.client.put(f"/datasets/{dataset_id}/cases/{case.id}/labels/{modality}",
                                    content=case.labels[modality].read_bytes())
                assert r.status_code == 201, r.text

    def submit(self, **job: Any) -> dict[str, Any]:
        r = self.client.post("/jobs", json=job)
        assert r.status_code == 202, r.text
        return r.json()

    def wait(self, job_id: str, states=("succeeded", "failed", "cancelled", "interrupted"), timeout: float = 600,
             until=None) -> dict[str, Any]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            job = self.client.get(f"/jobs/{job_id}").json()
            if job["state"] in states or (until is not None and until(job)):
                return job
            time.sleep(0.3)
        raise TimeoutError(f"job {job_id} still {job['state']} after {timeout} s")

    def events(self, job_id: str) -> list[dict[str, Any]]:
        out, after = [], 0
        while True:
            page = self.client.get(f"/jobs/{job_id}/events", params={"after": after}).json()
            out += page["events"]
            if page["next"] >= page["total"]:
                return out
            after = page["next"]

    def predict(self, model_id: str, images: dict[str, Path], members: bool = False,
                uncertainty: bool = False) -> dict[str, sitk.Image]:
        files = {m: (p.name, p.read_bytes(), "application/octet-stream") for m, p in images.items()}
        data = {"model": model_id, "members": str(members).lower(), "uncertainty": str(uncertainty).lower()}
        r = self.client.post("/predict", data=data, files=files)
        assert r.status_code == 200, r.text
        return read_zip_images(r.content)


def read_zip_images(content: bytes) -> dict[str, sitk.Image]:
    """name -> image for every image in a zip answer (read through a temporary file: SimpleITK reads paths)."""
    import tempfile

    out = {}
    with zipfile.ZipFile(io.BytesIO(content)) as z, tempfile.TemporaryDirectory() as tmp:
        for name in z.namelist():
            if name.endswith(".nrrd"):
                path = Path(tmp) / name
                path.write_bytes(z.read(name))
                out[name] = sitk.ReadImage(str(path))
    return out


def voxels(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image)


def same_geometry(a: sitk.Image, b: sitk.Image) -> bool:
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-9)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-6)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-9))


def group_processes(pgid: int) -> list[int]:
    """The live processes of a worker's tree (its process group on POSIX)."""
    from crossmodalseg.service.processes import tree

    return [p.pid for p in tree(pgid)]
