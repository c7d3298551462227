"""Synchronous prediction without computing in the web process: one long-lived worker process that keeps the most
recently used models loaded, fed through a process pool. Requests queue; a worker that crashes (say, killed for
memory) is replaced for the next request."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

CACHE_SIZE = 2
_cache: dict[tuple[str, float], Any] = {}


def _load(model_dir: str, device: str):
    from ..engine.inferer import Predictor

    key = (model_dir, os.path.getmtime(Path(model_dir) / "model.json"))  # a re-trained model is reloaded
    if key not in _cache:
        while len(_cache) >= CACHE_SIZE:
            _cache.pop(next(iter(_cache)))
        _cache[key] = Predictor(model_dir, device=device)
    return _cache[key]


def predict_in_worker(model_dir: str, images: dict[str, str], out_dir: str, members: bool, uncertainty: bool,
                      device: str) -> dict[str, str]:
    predictor = _load(model_dir, device)
    result = predictor.predict(images, members=members, uncertainty=uncertainty)
    return {k: str(v) for k, v in result.save(Path(out_dir), suffix=".nrrd").items()}


def validate_model_in_worker(model_dir: str) -> dict[str, Any]:
    """Loads a model folder the way prediction does (JSON + safetensors, nothing unpickled); returns model.json."""
    from ..engine.checkpoint import load_weights, read_model_meta
    from ..engine.inferer import build_method

    meta = read_model_meta(Path(model_dir))
    method = build_method(meta)  # ModelFolderError when a field has the wrong shape
    load_weights(Path(model_dir), method.nets)
    for extra in set(Path(model_dir).glob("*.safetensors")) - {Path(model_dir) / f"{n}.safetensors" for n in method.nets}:
        extra.unlink()  # weights no network reads would only take disk space
    return meta


def _init_worker(server_pid: int) -> None:
    from .worker import die_with_parent

    die_with_parent(server_pid)  # a server killed with kill -9 must not leave its predictor process behind


class PredictorPool:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                # spawn: a clean interpreter, not a fork of the threaded web process
                self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=_init_worker, initargs=(os.getpid(),))
            return self._pool

    async def run(self, fn, *args) -> Any:
        pool = self._executor()
        try:
            return await asyncio.wrap_future(pool.submit(fn, *args))
        except BrokenProcessPool:
            with self._lock:
                if self._pool is pool:
                    self._pool = None
            raise RuntimeError("the prediction worker died (out of memory?); the next request starts a new one; "
                               "try a smaller image or free memory") from None

    def shutdown(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None
