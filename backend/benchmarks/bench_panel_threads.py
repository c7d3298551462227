"""The Slicer panel's background transfers under Slicer's GIL: how fast a segmentation's upload and download go.

Slicer's Python (PythonQt, whose thread support CTK and Slicer do not enable) keeps the GIL on the GUI thread
while the Qt event loop idles, so the panel's worker threads move only while the GUI thread runs Python. The tests
run the panel under PySide6, whose event loop releases the GIL, so they cannot show this. Here the GUI thread is emulated as PythonQt
runs it: it holds the GIL between timer ticks (a libc sleep called through ctypes.PyDLL, which keeps the GIL), and at
each tick it runs the panel's Python. Meanwhile a worker thread runs `BackendClient.predict`, the panel's real
request: it uploads one image, then downloads and unpacks the answer zip.

The server is a stand-in for the backend (plain http.server in another process): it reads the upload and answers a
zip of the same size, so only the transfer is timed, not a prediction. Policies:
- `free`: no GIL held (what the PySide6 tests see);
- `tick_200ms`: one 200 ms timer tick that runs Python and hands the GIL over only when asked (the panel before);
- `panel`: the panel's REQUEST_TICK_MS ticks, each calling let_workers_run.

    python backend/benchmarks/bench_panel_threads.py --out backend/benchmarks/panel_threads_cpu.json
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import http.server
import io
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

from bench_engine import write_report  # (this folder: scripts run from here are on sys.path)

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "CrossModalSeg"))
from CrossModalSegLib.client import BackendClient  # noqa: E402
from CrossModalSegLib.logic import REQUEST_TICK_MS, let_workers_run  # noqa: E402

LIBC = ctypes.PyDLL(ctypes.util.find_library("c"))  # PyDLL: the call keeps the GIL, as the Qt event loop does


def answer_zip(size: int) -> bytes:
    body = io.BytesIO()
    with zipfile.ZipFile(body, "w", zipfile.ZIP_STORED) as z:
        z.writestr("segmentation.nrrd", os.urandom(size))
    return body.getvalue()


def serve(port_out, size: int) -> None:
    answer = answer_zip(size)

    class Predict(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Type", "application/zip")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *_):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Predict)
    port_out.put(server.server_address[1])
    server.serve_forever()


def one_request(client: BackendClient, image: Path, out: Path, policy: str) -> float:
    done = threading.Event()
    error: list[BaseException] = []

    def work() -> None:
        try:
            client.predict("model", {"ct": image}, out)
        except BaseException as e:  # noqa: BLE001 - reported below
            error.append(e)
        finally:
            done.set()

    started = time.perf_counter()
    threading.Thread(target=work, daemon=True).start()
    while not done.is_set():
        if policy == "free":
            done.wait(0.001)
        elif policy == "tick_200ms":
            LIBC.usleep(200_000)
        else:
            LIBC.usleep(REQUEST_TICK_MS * 1000)
            let_workers_run()
    seconds = time.perf_counter() - started
    if error:
        raise error[0]
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=40, help="size of the upload and of the answer")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    size = args.megabytes << 20
    ports = multiprocessing.Queue()
    server = multiprocessing.Process(target=serve, args=(ports, size), daemon=True)
    server.start()
    client = BackendClient(f"http://127.0.0.1:{ports.get(timeout=60)}")
    policies = ("free", "tick_200ms", "panel")
    seconds: dict[str, list[float]] = {p: [] for p in policies}
    with tempfile.TemporaryDirectory(prefix="bench-panel-") as folder:
        image = Path(folder) / "ct.nrrd"
        image.write_bytes(os.urandom(size))
        for _ in range(args.repeats):  # interleaved: drifts of the machine hit every policy alike
            for policy in policies:
                seconds[policy].append(round(one_request(client, image, Path(folder) / "answer", policy), 3))
    server.terminate()
    write_report({"benchmark": "panel_threads", "megabytes_each_way": args.megabytes,
                  "request_tick_ms": REQUEST_TICK_MS, "python": platform.python_version(),
                  "cpu": platform.processor() or platform.machine(),
                  "seconds": {p: {"median": statistics.median(v), "runs": v} for p, v in seconds.items()}}, args.out)


if __name__ == "__main__":
    main()
