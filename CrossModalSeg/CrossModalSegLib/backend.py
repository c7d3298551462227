"""Where the backend runs: a local one that this module starts (127.0.0.1, a free port, a random token) with a
Python that has `crossmodalseg` installed, or a remote GPU server given by URL and token. One code path after that:
both are a BackendClient."""

from __future__ import annotations

import json
import os
import queue
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path

from .client import BackendClient, BackendError

START_TIMEOUT_S = 120
STOP_GRACE_S = 15  # the server interrupts its jobs (resumable) and exits; then it is terminated


class LocalBackend:
    """`crossmodalseg serve` in a child process; stopped with `stop()` (or when Slicer exits)."""

    def __init__(self, python: str, home: str | Path, extra_env: dict[str, str] | None = None,
                 base_env: dict[str, str] | None = None):
        self.python = python
        self.home = Path(home)
        self.extra_env = extra_env or {}
        self.base_env = dict(os.environ if base_env is None else base_env)
        self.process: subprocess.Popen | None = None
        self.client: BackendClient | None = None
        self.server_pid: int | None = None  # the server's own process: a child of `process` when that is a launcher
        self.log_path = self.home / "server.log"

    def start(self) -> BackendClient:
        self.home.mkdir(parents=True, exist_ok=True)
        token = secrets.token_urlsafe(32)
        env = {**self.base_env, **self.extra_env, "CROSSMODALSEG_TOKEN": token}
        log = open(self.log_path, "ab")
        try:
            # On Windows without a console window of its own (Slicer has none to share).
            flags = subprocess.CREATE_NO_WINDOW if sys.platform == "win32" else 0
            # The server stops when its standard input ends: when stop() closes the pipe, and when Slicer dies. A
            # signal would not do: PythonSlicer is a launcher that runs python-real as its child and does not pass
            # signals on (it forwards its standard input).
            self.process = subprocess.Popen([self.python, "-m", "crossmodalseg.cli", "serve", "--host", "127.0.0.1",
                                             "--port", "0", "--home", str(self.home), "--stop-on-stdin-eof"],
                                            stdout=subprocess.PIPE, stderr=log, stdin=subprocess.PIPE, env=env,
                                            creationflags=flags)
        except OSError as e:
            raise BackendError(f"cannot start the local backend with {self.python}: {e}") from None
        finally:
            log.close()
        try:
            url = self._read_url()
            self.client = BackendClient(url, token)
            deadline = time.time() + START_TIMEOUT_S
            while not self.client.health():
                if not self.running() or time.time() > deadline:
                    raise BackendError(f"the local backend at {url} does not answer; see {self.log_path}")
                time.sleep(0.2)
        except BaseException:
            self.stop()  # never leave a half-started server behind
            raise
        return self.client

    def _read_url(self) -> str:
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._forward_output, args=(self.process.stdout, lines), daemon=True).start()
        try:
            line = lines.get(timeout=START_TIMEOUT_S)
        except queue.Empty:
            raise BackendError(f"the local backend did not start within {START_TIMEOUT_S} s; see {self.log_path}")
        if not line:
            tail = self.log_path.read_text(errors="replace").strip().splitlines()[-5:]
            raise BackendError("the local backend exited at start: " + " | ".join(tail) +
                               f" (is crossmodalseg installed for {self.python}? Use 'Install backend')")
        listening = json.loads(line)
        self.server_pid = listening.get("pid")
        return listening["url"]

    def _forward_output(self, stdout, lines: queue.Queue) -> None:
        """The first line (the URL) to `lines`; everything after it to the log, so that the pipe never fills up
        and stalls the server."""
        lines.put(stdout.readline())
        with open(self.log_path, "ab") as log:
            for line in iter(stdout.readline, b""):
                log.write(line)
                log.flush()

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """Closes the server's standard input (it interrupts its jobs, resumable, and exits), then terminates it if
        it has not exited within STOP_GRACE_S."""
        process, self.process = self.process, None
        if process is None:
            return
        try:
            process.stdin.close()
        except OSError:
            pass
        try:
            process.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def connect_remote(url: str, token: str | None = None) -> BackendClient:
    client = BackendClient(url, token or None)
    client.info()  # fails now, with the reason, rather than at the first real request
    return client
