"""Synchronous prediction without computing in the web process: one long-lived worker process that keeps the most
recently used models loaded, fed through a process pool. Calls take turns (one runs in the worker at a time); a call
whose client goes away or cancels it leaves the queue, or stops the worker when it is the one running there; a
worker that crashes (say, killed for memory) is replaced for the next call."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from .processes import kill_pool, one_process_pool
from .store import Conflict

CACHE_SIZE = 2
ABANDON_CHECK_S = 0.25  # how often a waiting or running call asks whether its client still wants it
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


class PredictionAbandoned(Conflict):
    """A call given up before its end: its client cancelled it or went away (answered 409, if anyone listens)."""


Abandoned = Callable[[], Awaitable[str | None]]  # why the call's client no longer wants it; None while it does


class PredictorPool:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None
        self._turn = asyncio.Lock()  # the one call in the worker is always the holder's: it may stop the worker

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                # dies with the server (kill -9 included); started by `run`, on the event loop's thread
                self._pool = one_process_pool()
            return self._pool

    async def run(self, fn, *args, abandoned: Abandoned | None = None) -> Any:
        """`fn(*args)` in the worker process. `abandoned` is asked every ABANDON_CHECK_S while the call waits for
        its turn or runs: once it gives a reason, the call ends with PredictionAbandoned, and a running call stops
        the worker (the next call starts a new one and loads its model again) so that the GPU or CPU goes to the
        calls still wanted."""
        await self._take_turn(abandoned)
        try:
            pool = self._executor()
            running = asyncio.wrap_future(pool.submit(fn, *args))
            while not (await asyncio.wait({running}, timeout=ABANDON_CHECK_S))[0]:
                reason = abandoned is not None and await abandoned()
                if reason:
                    running.add_done_callback(_forget)  # the worker's end (BrokenProcessPool) is nobody's error
                    self._stop(pool)
                    raise PredictionAbandoned(reason)
            try:
                return running.result()
            except BrokenProcessPool:
                self._forget_pool(pool)
                raise RuntimeError("the prediction worker died (out of memory?); the next request starts a new "
                                   "one; try a smaller image or free memory") from None
        finally:
            self._turn.release()

    async def _take_turn(self, abandoned: Abandoned | None) -> None:
        turn = asyncio.ensure_future(self._turn.acquire())
        try:
            while not (await asyncio.wait({turn}, timeout=ABANDON_CHECK_S))[0]:
                reason = abandoned is not None and await abandoned()
                if reason:
                    raise PredictionAbandoned(reason)
        except BaseException:
            turn.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await turn
            if not turn.cancelled():  # the turn came as the wait ended: pass it on
                self._turn.release()
            raise

    def _forget_pool(self, pool: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is pool:
                self._pool = None

    def _stop(self, pool: ProcessPoolExecutor) -> None:
        """Ends the worker now, whatever it computes (the executor has no public way before Python 3.14)."""
        self._forget_pool(pool)
        kill_pool(pool)

    def shutdown(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None


def _forget(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()  # retrieved: asyncio does not log it as never retrieved
