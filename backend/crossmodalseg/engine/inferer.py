"""Whole-volume prediction: MONAI sliding windows (gaussian blending, batched windows, optional mirror TTA, bfloat16
where the device has it); the result is mapped back onto the target input's own grid and written with its exact
geometry."""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from monai.inferers import sliding_window_inference

from ..data.geometry import resample_to_grid
from ..data.io import Geometry, ImageError, from_array, read_image, write_image
from ..data.plan import Plan
from ..data.spec import IGNORE_INDEX
from ..data.transforms import load_case_arrays
from ..errors import UserError
from ..methods import Method, Task, get_method
from .checkpoint import ModelFolderError, load_weights, read_model_meta
from .distributed import autocast_dtype, resolve_device

# Parameters of the largest networks a model may describe: at the `full` preset `single` has 3.1e7, MKD and MAML 6.2e7
# and 6.3e7, CMC 7.1e7. A model.json (imported, edited) asking for more is refused before anything is allocated.
MAX_PARAMETERS = 500_000_000


@dataclass
class ModelDescription:
    """What a model.json (or a run.json) describes, every part checked."""
    method: type[Method]
    task: Task
    plan: Plan
    hparams: dict[str, Any]


def describe_model(meta: dict[str, Any]) -> ModelDescription:
    """The checked description of a model.json, or ModelFolderError: a field missing, of the wrong type or out of
    range, or networks too large. The file may have been damaged or edited, or come from someone else, so everything
    in it is checked before it is used, and the networks' size before any memory is taken for them."""
    try:
        task = Task.from_json(meta["task"])
        plan = Plan.from_json(meta["plan"])
        missing = [m for m in task.modalities if m not in plan.normalisation]
        if missing:
            raise UserError(f"plan.normalisation has no entry for modality {', '.join(missing)}")
        method_class = get_method(meta["method"]["name"])
        try:
            hparams = method_class.check_options(meta["method"]["hparams"])
        except UserError as e:
            raise UserError(f"method.hparams: {e}") from None
        with torch.device("meta"):  # sizes only: no memory for the weights
            parameters = sum(p.numel() for net in method_class(task, plan, hparams).nets.values()
                             for p in net.parameters())
        if parameters > MAX_PARAMETERS:
            raise UserError(f"its networks would have {parameters:,} parameters, more than {MAX_PARAMETERS:,}")
        return ModelDescription(method_class, task, plan, hparams)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, ZeroDivisionError) as e:
        reason = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
        raise ModelFolderError(f"model.json does not describe a model this version can build ({reason})") from None


def build_method(meta: dict[str, Any]) -> Method:
    """The method object described by a model.json (or a run.json), networks initialised (see `describe_model`)."""
    described = describe_model(meta)
    return described.method(described.task, described.plan, described.hparams)


def mirror_axes(tta: bool) -> list[tuple[int, ...]]:
    if not tta:
        return [()]
    return [axes for n in range(4) for axes in itertools.combinations((2, 3, 4), n)]


AUTO = "auto"


@torch.no_grad()
def predict_probabilities(method: Method, image: np.ndarray | torch.Tensor, available: Sequence[str],
                          device: torch.device, tta: bool = False, overlap: float = 0.5,
                          sw_batch_size: int | None = None, blend: str = "gaussian",
                          amp_dtype: torch.dtype | None | str = AUTO, on_device: bool = False
                          ) -> dict[str, torch.Tensor]:
    """Softmax probabilities (K, Z, Y, X) of every member for a preprocessed image (C, Z, Y, X), on the CPU, or
    left on `device` with `on_device` (the caller reduces them there and moves less).

    `amp_dtype` "auto": bfloat16 where the device computes it natively (GPUs, and CPUs with AVX-512 BF16 or AMX),
    else float32. Windows go `sw_batch_size` at a time: 2 on a CPU, where a batch of one sends most 3D convolutions
    to PyTorch's slow native kernel instead of oneDNN (measured in backend/benchmarks/RESULTS.md)."""
    method.train_mode(False)
    x = torch.as_tensor(image, dtype=torch.float32)[None].to(device)
    names: list[str] = []
    num_classes = method.task.num_classes
    dtype = autocast_dtype(device) if amp_dtype == AUTO else amp_dtype

    def window(patch: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext():
            logits = method.member_logits(patch, available)
        names[:] = list(logits)
        return torch.cat([logits[n].float() for n in logits], dim=1)

    sw_batch_size = sw_batch_size or (4 if device.type == "cuda" else 2)
    total = None
    for axes in mirror_axes(tta):
        flipped = torch.flip(x, axes) if axes else x
        logits = sliding_window_inference(flipped, roi_size=method.plan.patch_size, sw_batch_size=sw_batch_size,
                                          predictor=window, overlap=overlap, mode=blend, padding_mode="replicate")
        if axes:
            logits = torch.flip(logits, axes)
        probs = torch.cat([torch.softmax(chunk, dim=1) for chunk in torch.split(logits, num_classes, dim=1)], dim=1)
        total = probs if total is None else total + probs
    total = (total / len(mirror_axes(tta)))[0]
    total = total if on_device else total.cpu()
    return {name: total[i * num_classes:(i + 1) * num_classes] for i, name in enumerate(names)}


def mutual_information(member_probs: Sequence[torch.Tensor], eps: float = 1e-8) -> torch.Tensor:
    """Member disagreement per voxel: H(mean p) - mean H(p_m) (0 when members agree)."""
    stacked = torch.stack(list(member_probs))  # (M, K, ...)
    mean = stacked.mean(0)
    entropy_of_mean = -(mean * torch.log(mean + eps)).sum(0)
    mean_entropy = -(stacked * torch.log(stacked + eps)).sum(1).mean(0)
    return (entropy_of_mean - mean_entropy).clamp_min(0)


def dice_between(a: np.ndarray, b: np.ndarray, structures: Sequence[str]) -> dict[str, float | None]:
    """Per-structure Dice of two class-index maps (None where both are empty); voxels `b` marks IGNORE_INDEX are
    left out."""
    a = np.where(b == IGNORE_INDEX, 0, a)
    out = {}
    for k, name in enumerate(structures, start=1):
        sa, sb = a == k, b == k
        denom = int(sa.sum()) + int(sb.sum())
        out[name] = None if denom == 0 else float(2 * np.logical_and(sa, sb).sum() / denom)
    return out


@dataclass
class PredictionResult:
    label: sitk.Image  # on-disk label values, on the target input's grid
    members: dict[str, sitk.Image] = field(default_factory=dict)
    disagreement: sitk.Image | None = None
    member_agreement: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def save(self, out_dir: Path, stem: str = "segmentation", suffix: str = ".nii.gz") -> dict[str, Path]:
        """Writes the label map, members, disagreement map and report, all or none: each into a staging folder
        beside them, then renamed into place, so that a failure part-way (a full disk) leaves the outputs of an
        earlier run as they were. `suffix` ".nrrd" keeps the geometry in double precision; NIfTI stores it in single
        precision."""
        from ..data.spec import write_json_atomic

        out_dir = Path(out_dir)
        writes = {"label": (f"{stem}{suffix}", lambda path: write_image(self.label, path))}
        for name, image in self.members.items():
            writes[f"member:{name}"] = (f"{stem}_member_{name}{suffix}", lambda path, image=image: write_image(image, path))
        if self.disagreement is not None:
            writes["disagreement"] = (f"{stem}_disagreement{suffix}", lambda path: write_image(self.disagreement, path))
        if self.member_agreement or self.info:
            report = {"info": self.info, "member_agreement": self.member_agreement}
            writes["report"] = (f"{stem}.json", lambda path: write_json_atomic(path, report))
        in_the_way = [name for name, _ in writes.values() if (out_dir / name).is_dir()]
        if in_the_way:
            raise UserError(f"{out_dir}: {', '.join(in_the_way)} is a folder; the outputs go by these names: move it")
        out_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".{stem}-staging-"))
        try:
            for name, write in writes.values():
                write(staging / name)
            for name, _ in writes.values():
                os.replace(staging / name, out_dir / name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return {key: out_dir / name for key, (name, _) in writes.items()}


class StageClock:
    """Seconds spent in each named stage, lap by lap (where a prediction's time goes: read, preprocess, sliding
    windows, output)."""

    def __init__(self):
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self._last, 3)
        self._last = now


class Predictor:
    """Loads a model folder once and segments cases."""

    def __init__(self, model_dir: str | Path, device: str = "auto", tta: bool = False, overlap: float = 0.5,
                 sw_batch_size: int | None = None, precision: str = "auto"):
        """`precision`: "auto" (bfloat16 where the device has it natively, else float32) or "float32"."""
        if precision not in ("auto", "float32"):
            raise UserError(f"precision {precision!r}: use auto or float32")
        self.model_dir = Path(model_dir)
        self.meta = read_model_meta(self.model_dir)
        self.device = resolve_device(device)
        self.method = build_method(self.meta)
        load_weights(self.model_dir, self.method.nets)
        self.method.to(self.device)
        self.method.train_mode(False)
        self.tta, self.overlap, self.sw_batch_size = tta, overlap, sw_batch_size
        self.amp_dtype = autocast_dtype(self.device, enabled=precision == "auto")

    @property
    def task(self) -> Task:
        return self.method.task

    def predict(self, images: Mapping[str, str | Path | sitk.Image], members: bool = False,
                uncertainty: bool = False) -> PredictionResult:
        started = time.perf_counter()
        stages = StageClock()
        loaded = {m: (img if isinstance(img, sitk.Image) else read_image(img)) for m, img in images.items()}
        stages.lap("read")
        unknown = [m for m in loaded if m not in self.task.modalities]
        if unknown:
            raise ImageError(f"this model does not use modality {', '.join(unknown)} (it uses "
                             f"{', '.join(self.task.modalities)})")
        available = [m for m in self.method.input_modalities() if m in loaded]
        if not available:
            raise ImageError(f"no input image for this model; give {' and '.join(self.method.input_modalities())}")
        arrays = load_case_arrays(loaded, available, self.method.plan)
        stages.lap("preprocess")
        # The probabilities stay on the device: the ensemble, its argmax and the disagreement are computed there, and
        # only label maps come back (from a GPU, one byte per voxel instead of 4 per class and member).
        probs = predict_probabilities(self.method, arrays["image"], available, self.device, self.tta, self.overlap,
                                      self.sw_batch_size, amp_dtype=self.amp_dtype, on_device=True)
        ensemble = self.method.ensemble(probs)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # so that the lap times the device's work, not its queueing
        stages.lap("sliding_windows")
        # The output lives on the grid of the first available input (the target when it is given).
        output_grid = Geometry.of(loaded[available[0]])
        values = np.asarray(self.task.label_values)
        lookup = values.astype(np.uint8 if values.max() < 256 else np.uint16)
        identity = np.array_equal(values, np.arange(len(values))) and lookup.dtype == np.uint8

        def to_output(p: torch.Tensor) -> np.ndarray:
            return back_to_grid(p, arrays["grid"], output_grid)

        def label_image(index: np.ndarray) -> sitk.Image:  # class indices -> the dataset's label values
            return from_array(index if identity else lookup[index], output_grid)

        ensemble_index = to_output(ensemble)
        result = PredictionResult(label=label_image(ensemble_index))
        if members or uncertainty:
            member_index = {name: to_output(p) for name, p in probs.items()}
            if members:
                result.members = {n: label_image(i) for n, i in member_index.items()}
            if uncertainty:
                mi = mutual_information(list(probs.values())).float().cpu().numpy()
                mi_image = from_array(mi, arrays["grid"])
                result.disagreement = resample_to_grid(mi_image, output_grid, "linear", default=0.0)
                names = list(member_index)
                result.member_agreement = {
                    f"{a}~{b}": dice_between(member_index[a], member_index[b], self.task.structures)
                    for a, b in itertools.combinations(names, 2)}
        stages.lap("output")
        result.info = {"inputs": available, "members": list(probs), "seconds": round(time.perf_counter() - started, 3),
                       "stage_seconds": stages.laps,
                       "device": str(self.device), "precision": str(self.amp_dtype or torch.float32).removeprefix("torch."), "tta": self.tta}
        return result


def class_index(probabilities: torch.Tensor) -> np.ndarray:
    """The most probable class of each voxel of probabilities (K, Z, Y, X), computed on their own device and returned
    as a uint8 array (uint16 past 256 classes): a running comparison, ties to the lower class as argmax. On a GPU only
    one byte per voxel then crosses to the host instead of K floats; on the CPU it is about 4x faster than numpy's
    argmax over the first axis (0.37 s against 1.58 s for 2 x 300 x 512 x 512, RESULTS.md)."""
    classes = probabilities.shape[0]
    index = torch.zeros(probabilities.shape[1:], dtype=torch.uint8 if classes <= 256 else torch.int32,
                        device=probabilities.device)
    best = probabilities[0].clone()
    for k in range(1, classes):
        index.masked_fill_(probabilities[k] > best, k)
        torch.maximum(best, probabilities[k], out=best)
    index = index.cpu().numpy()
    return index if classes <= 256 else index.astype(np.uint16)


def back_to_grid(probabilities: torch.Tensor, grid: Geometry, output: Geometry) -> np.ndarray:
    """Class-index map (uint8, or uint16 past 256 classes) on `output` from probabilities (K, Z, Y, X) on `grid`, on
    any device. On the same grid, the argmax where the probabilities are (`class_index`). Otherwise each class's
    probability is resampled by world coordinates (linear) and compared with the running maximum, so boundaries stay
    smooth at any resolution change while at most two output-sized float arrays exist at a time. Voxels outside the
    processed box have probability 0 everywhere and get class 0 (background)."""
    if grid.matches(output, tolerance=1e-6):
        return class_index(probabilities)
    dtype = np.uint8 if probabilities.shape[0] <= 256 else np.uint16
    best = index = None
    for k in range(probabilities.shape[0]):
        probability = probabilities[k].float().cpu().numpy()
        image = resample_to_grid(from_array(probability, grid), output, "linear", default=0.0)
        resampled = sitk.GetArrayViewFromImage(image)  # a view: valid while `image` lives
        if best is None:
            best, index = resampled.copy(), np.zeros(resampled.shape, dtype=dtype)
            continue
        higher = resampled > best
        index[higher] = k
        np.maximum(best, resampled, out=best)
    return index
