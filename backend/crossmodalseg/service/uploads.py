"""Uploaded files are checked before anything is stored: size, format (by content, not by name), a readable 3D
image, finite voxels; labels also integer values that the dataset names and the geometry of their image.

The server never reads an uploaded image itself: `ImageReaders` do, in processes of their own. ITK's readers are C++,
and a header that slips past the gate can crash the process that reads it (a MetaImage with `NDims = -1` did, with a
segmentation fault, before the gate refused it): in a reader, such a file ends that reader alone, and its upload is
refused."""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import SimpleITK as sitk

from ..data.check import LabelCensus, VoxelCensus
from ..data.io import Geometry, ImageError, read_image, write_image
from ..errors import UserError
from .processes import kill_pool, one_process_pool

STORED_SUFFIX = ".nrrd"  # NRRD keeps spacing, origin and direction in double precision (NIfTI's sform is float32)
# Uploads read and checked at once, one per reader process. A check holds the whole image in memory, and a .nii.gz
# of a few MB can hold gigabytes of voxels (zeros compress a thousandfold): many sent together must not add up. A
# slot is held from the read to the staged file (a worker thread may wait for one); the checks go slab by slab, with
# no full-size temporaries.
CHECK_SLOTS = 2


class UploadError(UserError):
    """An upload that is refused; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status

    def __reduce__(self):  # raised in a reader process, it comes back with its status
        return type(self), (str(self), self.status)


def sniff_suffix(head: bytes) -> str:
    """The image format from the first bytes of a file."""
    if head[:2] == b"\x1f\x8b":
        return ".nii.gz"
    if head[:4] == b"NRRD":
        return ".nrrd"
    if head[:10] == b"ObjectType" or head[:5] == b"NDims":
        return ".mha"
    if len(head) >= 4 and {int.from_bytes(head[:4], "little"), int.from_bytes(head[:4], "big")} & {348, 540}:
        return ".nii"
    raise UploadError("not an image file this server reads: upload NIfTI (.nii, .nii.gz), NRRD (.nrrd, with the "
                      "data in the same file) or MetaImage (.mha)", status=415)


IDLE_TIMEOUT_S = 30.0  # longest wait for the next piece of a body
MIN_RATE_BYTES_S = 64 * 1024  # a body slower than this on average (after a grace period) is a trickle
GRACE_S = 30.0


async def read_form(request, **limits):
    """The multipart form of `request` (Content-Length required), or UploadError 408 when its body does not arrive
    within GRACE_S plus its length at MIN_RATE_BYTES_S: the pacing of uploads, for a body Starlette reads whole (a
    POST /predict trickled a byte every 20 s held its connection and spooled file open for as long as it liked)."""
    length = request.headers.get("content-length")
    if length is None or not length.isdigit():
        raise UploadError("send the Content-Length header with the images", 411)
    allowed_s = GRACE_S + int(length) / MIN_RATE_BYTES_S
    try:
        return await asyncio.wait_for(request.form(**limits), allowed_s)
    except asyncio.TimeoutError:
        raise UploadError(f"the request body did not arrive within {allowed_s:.0f} s (a stalled or too slow "
                          f"connection); send it again", 408) from None


async def _paced(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The body's chunks, or UploadError 408 when the client stalls or trickles: a slow client must not hold a
    worker thread and a temporary file open for minutes."""
    started = time.monotonic()
    received = 0
    iterator = chunks.__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(iterator.__anext__(), IDLE_TIMEOUT_S)
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise UploadError(f"the upload stalled (nothing for {IDLE_TIMEOUT_S:.0f} s); send it again",
                              status=408) from None
        received += len(chunk)
        elapsed = time.monotonic() - started
        if elapsed > GRACE_S and received < MIN_RATE_BYTES_S * (elapsed - GRACE_S):
            raise UploadError(f"the upload is too slow ({received / elapsed / 1024:.1f} KiB/s); send it again over a "
                              f"faster connection", status=408)
        yield chunk


async def stream_to_file(chunks: AsyncIterator[bytes], tmp_dir: Path, limit_bytes: int,
                         suffix: str = ".part") -> Path:
    """Streams a request body into a temporary file, refusing it past `limit_bytes` or when the client stalls or
    trickles (nothing is left behind)."""
    fd, name = tempfile.mkstemp(dir=tmp_dir, prefix="upload.", suffix=suffix)
    size = 0
    try:
        with os.fdopen(fd, "wb") as f:
            async for chunk in _paced(chunks):
                size += len(chunk)
                if size > limit_bytes:
                    raise UploadError(f"upload larger than the server's limit of {limit_bytes / 2**20:.0f} MiB "
                                      f"(start the server with a larger --max-upload-mb)", status=413)
                f.write(chunk)
        if size == 0:
            raise UploadError("empty upload: send the file as the request body", status=400)
        return Path(name)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise


async def receive(chunks: AsyncIterator[bytes], tmp_dir: Path, limit_bytes: int) -> Path:
    """An uploaded image in a temporary file named by its sniffed format."""
    part = await stream_to_file(chunks, tmp_dir, limit_bytes)
    try:
        with open(part, "rb") as f:
            suffix = sniff_suffix(f.read(16))
        path = part.with_suffix(suffix)
        os.replace(part, path)
        return path
    except BaseException:
        part.unlink(missing_ok=True)
        raise


def load_checked(path: Path, kind: str, label_values: list[int] | None = None) -> sitk.Image:
    """The uploaded file as a 3D image; UploadError with the reason when it is not acceptable. Reads the file: call
    it in a reader process (`ImageReaders`), not in the server's."""
    try:
        image = read_image(path)
    except ImageError as e:
        raise UploadError(str(e).replace(str(path), "uploaded file")) from None
    census = VoxelCensus.of(image).problems("the image") if kind == "image" else \
        LabelCensus.of(image, label_values or []).problems("the label map")
    if census:
        raise UploadError("; ".join(census))
    return image


@dataclass(frozen=True)
class StagedImage:
    """A checked upload written in the stored format, waiting to be committed (moved into its case's folder)."""
    path: Path
    sha256: str
    geometry: Geometry


def check_and_stage(path: Path, kind: str, label_values: list[int] | None, staging_dir: Path) -> StagedImage:
    """In a reader: the upload checked (`load_checked`) and written as a stored image in `staging_dir`."""
    image = load_checked(path, kind, label_values)
    staged, sha = store_image(image, Path(staging_dir) / f"staged.{secrets.token_hex(8)}")
    return StagedImage(staged, sha, Geometry.of(image))


def check_image(path: Path) -> None:
    """In a reader: refuses (UploadError) an image upload that `load_checked` refuses."""
    load_checked(path, "image")


def commit_staged(staged: StagedImage, destination: Path) -> Path:
    """Moves a staged image to `destination` + the stored suffix, in one rename (same file system)."""
    path = destination.with_name(destination.name + STORED_SUFFIX)
    path.parent.mkdir(parents=True, exist_ok=True)  # a case's folder comes with its first file
    os.replace(staged.path, path)
    return path


R = TypeVar("R")
RESAVE = ("nothing was stored; check that the file opens in your viewer, save it again as NIfTI (.nii.gz) or NRRD and "
          "upload that")
READER_CRASHED = ("the process reading this file ended without an answer (ITK crashed on it, or the server ran out "
                  f"of memory): {RESAVE}")


# The longest a reader may take over one upload: a file that sends ITK into an endless loop must not hold a reader
# (and with CHECK_SLOTS of them, every upload) for good. Far above what a real file takes: six 512x512x256 float64
# label maps were read and checked by the two readers in about 20 s.
READ_TIMEOUT_S = 600.0


class ImageReaders:
    """CHECK_SLOTS reader processes, each checking one upload at a time (a calling thread waits for a free one).
    A reader that dies (a crash in ITK, or killed for memory) or takes longer than `timeout_s` fails only the upload
    it was reading: that upload is refused (422) and a new reader takes the old one's place."""

    def __init__(self, slots: int = CHECK_SLOTS, timeout_s: float = READ_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s
        self._slots = threading.BoundedSemaphore(slots)
        self._lock = threading.Lock()
        self._idle: list[ProcessPoolExecutor] = []
        self._all: set[ProcessPoolExecutor] = set()
        self._starter = ThreadPoolExecutor(1, thread_name_prefix="image-reader-starter")

    def run(self, fn: Callable[..., R], *args: Any) -> R:
        """`fn(*args)` in a reader process; blocks (call it from a worker thread)."""
        with self._slots:
            reader = self._take()
            try:
                result = reader.submit(fn, *args).result(timeout=self.timeout_s)
            except BrokenProcessPool:
                self._drop(reader)
                raise UploadError(READER_CRASHED) from None
            except TimeoutError:
                self._drop(reader, kill=True)
                raise UploadError(f"reading this file took longer than {self.timeout_s:g} s and was stopped; "
                                  f"{RESAVE}") from None
            except BaseException:
                self._give_back(reader)
                raise
            self._give_back(reader)
            return result

    def _take(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        reader = self._starter.submit(_start_reader).result()
        with self._lock:
            self._all.add(reader)
        return reader

    def _give_back(self, reader: ProcessPoolExecutor) -> None:
        with self._lock:
            self._idle.append(reader)

    def _drop(self, reader: ProcessPoolExecutor, kill: bool = False) -> None:
        with self._lock:
            self._all.discard(reader)
        if kill:
            kill_pool(reader)
        else:
            reader.shutdown(wait=False)

    def shutdown(self) -> None:
        with self._lock:
            readers, self._all, self._idle = list(self._all), set(), []
        for reader in readers:
            reader.shutdown(wait=False, cancel_futures=True)
        self._starter.shutdown(wait=False)


def _start_reader() -> ProcessPoolExecutor:
    """A reader process, started at once by the calling thread: ImageReaders start them all from one thread that
    lives as long as they do (why: `one_process_pool`; a reader started by a request's thread was killed with it)."""
    reader = one_process_pool()
    reader.submit(int).result()
    return reader


def check_same_grid(label: sitk.Image | Geometry, image: sitk.Image | Geometry, what: str) -> None:
    a = label if isinstance(label, Geometry) else Geometry.of(label)
    b = image if isinstance(image, Geometry) else Geometry.of(image)
    if not a.matches(b):
        raise UploadError(f"{what}: the label's grid ({a.describe()}) differs from its image's ({b.describe()}); "
                          f"a label must lie on the grid of the image it was drawn on")


def store_image(image: sitk.Image, destination: Path) -> tuple[Path, str]:
    """Writes the image (atomically) in the stored format; returns the path and its sha256."""
    path = write_image(image, destination.with_name(destination.name + STORED_SUFFIX))
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return path, digest.hexdigest()
