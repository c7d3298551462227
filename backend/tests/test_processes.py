"""Worker process trees, portably (issue 11): found and ended with psutil (the POSIX group as well), workers die
with their server also where there is no parent-death signal, and one server per home folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from crossmodalseg.service import processes
from crossmodalseg.service.processes import HomeInUse, hold_home

# A worker-like tree: the root (its command line names the job) starts a child that would outlive it.
TREE = textwrap.dedent("""
    import subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    print(child.pid, flush=True)
    time.sleep(120)
""")


def wait_until(condition, timeout_s: float = 15.0) -> bool:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def test_a_tree_is_found_named_and_ended_whole():
    root = processes.spawn([sys.executable, "-c", TREE, "job-1234"], stdout=subprocess.PIPE, text=True)
    try:
        child = int(root.stdout.readline())
        assert {root.pid, child} <= {p.pid for p in processes.tree(root.pid)}
        assert processes.runs_job(root.pid, "job-1234") and not processes.runs_job(root.pid, "job-9999")
        processes.end_tree(root.pid, grace_s=5)
        assert wait_until(lambda: not psutil.pid_exists(child) or
                          psutil.Process(child).status() == psutil.STATUS_ZOMBIE)
        assert not processes.alive(root.pid)
    finally:
        root.kill()
        root.wait()


def test_an_orphaned_grandchild_is_still_ended_through_the_process_group():
    """The root dies first (its child is re-parented and no longer its descendant): the group still finds it."""
    if processes.IS_WINDOWS:
        pytest.skip("POSIX process groups")
    root = processes.spawn([sys.executable, "-c", TREE], stdout=subprocess.PIPE, text=True)
    child = int(root.stdout.readline())
    os.kill(root.pid, signal.SIGKILL)
    root.wait()
    assert child in {p.pid for p in processes.tree(root.pid)}
    processes.end_tree(root.pid, grace_s=5)
    assert wait_until(lambda: not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE)


@pytest.mark.parametrize("platform", ["linux", "darwin"])
def test_a_worker_dies_with_its_server(platform):
    """`darwin`: the parent-death signal is Linux-only, so the watchdog thread alone must end the worker (the
    macOS/Windows path, run here on Linux)."""
    worker = textwrap.dedent(f"""
        import os, sys, time
        from crossmodalseg.service import processes
        processes.sys = type("FakeSys", (), {{"platform": {platform!r}}})
        processes.die_with_parent(os.getppid())
        print("armed", flush=True)
        time.sleep(120)
    """)
    server = textwrap.dedent(f"""
        import subprocess, sys
        w = subprocess.Popen([sys.executable, "-c", {worker!r}], stdout=subprocess.PIPE, text=True)
        assert w.stdout.readline().strip() == "armed"
        print(w.pid, flush=True)
        import time; time.sleep(120)
    """)
    parent = subprocess.Popen([sys.executable, "-c", server], stdout=subprocess.PIPE, text=True)
    worker_pid = int(parent.stdout.readline())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    assert wait_until(lambda: not psutil.pid_exists(worker_pid) or
                      psutil.Process(worker_pid).status() == psutil.STATUS_ZOMBIE, timeout_s=10)


def test_one_server_per_home(tmp_path: Path):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        from crossmodalseg.service.processes import hold_home
        lock = hold_home({str(tmp_path)!r}, {{"pid": 1234, "url": "http://127.0.0.1:9"}})
        print("held", flush=True)
        import time; time.sleep(120)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(HomeInUse, match=r"another CrossModalSeg server uses .*http://127.0.0.1:9"):
            hold_home(tmp_path, {"pid": os.getpid()})
        run = subprocess.run([sys.executable, "-m", "crossmodalseg.cli", "serve", "--home", str(tmp_path), "--port",
                              "0"], capture_output=True, text=True, timeout=120)
        assert run.returncode == 2 and "another CrossModalSeg server" in run.stderr, run.stderr[-2000:]
    finally:
        holder.kill()
        holder.wait()
    lock = hold_home(tmp_path, {"pid": os.getpid()})  # the OS dropped the dead holder's lock
    assert json.loads((tmp_path / "server.lock").read_text())["pid"] == os.getpid()
    lock.close()
