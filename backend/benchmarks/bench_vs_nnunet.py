"""Prediction speed side by side with nnU-Net v2, at an identical network: the CHAOS CT through the project's
predictor and through nnU-Net v2's `nnUNetPredictor`.

The nnU-Net results folder is built from the project's model: its plan (spacing, patch, CT normalisation) becomes
nnU-Net's plans.json and dataset fingerprint, and the network class nnU-Net builds is the project's own U-Net
(`ProjectNetwork` below, found by nnU-Net through `network_class_name`), loaded with the project's weights. So
the two differ only in their pipelines: reading, preprocessing, sliding windows, resampling back, writing.
Both use the same patch, step (overlap 0.5), Gaussian weighting and mirroring setting; both write a label map on the
input's grid, and the benchmark checks that (and how far the two label maps agree).

nnU-Net v2 runs in its own environment (`--nnunet-python`): a venv with `torch==2.13.0`, `nnunetv2`, `monai` and
this backend installed without dependencies (`pip install --no-deps -e backend`). Install nnunetv2 with torch held
(`pip install -c constraints.txt nnunetv2 monai`, the file reading `torch==2.13.0`): without it pip replaces the CPU
torch with the newest CUDA build. Runs are interleaved: in each round, a fresh process per predictor makes
`--predictions` predictions (the first pays the start-up), so a change in the machine's speed hits both; the report
gives every time, the median and the spread of the warm predictions, and each process's peak memory.

    python backend/benchmarks/bench_vs_nnunet.py --nnunet-python /tmp/nnenv/bin/python --out nnunet_cpu.json

On a GPU (`--device cuda`) nnU-Net keeps the whole prediction on the device, its fastest path; `--slices 300` tiles
the CT to 512x512x300. backend/benchmarks/gpu_check.sh runs it that way.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from peak_memory import peak_gpu_mb, peak_rss_mb  # beside this script

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[2] / "shared" / "data" / "chaos_ct_liver"
IMAGE, LABEL = DATA / "chaos_ct_case_liver_image.nii.gz", DATA / "chaos_ct_case_liver_label.nii.gz"
CONFIGURATION = "3d_fullres"


# ---- runs in nnU-Net's environment: the project's network as an nnU-Net architecture ------------------------------
def _project_network_class():
    import torch

    from crossmodalseg.nets.unet import UNet, UNetConfig

    class ProjectNetwork(torch.nn.Module):
        """The project's U-Net, built from its config the way nnU-Net builds an architecture from plans.json."""

        def __init__(self, input_channels: int, num_classes: int, config: dict, deep_supervision: bool = False):
            super().__init__()
            self.unet = UNet(UNetConfig(**{**config, "in_channels": input_channels, "out_channels": num_classes,
                                           "deep_supervision_heads": 0}))

        def forward(self, x):
            return self.unet(x)

    return ProjectNetwork


def __getattr__(name: str):  # nnU-Net finds the class with pydoc.locate("bench_vs_nnunet.ProjectNetwork")
    if name == "ProjectNetwork":
        return _project_network_class()
    raise AttributeError(name)


# ---- the project side ----------------------------------------------------------------------------------------------
def build_model(folder: Path, seconds: float, preset: str, device: str = "cpu", image: Path = IMAGE,
                label: Path = LABEL) -> Path:
    """A `single` CT model for the CHAOS case, trained briefly (so that both predictors' label maps mean something)."""
    from crossmodalseg.data.spec import Case, DatasetSpec
    from crossmodalseg.engine.trainer import TrainConfig, train

    spec = DatasetSpec("chaos", {"background": 0, "liver": 1}, {"ct": "CT"},
                       [Case("chaos", {"ct": image}, {"ct": label})], folder / "data")
    spec.save()
    return train(spec.root, folder / "model", TrainConfig(target="ct", preset=preset, minutes=seconds / 60,
                                                          device=device))


def nnunet_folder(model: Path, out: Path) -> Path:
    """nnU-Net v2's results folder (dataset.json, plans.json; fold_0 is written by the nnU-Net side)."""
    meta = json.loads((model / "model.json").read_text())
    plan, config = meta["plan"], meta["method"]["networks"]["unet"]
    norm = plan["normalisation"]["ct"]
    stats = plan["statistics"]
    median_size = [int(round(statistics.median(s))) for s in zip(*stats["sizes"])]
    median_spacing = [statistics.median(s) for s in zip(*stats["spacings"])]
    out.mkdir(parents=True, exist_ok=True)
    (out / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1}, "numTraining": 1,
        "file_ending": ".nii.gz"}))
    (out / "plans.json").write_text(json.dumps({
        "dataset_name": "Dataset999_Chaos", "plans_name": "nnUNetPlans", "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "original_median_spacing_after_transp": median_spacing, "original_median_shape_after_transp": median_size,
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": {
            "mean": norm["mean"], "std": norm["std"], "percentile_00_5": norm["clip"][0],
            "percentile_99_5": norm["clip"][1], "max": norm["clip"][1], "min": norm["clip"][0],
            "median": norm["mean"]}},
        "configurations": {CONFIGURATION: {
            "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
            "batch_size": plan["batch_size"], "patch_size": plan["patch_size"], "spacing": plan["spacing"],
            "median_image_size_in_voxels": median_size, "normalization_schemes": ["CTNormalization"],
            "use_mask_for_norm": [False], "batch_dice": True,
            "resampling_fn_data": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
            "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                   "force_separate_z": None},
            "architecture": {"network_class_name": "bench_vs_nnunet.ProjectNetwork",
                             "arch_kwargs": {"config": config}, "_kw_requires_import": []}}},
    }, indent=1))
    return out


def project_predictions(model: str, n: int, tta: bool, out: str, precision: str = "auto", device: str = "cpu",
                        image: str = str(IMAGE)) -> dict:
    """In a fresh process: n predictions of the CT, each from the file to the label map written on disk."""
    started = time.perf_counter()
    from crossmodalseg.data.io import write_image
    from crossmodalseg.engine.inferer import Predictor

    predictor = Predictor(model, device=device, tta=tta, overlap=0.5, precision=precision)
    times = []
    for i in range(n):
        t = time.perf_counter()
        result = predictor.predict({"ct": image})
        write_image(result.label, Path(out) / "project.nii.gz")
        times.append(time.perf_counter() - t)
    return {"seconds": times, "startup_s": time.perf_counter() - started - sum(times), "peak_rss_mb": peak_rss_mb(),
            "peak_gpu_mb": peak_gpu_mb(), "precision": result.info["precision"]}


def nnunet_predictions(folder: str, n: int, tta: bool, out: str, device: str = "cpu", image: str = str(IMAGE)) -> dict:
    """In a fresh process of nnU-Net's environment: n predictions through nnUNetPredictor, from the file to the
    label map written on disk (SimpleITKIO, preprocessing, sliding windows, resampling back, export). On a GPU it
    keeps everything on the device (nnU-Net's default there, its fastest path)."""
    started = time.perf_counter()
    import torch
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=tta,
                                perform_everything_on_device=device == "cuda", device=torch.device(device),
                                verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(folder, use_folds=(0,), checkpoint_name="checkpoint_final.pth")
    times = []
    for i in range(n):
        t = time.perf_counter()
        array, properties = SimpleITKIO().read_images([image])
        predictor.predict_single_npy_array(array, properties, None, str(Path(out) / "nnunet"), False)
        times.append(time.perf_counter() - t)
    return {"seconds": times, "startup_s": time.perf_counter() - started - sum(times), "peak_rss_mb": peak_rss_mb(),
            "peak_gpu_mb": peak_gpu_mb(), "precision": "float32"}


def write_nnunet_checkpoint(model: str, folder: str) -> None:
    """fold_0/checkpoint_final.pth in nnU-Net's format, holding the project's weights (nnU-Net's side writes it)."""
    import torch
    from safetensors.torch import load_file

    # Deep-supervision heads (preset full) only train: the inference network has none, on either side.
    weights = {f"unet.{k}": v for k, v in load_file(str(Path(model) / "unet.safetensors")).items()
               if not k.startswith("ds_heads.")}
    (Path(folder) / "fold_0").mkdir(parents=True, exist_ok=True)
    torch.save({"network_weights": weights, "trainer_name": "nnUNetTrainer",
                "init_args": {"configuration": CONFIGURATION}, "inference_allowed_mirroring_axes": (0, 1, 2)},
               str(Path(folder) / "fold_0" / "checkpoint_final.pth"))


def _in_process(python: str, function: str, *args) -> dict:
    run = subprocess.run([python, __file__, "call", function, json.dumps(list(args))], capture_output=True,
                         text=True, env={**_env(), "PYTHONPATH": _pythonpath()})
    if run.returncode != 0:
        raise RuntimeError(f"{function} failed:\n{run.stderr[-4000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def _env() -> dict:
    import os

    return dict(os.environ)


def _pythonpath() -> str:
    """This folder first (nnU-Net finds ProjectNetwork here), then what the caller had (e.g. an uninstalled backend)."""
    import os

    return os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p)


def agreement(out: Path, image: Path = IMAGE) -> dict:
    """Both label maps on the input's grid, and their Dice on the liver."""
    import numpy as np
    import SimpleITK as sitk

    from crossmodalseg.data.io import Geometry, read_image

    source = Geometry.of(read_image(image))
    a, b = read_image(out / "project.nii.gz"), read_image(out / "nnunet.nii.gz")
    pa, pb = sitk.GetArrayViewFromImage(a) == 1, sitk.GetArrayViewFromImage(b) == 1
    dice = 2 * float(np.logical_and(pa, pb).sum()) / max(float(pa.sum() + pb.sum()), 1.0)
    return {"project_on_input_grid": Geometry.of(a).matches(source), "nnunet_on_input_grid":
            Geometry.of(b).matches(source), "liver_dice_between_them": round(dice, 4)}


def machine(device: str) -> dict:
    import torch

    info = {"python": platform.python_version(), "processor": platform.processor(), "torch": torch.__version__}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def read_size(path: Path) -> tuple[int, ...]:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return reader.GetSize()


def summary(runs: list[dict]) -> dict:
    warm = [t for r in runs for t in r["seconds"][1:]] or [t for r in runs for t in r["seconds"]]
    return {"median_s": round(statistics.median(warm), 2), "min_s": round(min(warm), 2), "max_s": round(max(warm), 2),
            "first_prediction_s": [round(r["seconds"][0], 2) for r in runs],
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs), "peak_gpu_mb": runs[0].get("peak_gpu_mb"),
            "precision": runs[0]["precision"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nnunet-python", required=True, help="python of an environment with nnunetv2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--predictions", type=int, default=2, help="per process and round")
    parser.add_argument("--train-seconds", type=float, default=60)
    parser.add_argument("--preset", default="fast", choices=["fast", "full"])
    parser.add_argument("--tta", action="store_true", help="mirroring on both sides (8 flips)")
    parser.add_argument("--project-precision", default="auto", choices=["auto", "float32"],
                        help="auto: bf16 autocast where the CPU computes bf16 natively (nnU-Net runs float32)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="both predictors on this device")
    parser.add_argument("--slices", type=int, help="tile the CT along z to this many slices (e.g. 300)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="cms-vs-nnunet-") as tmp:
        work = Path(tmp)
        image, label = IMAGE, LABEL
        if args.slices:
            from bench_engine import tile_slices

            image, label = tile_slices(IMAGE, LABEL, args.slices, work / "tiled")
        model = build_model(work, args.train_seconds, args.preset, args.device, image, label)
        folder = nnunet_folder(model, work / "nnunet" / f"nnUNetTrainer__nnUNetPlans__{CONFIGURATION}")
        _in_process(args.nnunet_python, "write_nnunet_checkpoint", str(model), str(folder))
        runs: dict[str, list[dict]] = {"project": [], "nnunet": []}
        for r in range(args.rounds):
            order = ["project", "nnunet"] if r % 2 == 0 else ["nnunet", "project"]
            for side in order:
                if side == "project":
                    runs[side].append(_in_process(sys.executable, "project_predictions", str(model),
                                                  args.predictions, args.tta, str(work), args.project_precision,
                                                  args.device, str(image)))
                else:
                    runs[side].append(_in_process(args.nnunet_python, "nnunet_predictions", str(folder),
                                                  args.predictions, args.tta, str(work), args.device, str(image)))
                print(side, runs[side][-1], flush=True)
        size = "x".join(str(v) for v in read_size(image))
        result = {"what": f"CHAOS CT {size} through each predictor, identical network and weights, {args.device}",
                  "command": " ".join(sys.argv), "preset": args.preset, "tta": args.tta,
                  "model_plan": {k: json.loads((model / "model.json").read_text())["plan"][k]
                                 for k in ("spacing", "patch_size", "strides", "filters")},
                  "machine": machine(args.device),
                  "project": summary(runs["project"]), "nnunet": summary(runs["nnunet"]),
                  "outputs": agreement(work, image), "runs": runs}
        result["speedup"] = round(result["nnunet"]["median_s"] / result["project"]["median_s"], 2)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("project", "nnunet", "speedup", "outputs")}, indent=1))


if __name__ == "__main__":
    if len(sys.argv) > 3 and sys.argv[1] == "call":
        print(json.dumps(globals()[sys.argv[2]](*json.loads(sys.argv[3]))))
    else:
        main()
