"""Worker process trees, portably (Linux, macOS, Windows): start one in its own group, find it, end it, and make it
die with its server.

psutil does the finding and ending on every OS. Two OS-specific pieces stay small and named:
- POSIX: a worker starts a new session, so its process group holds everything it starts (torchrun's ranks
  included) even after a rank is orphaned; ending a tree also signals that group.
- Windows: a worker starts in a new process group without a console window (no window pops up from Slicer).
A worker dies with its server by a watchdog thread that polls the server's pid (every OS), and on Linux also by the
kernel's parent-death signal, which fires even when the worker is too busy to poll.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import IO, Any

import psutil

from ..errors import UserError

IS_WINDOWS = sys.platform == "win32"
WATCHDOG_PERIOD_S = 1.0


def spawn(command: Sequence[str], **popen: Any) -> subprocess.Popen:
    """Starts `command` as the root of its own process group (so that it and all it starts can be ended)."""
    if IS_WINDOWS:
        popen["creationflags"] = (popen.get("creationflags", 0) | subprocess.CREATE_NEW_PROCESS_GROUP
                                  | subprocess.CREATE_NO_WINDOW)
    else:
        popen["start_new_session"] = True
    return subprocess.Popen(list(command), **popen)


def tree(pid: int) -> list[psutil.Process]:
    """The live process `pid`, its descendants and (POSIX) the rest of its process group; [] when it has ended."""
    found: dict[int, psutil.Process] = {}
    try:
        root = psutil.Process(pid)
        found[pid] = root
        found.update({p.pid: p for p in root.children(recursive=True)})
    except psutil.NoSuchProcess:
        pass
    if not IS_WINDOWS:
        found.update({p.pid: p for p in _posix_group(pid)})
    return [p for p in found.values() if _running(p)]


def alive(pid: int) -> bool:
    return bool(tree(pid))


def runs_job(pid: int, job_id: str) -> bool:
    """Whether the tree of `pid` is the worker of `job_id` (its command line names the job): a recycled pid of
    another program, or another server's worker, is never ended by mistake."""
    for p in tree(pid):
        try:
            if any(job_id in part for part in p.cmdline()):
                return True
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return False


def end_tree(pid: int, grace_s: float = 10.0) -> None:
    """Asks the whole tree to stop (SIGTERM; on Windows TerminateProcess), then kills what is left after `grace_s`."""
    procs = tree(pid)
    for p in procs:
        _quietly(p.terminate)
    _, left = psutil.wait_procs(procs, timeout=grace_s)
    left += [p for p in tree(pid) if p not in left]  # started during the grace period
    for p in left:
        _quietly(p.kill)
    psutil.wait_procs(left, timeout=5)


def die_with_parent(parent_pid: int) -> None:
    """Called first thing in a worker: it ends (exit code 1) as soon as its server is gone."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)

    def watch() -> None:
        while True:
            if not psutil.pid_exists(parent_pid) or os.getppid() != parent_pid:
                os._exit(1)
            time.sleep(WATCHDOG_PERIOD_S)

    if os.getppid() != parent_pid:  # the parent died before the watch began
        os._exit(1)
    threading.Thread(target=watch, name="die-with-server", daemon=True).start()


def one_process_pool() -> ProcessPoolExecutor:
    """An executor of one spawned worker process that dies with this one (`die_with_parent`). On Linux the process
    must be started (by the first submit) from a thread that lives as long as it does: the parent-death signal
    fires when the thread that started a process ends."""
    # spawn: a clean interpreter, not a fork of the threaded web process
    return ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=die_with_parent,
                               initargs=(os.getpid(),))


def kill_pool(pool: ProcessPoolExecutor) -> None:
    """Ends an executor's worker processes now, whatever they compute (no public way before Python 3.14)."""
    kill = getattr(pool, "kill_workers", None)
    if kill is not None:
        kill()
    else:
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            process.kill()
    pool.shutdown(wait=False, cancel_futures=True)


# ---- details -----------------------------------------------------------------------------------------------------
def _posix_group(pgid: int) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid:
                out.append(p)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return out


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE  # a zombie has ended; only its status remains
    except psutil.Error:
        return False


def _quietly(action) -> None:
    try:
        action()
    except psutil.Error:
        pass


class HomeInUse(UserError):
    """Another live server holds this home folder."""


def hold_home(home: Any, owner: dict[str, Any]) -> IO[str]:
    """Takes the home folder's lock for this server's lifetime (the OS drops it when the process ends, kill -9
    included) and records `owner` (pid, url) in it; HomeInUse, naming the holder, when another server has it. One
    server per home: a second one would recover (end) the first one's running jobs as if they were its own."""
    import json
    from pathlib import Path

    path = Path(home) / "server.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
    try:
        if IS_WINDOWS:
            import msvcrt

            handle.seek(0)
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip()
        handle.close()
        raise HomeInUse(f"another CrossModalSeg server uses {home} ({holder or 'starting'}); connect to it, or start "
                        f"this one with another --home") from None
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps(owner))
    handle.flush()
    return handle
