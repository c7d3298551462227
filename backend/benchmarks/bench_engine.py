"""Engine benchmark: training throughput (patches/s), prediction time per volume and peak memory (RAM, and GPU
memory on a GPU), for one image and label (default: the CHAOS CT, 512x512x78). Writes JSON.

    python backend/benchmarks/bench_engine.py --preset fast --device cpu --out bench_cpu_fast.json

Each phase runs in its own process, so each peak-memory figure is that phase's alone. Prediction uses a model with
the real architecture and plan but untrained weights: its speed does not depend on the weights' values.
`--pipeline-only` times what a prediction does outside the network (read, preprocess, back to the input grid, write)
on the CPU, with the reference label standing in for the network's output: where a GPU prediction's time goes,
measured without a GPU (e.g. `--preset full --slices 300`).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from peak_memory import peak_gpu_mb, peak_rss_mb  # beside this script

DEFAULT_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "chaos_ct_liver"


def make_dataset(image: Path, label: Path, root: Path) -> Path:
    from crossmodalseg.data.spec import Case, DatasetSpec

    # "mr" is declared (no MR image) so that an `mkd` model, whose second member learns from the assistant modality,
    # can be built on this CT-only case: at inference both members see the CT.
    spec = DatasetSpec("bench", {"background": 0, "liver": 1}, {"ct": "CT", "mr": "MR"},
                       [Case("case0", {"ct": image.resolve()}, {"ct": label.resolve()})], root)
    spec.save()
    return root


def tile_slices(image: Path, label: Path, slices: int, out: Path) -> tuple[Path, Path]:
    """The image and label repeated along z (and cut) to `slices` slices, same spacing, origin and direction: a taller
    volume of real anatomy for timing (e.g. 512x512x300, the size of a chest-abdomen-pelvis CT)."""
    import SimpleITK as sitk

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for path, name in ((image, "image"), (label, "label")):
        source = sitk.ReadImage(str(path))
        repeats = -(-slices // source.GetSize()[2])
        tiled = sitk.JoinSeries([source[:, :, z] for _ in range(repeats) for z in range(source.GetSize()[2])][:slices],
                                source.GetOrigin()[2], source.GetSpacing()[2])
        tiled.SetOrigin(source.GetOrigin())
        tiled.SetDirection(source.GetDirection())
        paths.append(out / f"tiled_{slices}_{name}.nii.gz")
        sitk.WriteImage(tiled, str(paths[-1]), True, 1)  # fast gzip: written once, read every prediction
    return paths[0], paths[1]


def phase_train(dataset: Path, preset: str, device_name: str, iterations: int, warmup: int,
                peak_tflops: float | None, queue) -> None:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from crossmodalseg.data.plan import make_plan
    from crossmodalseg.data.spec import load_spec
    from crossmodalseg.data.transforms import LoadCased
    from crossmodalseg.engine.distributed import autocast_dtype, resolve_device
    from crossmodalseg.methods import StepContext, Task, get_method

    device = resolve_device(device_name)
    spec = load_spec(dataset)
    task = Task.from_spec(spec, "ct")
    t0 = time.perf_counter()
    plan = make_plan(spec, ["ct"], preset)
    method = get_method("single")(task, plan).to(device)
    item = LoadCased(["ct"], plan, task)({"case": spec.cases[0]})
    preprocess_s = time.perf_counter() - t0
    stream = method.batches({"labelled": [item]}, seed=0, device=device)
    amp = autocast_dtype(device)
    ctx = StepContext(device, amp, torch.amp.GradScaler(device.type, enabled=amp == torch.float16))
    method.train_mode(True)
    for _ in range(warmup):
        method.training_step(next(stream), ctx)
    with FlopCounterMode(display=False) as counter:  # one step's floating-point operations (forward + backward)
        method.training_step(next(stream), ctx)
    flops_per_step = counter.get_total_flops()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    data_s, step_s = 0.0, 0.0
    for _ in range(iterations):
        t = time.perf_counter()
        batch = next(stream)
        data_s += time.perf_counter() - t
        t = time.perf_counter()
        method.training_step(batch, ctx)
        if device.type == "cuda":
            torch.cuda.synchronize()
        step_s += time.perf_counter() - t
    patches = iterations * plan.batch_size
    achieved = flops_per_step * iterations / step_s
    queue.put({"precision": str(amp or torch.float32).removeprefix("torch."),
               "flops_per_iteration": flops_per_step, "achieved_tflops": round(achieved / 1e12, 4),
               "mfu": round(achieved / (peak_tflops * 1e12), 4) if peak_tflops else None,
               "plan": {k: plan.to_json()[k] for k in ("spacing", "patch_size", "filters", "batch_size", "strides")},
               "preprocessed_shape": list(item["image"].shape), "preprocess_s": round(preprocess_s, 3),
               "iterations": iterations, "warmup_iterations": warmup,
               "patches_per_s": round(patches / (data_s + step_s), 3),
               "s_per_iteration": round((data_s + step_s) / iterations, 4),
               "data_s_per_iteration": round(data_s / iterations, 4), "peak_rss_mb": peak_rss_mb(),
               "peak_gpu_mb": peak_gpu_mb(device)})


def phase_predict(dataset: Path, preset: str, device_name: str, repeats: int, tta: bool, method_name: str,
                  queue) -> None:
    import torch

    from crossmodalseg.data.plan import make_plan
    from crossmodalseg.data.spec import load_spec
    from crossmodalseg.engine.checkpoint import write_model_folder
    from crossmodalseg.engine.inferer import Predictor
    from crossmodalseg.methods import Task, get_method

    spec = load_spec(dataset)
    task = Task.from_spec(spec, "ct", ["mr"] if method_name == "mkd" else [])
    plan = make_plan(spec, ["ct"], preset)
    method = get_method(method_name)(task, plan)
    with tempfile.TemporaryDirectory() as tmp:
        model = write_model_folder(Path(tmp) / "model", {"method": method.to_json(), "task": task.to_json(),
                                                         "plan": plan.to_json()}, method.nets)
        predictor = Predictor(model, device=device_name, tta=tta)
        image = spec.cases[0].images["ct"]
        predictor.predict({"ct": image})  # warm-up (kernel selection, allocator)
        if predictor.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(predictor.device)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            result = predictor.predict({"ct": image})
            times.append(time.perf_counter() - t)
        queue.put({"method": method_name, "members": result.info["members"], "precision": result.info["precision"],
                   "repeats": repeats, "tta": tta, "seconds_median": round(statistics.median(times), 3),
                   "seconds_all": [round(t, 3) for t in times], "stage_seconds_last": result.info["stage_seconds"], "output_size_xyz": list(result.label.GetSize()),
                   "peak_rss_mb": peak_rss_mb(), "peak_gpu_mb": peak_gpu_mb(predictor.device)})


def phase_pipeline(dataset: Path, preset: str, repeats: int, queue) -> None:
    """What a prediction costs outside the network, on the CPU: reading the file, preprocessing, the argmax or
    resampling back onto the input grid, the label image and its write. The network's place is taken by the
    reference label's soft one-hot probabilities (0.9 / 0.1) on the plan's grid, so the label map written must equal
    the reference label wherever the plan keeps the input grid (checked)."""
    import numpy as np
    import torch

    from crossmodalseg.data.io import Geometry, from_array, read_image, to_array, write_image
    from crossmodalseg.data.plan import make_plan
    from crossmodalseg.data.spec import load_spec
    from crossmodalseg.data.transforms import load_case_arrays
    from crossmodalseg.engine.inferer import back_to_grid

    spec = load_spec(dataset)
    plan = make_plan(spec, ["ct"], preset)
    case = spec.cases[0]
    reference = load_case_arrays({"ct": case.images["ct"]}, ["ct"], plan, case.labels["ct"], [0, 1])["label"][0]
    probabilities = torch.nn.functional.one_hot(torch.as_tensor(reference), 2).permute(3, 0, 1, 2).float() * 0.8 + 0.1
    del reference
    laps: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats + 1):  # the first is a warm-up
            times, t = {}, time.perf_counter()
            image = read_image(case.images["ct"])
            times["read"], t = time.perf_counter() - t, time.perf_counter()
            arrays = load_case_arrays({"ct": image}, ["ct"], plan)
            times["preprocess"], t = time.perf_counter() - t, time.perf_counter()
            index = back_to_grid(probabilities, arrays["grid"], Geometry.of(image))
            label = from_array(index, image)
            times["output"], t = time.perf_counter() - t, time.perf_counter()
            write_image(label, Path(tmp) / "segmentation.nii.gz")
            times["write"] = time.perf_counter() - t
            times["total"] = sum(times.values())
            for name, value in times.items():
                laps.setdefault(name, []).append(value)
            grid = arrays["grid"]
            del arrays
    same_grid = Geometry.of(image).matches(grid, tolerance=1e-6)
    queue.put({"preset": preset, "repeats": repeats, "same_grid_as_input": same_grid,
               "label_equals_reference": bool(np.array_equal(index, to_array(read_image(case.labels["ct"]), np.uint8)))
               if same_grid else None,
               "seconds_median": {k: round(statistics.median(v[1:]), 3) for k, v in laps.items()},
               "seconds_all": {k: [round(x, 3) for x in v[1:]] for k, v in laps.items()},
               "peak_rss_mb": peak_rss_mb()})


def _run_phase(target, *args):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def environment(device_name: str) -> dict:
    import monai
    import SimpleITK
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "monai": monai.__version__,
            "simpleitk": SimpleITK.Version_VersionString(), "cpu": platform.processor() or platform.machine(),
            "cpu_threads": torch.get_num_threads(), "device": device_name}
    if torch.cuda.is_available() and device_name != "cpu":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=Path, default=DEFAULT_DATA / "chaos_ct_case_liver_image.nii.gz")
    parser.add_argument("--label", type=Path, default=DEFAULT_DATA / "chaos_ct_case_liver_label.nii.gz")
    parser.add_argument("--preset", default="fast", choices=["fast", "full"])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tta", action="store_true")
    parser.add_argument("--slices", type=int, help="tile the image along z to this many slices (e.g. 300)")
    parser.add_argument("--predict-method", default="single", choices=["single", "mkd"],
                        help="mkd: the two-member ensemble of the MKD method (both members run on the CT)")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--pipeline-only", action="store_true",
                        help="time only what a prediction does outside the network (read, preprocess, back to the "
                             "input grid, write), on the CPU; no training, no network")
    parser.add_argument("--peak-tflops", type=float,
                        help="the device's peak dense TFLOP/s at the training precision, for the MFU (e.g. 989 for an "
                             "H100 SXM in bf16)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    import SimpleITK as sitk
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        if args.slices:
            args.image, args.label = tile_slices(args.image, args.label, args.slices, Path(tmp) / "tiled")
        dataset = make_dataset(args.image, args.label, Path(tmp) / "data")
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(args.image))
        reader.ReadImageInformation()
        report = {
            "benchmark": "engine", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "environment": environment(device),
            "data": {"image": str(args.image), "label": str(args.label), "size_xyz": list(reader.GetSize()),
                     "spacing_xyz": [round(s, 4) for s in reader.GetSpacing()]},
            "preset": args.preset,
        }
        if args.pipeline_only:
            report["pipeline"] = _run_phase(phase_pipeline, dataset, args.preset, args.repeats)
            return write_report(report, args.out)
        # Each phase's result is printed as it comes, so a run stopped part-way still reports what it measured.
        report["training"] = None if args.skip_training else _run_phase(
            phase_train, dataset, args.preset, device, args.iterations, args.warmup, args.peak_tflops)
        print(json.dumps({"training": report["training"]}), flush=True)
        report["prediction"] = _run_phase(phase_predict, dataset, args.preset, device, args.repeats, args.tta,
                                          args.predict_method)
    return write_report(report, args.out)


def write_report(report: dict, out: Path | None) -> dict:
    """Prints the report as JSON, and writes it to `out` when given."""
    text = json.dumps(report, indent=2)
    if out:
        out.write_text(text + "\n")
    print(text)
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
