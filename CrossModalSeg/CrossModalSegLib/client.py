"""A small client of the CrossModalSeg HTTP service, on the standard library only (Slicer's Python has no httpx,
and its `requests` must not be touched)."""

from __future__ import annotations

import http.client
import io
import json
import mimetypes
import os
import shutil
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zipfile
from pathlib import Path
from typing import Any


class BackendError(RuntimeError):
    """The backend refused a request or could not be reached; the message is the backend's own explanation."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


STATUS_TIMEOUT_S = 15.0  # status calls (health, jobs, events, datasets): a live backend answers at once
TRANSFER_TIMEOUT_S = 600.0  # uploads, downloads and synchronous prediction


class BackendClient:
    """`status_timeout` bounds the small calls that the panel makes often (a poll tick never blocks longer);
    `timeout` the transfers of images and results."""

    def __init__(self, url: str, token: str | None = None, timeout: float = TRANSFER_TIMEOUT_S,
                 status_timeout: float = STATUS_TIMEOUT_S):
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.status_timeout = status_timeout

    # ---- transport -------------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None,
                 params: dict[str, Any] | None = None, transfer: bool = False) -> tuple[bytes, str]:
        """One request; every failure (refused, timed out, dropped, an HTTP error) becomes one BackendError."""
        timeout = self.timeout if transfer else self.status_timeout
        url = self.url + path
        if params:
            url += "?" + urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        request = urllib.request.Request(url, data=body, method=method)
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        if content_type:
            request.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.read(), response.headers.get("Content-Type", "")
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                detail = json.loads(raw)["detail"]
            except (ValueError, KeyError, TypeError):
                detail = raw.decode(errors="replace")[:500] or e.reason
            if not isinstance(detail, str):  # request validation errors come as a list
                detail = "; ".join(f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}" for d in detail)
            raise BackendError(f"{detail} (HTTP {e.code})", e.code) from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, TimeoutError):
                raise BackendError(f"the CrossModalSeg backend at {self.url} did not answer within {timeout:g} s "
                                   f"(a slow or dropped connection?)") from None
            raise BackendError(f"cannot reach the CrossModalSeg backend at {self.url}: {e.reason}") from None
        except TimeoutError:  # the connection was made but the answer stopped coming
            raise BackendError(f"the CrossModalSeg backend at {self.url} did not answer within {timeout:g} s (a slow "
                               f"or dropped connection?)") from None
        except (ConnectionError, http.client.HTTPException) as e:  # reset, closed mid-answer, a garbled answer
            raise BackendError(f"the connection to the CrossModalSeg backend at {self.url} broke: "
                               f"{type(e).__name__}: {e}") from None

    def get_json(self, path: str, **params: Any) -> Any:
        return json.loads(self._request("GET", path, params=params)[0])

    def send_json(self, method: str, path: str, data: Any = None) -> Any:
        body = json.dumps(data).encode() if data is not None else None
        return json.loads(self._request(method, path, body, "application/json" if body else None)[0])

    # ---- resources -------------------------------------------------------------------------------------------
    def health(self) -> bool:
        try:
            return self.get_json("/health").get("status") == "ok"
        except BackendError:
            return False

    def info(self) -> dict[str, Any]:
        return self.get_json("/info")

    def create_dataset(self, dataset_id: str, name: str, labels: dict[str, int],
                       modalities: dict[str, str]) -> dict[str, Any]:
        return self.send_json("POST", "/datasets", {"id": dataset_id, "name": name, "labels": labels,
                                                    "modalities": modalities})

    def datasets(self) -> list[dict[str, Any]]:
        return self.get_json("/datasets")

    def dataset(self, dataset_id: str) -> dict[str, Any]:
        return self.get_json(f"/datasets/{_q(dataset_id)}")

    def put_image(self, dataset_id: str, case_id: str, modality: str, path: Path) -> dict[str, Any]:
        return json.loads(self._request("PUT", f"/datasets/{_q(dataset_id)}/cases/{_q(case_id)}/images/{_q(modality)}",
                                        Path(path).read_bytes(), "application/octet-stream", transfer=True)[0])

    def put_label(self, dataset_id: str, case_id: str, modality: str, path: Path, tag: str = "final") -> dict[str, Any]:
        return json.loads(self._request("PUT", f"/datasets/{_q(dataset_id)}/cases/{_q(case_id)}/labels/{_q(modality)}",
                                        Path(path).read_bytes(), "application/octet-stream", {"tag": tag},
                                        transfer=True)[0])

    def label(self, dataset_id: str, case_id: str, modality: str, tag: str = "final") -> bytes:
        """A stored label map (NRRD bytes)."""
        return self._request("GET", f"/datasets/{_q(dataset_id)}/cases/{_q(case_id)}/labels/{_q(modality)}",
                             params={"tag": tag}, transfer=True)[0]

    def submit_job(self, **job: Any) -> dict[str, Any]:
        return self.send_json("POST", "/jobs", job)

    def jobs(self) -> list[dict[str, Any]]:
        return self.get_json("/jobs")

    def job(self, job_id: str) -> dict[str, Any]:
        return self.get_json(f"/jobs/{_q(job_id)}")

    def resume(self, job_id: str) -> dict[str, Any]:
        return self.send_json("POST", f"/jobs/{_q(job_id)}/resume")

    def events(self, job_id: str, after: int = 0) -> dict[str, Any]:
        return self.get_json(f"/jobs/{_q(job_id)}/events", after=after)

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self.send_json("DELETE", f"/jobs/{_q(job_id)}")

    def models(self) -> list[dict[str, Any]]:
        return self.get_json("/models")

    def model(self, model_id: str) -> dict[str, Any]:
        return self.get_json(f"/models/{_q(model_id)}")

    def export_model(self, model_id: str, path: Path) -> Path:
        """Saves a model archive (zip of model.json and weights) at `path`, whole or not at all."""
        content, _ = self._request("GET", f"/models/{_q(model_id)}/archive", transfer=True)
        path = Path(path)
        partial = path.with_name(path.name + ".partial")
        partial.write_bytes(content)
        os.replace(partial, path)
        return path

    def import_model(self, path: Path, name: str | None = None) -> dict[str, Any]:
        """Adds a model archive to the backend (checked there before it is listed); returns the model."""
        content, _ = self._request("POST", "/models", Path(path).read_bytes(), "application/zip",
                                   params={"name": name}, transfer=True)
        return json.loads(content)

    def predict(self, model_id: str, images: dict[str, Path], out_dir: Path, members: bool = False,
                uncertainty: bool = False, request_id: str | None = None) -> dict[str, Path]:
        """Segments one case; the answer's files are extracted into `out_dir`: name -> path. `request_id` (chosen
        by the caller) lets `cancel_prediction` stop it from another thread."""
        fields = {"model": model_id, "members": str(members).lower(), "uncertainty": str(uncertainty).lower()}
        body, content_type = _multipart(fields, {m: Path(p) for m, p in images.items()})
        content, _ = self._request("POST", "/predict", body, content_type, params={"request": request_id},
                                   transfer=True)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        out = {}
        with zipfile.ZipFile(io.BytesIO(content)) as z:
            for name in z.namelist():
                if "/" in name or name.startswith("."):
                    continue
                with z.open(name) as src, open(out_dir / name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                out[name] = out_dir / name
        return out

    def cancel_prediction(self, request_id: str) -> dict[str, Any]:
        """Stops the prediction posted with this `request_id` (it answers 409); BackendError 404 once it ended."""
        return self.send_json("DELETE", f"/predict/{_q(request_id)}")


def _q(part: str) -> str:
    return urllib.parse.quote(str(part), safe="")


def _multipart(fields: dict[str, str], files: dict[str, Path]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    chunks: list[bytes] = []
    for name, value in fields.items():
        chunks += [f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n".encode(),
                   str(value).encode(), b"\r\n"]
    for name, path in files.items():
        kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        chunks += [f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{path.name}\"\r\n"
                   f"Content-Type: {kind}\r\n\r\n".encode(), path.read_bytes(), b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"
