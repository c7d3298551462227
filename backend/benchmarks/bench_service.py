"""Service overhead: one CT (default the CHAOS CT, 512x512x78) segmented three ways, same model, same machine.

- `http`: POST /predict to a real `crossmodalseg serve` on 127.0.0.1 (upload, checks, prediction in the server's
  predictor process, zip answer, download); the first request also starts that process and loads the model (cold),
  the next ones find it loaded (warm);
- `cli`: `crossmodalseg predict` in a fresh process each time (interpreter start, imports, model load, prediction);
- `in_process`: Predictor.predict with the model already loaded (the compute alone).

    python backend/benchmarks/bench_service.py --out backend/benchmarks/results_service_cpu.json

The model has the real architecture and plan of the `single` method, preset `fast`, and untrained weights: speed
does not depend on the weights' values. Writes JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from bench_engine import (  # (this folder: scripts run from here are on sys.path)
    environment,
    write_report,
)

DEFAULT_IMAGE = Path(__file__).resolve().parents[3] / "shared" / "data" / "chaos_ct_liver" / \
    "chaos_ct_case_liver_image.nii.gz"


def make_model(image: Path, folder: Path, preset: str) -> Path:
    from crossmodalseg.data.plan import make_plan
    from crossmodalseg.data.spec import Case, DatasetSpec
    from crossmodalseg.engine.checkpoint import write_model_folder
    from crossmodalseg.methods import Task, get_method

    spec = DatasetSpec("bench", {"background": 0, "liver": 1}, {"ct": "CT"}, [Case("c0", {"ct": image})], folder)
    task = Task.from_spec(spec, "ct")
    plan = make_plan(spec, ["ct"], preset)
    method = get_method("single")(task, plan)
    return write_model_folder(folder / "model", {"method": method.to_json(), "task": task.to_json(),
                                                 "plan": plan.to_json()}, method.nets)


def seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def summary(times: list[float]) -> dict:
    return {"median_s": round(statistics.median(times), 3), "all_s": [round(t, 3) for t in times]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    parser.add_argument("--preset", default="fast", choices=["fast", "full"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    import httpx
    import torch

    from crossmodalseg.engine.inferer import Predictor

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = make_model(args.image.resolve(), tmp, args.preset)
        body = args.image.read_bytes()

        # CLI: a new process per prediction, as a script would call it.
        cli = [sys.executable, "-m", "crossmodalseg.cli", "predict", str(model), "--image", f"ct={args.image}",
               "--out", str(tmp / "cli_out"), "--format", "nrrd"]
        cli_times = [seconds(lambda: subprocess.run(cli, check=True, capture_output=True))
                     for _ in range(args.repeats)]

        # In-process: the compute alone, model loaded once.
        predictor = Predictor(model, device="auto")
        predictor.predict({"ct": args.image})
        in_process = [seconds(lambda: predictor.predict({"ct": args.image})) for _ in range(args.repeats)]

        # HTTP: a real server on 127.0.0.1; the model imported as an archive.
        server = subprocess.Popen([sys.executable, "-m", "crossmodalseg.cli", "serve", "--home", str(tmp / "home"),
                                   "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            url = json.loads(server.stdout.readline())["url"]
            client = httpx.Client(base_url=url, timeout=600)
            while client.get("/health").status_code != 200:
                time.sleep(0.2)
            archive = io.BytesIO()
            with zipfile.ZipFile(archive, "w") as z:
                for p in model.iterdir():
                    z.write(p, p.name)
            model_id = client.post("/models", content=archive.getvalue()).json()["id"]

            def ask() -> None:
                r = client.post("/predict", data={"model": model_id},
                                files={"ct": (args.image.name, body, "application/octet-stream")})
                r.raise_for_status()

            cold = seconds(ask)  # note: the import above already started the predictor process (it validated)
            warm = [seconds(ask) for _ in range(args.repeats)]
        finally:
            server.terminate()
            server.wait(30)

    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(args.image))
    reader.ReadImageInformation()
    report = {
        "benchmark": "service", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "environment": environment("cuda" if torch.cuda.is_available() else "cpu"),
        "data": {"image": str(args.image), "size_xyz": list(reader.GetSize()), "upload_bytes": len(body)},
        "preset": args.preset,
        "http_first_request": round(cold, 3), "http_warm": summary(warm), "cli_fresh_process": summary(cli_times),
        "in_process_warm": summary(in_process),
        "service_overhead_warm_s": round(statistics.median(warm) - statistics.median(in_process), 3),
    }
    return write_report(report, args.out)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
