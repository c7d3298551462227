"""Model folders and training checkpoints: JSON + safetensors, written atomically, loaded without unpickling.

Model folder: `model.json` (written last, so its presence means the folder is complete) and one
`<network>.safetensors` per network. Training checkpoints live in `<model>/checkpoint/ckpt-<epoch>/` with
`latest.json` pointing at the newest complete one, so a crash at any moment leaves a usable checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from ..data.spec import read_json_file, write_json_atomic
from ..errors import UserError
from ..files import write_atomic

FORMAT_VERSION = 2  # 2: one U-Net class for every method (networks of version 1 do not load)
MODEL_FILE = "model.json"


class ModelFolderError(UserError):
    """A model folder that cannot be loaded; the message says why."""


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    write_atomic(path, lambda tmp: save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp))


def save_network(path: Path, net: torch.nn.Module) -> None:
    """Weights of one network (networks such as DynUNet alias submodules; save_model stores shared tensors once).
    Contiguous on disk whatever the layout in memory (float32 CPU training keeps channels-last weights; older
    safetensors releases refuse those unless told)."""
    write_atomic(path, lambda tmp: save_model(net, tmp, force_contiguous=True))


def load_network(path: Path, net: torch.nn.Module, origin: str = "") -> None:
    path = Path(path)
    if not path.exists():
        raise ModelFolderError(f"{path}: weights file missing")
    try:
        load_model(net, str(path), strict=True, device=str(next(net.parameters()).device))
    except (SafetensorError, OSError) as e:
        raise ModelFolderError(f"{path}: not a valid safetensors file ({e})") from None
    except RuntimeError as e:
        raise ModelFolderError(f"{path} does not fit the network {origin}: {str(e).splitlines()[0][:300]}") from None


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not Path(path).exists():
        raise ModelFolderError(f"{path}: weights file missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ModelFolderError(f"{path}: not a valid safetensors file ({e})") from None


def write_model_folder(folder: Path, meta: dict[str, Any], nets: dict[str, torch.nn.Module]) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, net in nets.items():
        save_network(folder / f"{name}.safetensors", net)
    write_json_atomic(folder / MODEL_FILE, {"format_version": FORMAT_VERSION, **meta})
    return folder


def read_model_meta(folder: Path) -> dict[str, Any]:
    path = Path(folder) / MODEL_FILE
    if not path.exists():
        raise ModelFolderError(f"{folder} is not a model folder (no {MODEL_FILE}); train one with "
                               f"`crossmodalseg train` or pass the folder it wrote")
    meta = read_json_file(path, ModelFolderError)
    if not isinstance(meta, dict):
        raise ModelFolderError(f"{path}: not a model description (a JSON object is expected)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ModelFolderError(f"{path}: format version {meta.get('format_version')!r}, this crossmodalseg reads "
                               f"version {FORMAT_VERSION}; train the model again with this version")
    missing = [key for key in ("method", "task", "plan") if not isinstance(meta.get(key), dict)]
    if missing:
        raise ModelFolderError(f"{path}: {', '.join(missing)} missing or not an object; export the model again")
    return meta


def load_weights(folder: Path, nets: dict[str, torch.nn.Module]) -> None:
    for name, net in nets.items():
        load_network(Path(folder) / f"{name}.safetensors", net, "described in model.json")


# ---- training checkpoints ------------------------------------------------------------------------------------
def _optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{key}"] = value
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    for key, value in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The global random generators (torch CPU and CUDA, NumPy, Python) as tensors and JSON."""
    import random

    import numpy as np

    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = state
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return tensors, {"numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
                     "python": [version, list(internal), gauss_next]}


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    kind, keys, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = meta["python"]
    random.setstate((version, tuple(internal), gauss_next))


def save_checkpoint(folder: Path, epoch: int, nets: dict[str, torch.nn.Module],
                    optimizers: dict[str, torch.optim.Optimizer], trainer_state: dict[str, Any], keep: int = 1) -> Path:
    """Weights, optimiser states, `trainer_state` (JSON) and the random generators' states, in a new folder
    renamed into place, then `latest.json` pointing at it."""
    root = Path(folder) / "checkpoint"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"ckpt-{epoch:05d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".ckpt-{epoch:05d}."))
    try:
        for name, net in nets.items():
            save_network(tmp / f"net.{name}.safetensors", net)
        optim_meta = {}
        for name, opt in optimizers.items():
            tensors, meta = _optimizer_to_tensors(opt)
            save_tensors(tmp / f"optim.{name}.safetensors", tensors)
            optim_meta[name] = meta
        rng_tensors, rng_meta = rng_state()
        save_tensors(tmp / "rng.safetensors", rng_tensors)
        write_json_atomic(tmp / "state.json", {"epoch": epoch, "trainer": trainer_state, "optimizers": optim_meta,
                                               "rng": rng_meta})
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_json_atomic(root / "latest.json", {"checkpoint": final.name, "epoch": epoch})
    old = sorted(p for p in root.glob("ckpt-*") if p.name != final.name)
    for p in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def latest_checkpoint(folder: Path) -> Path | None:
    pointer = Path(folder) / "checkpoint" / "latest.json"
    if not pointer.exists():
        return None
    try:
        path = pointer.parent / json.loads(pointer.read_text())["checkpoint"]
    except (json.JSONDecodeError, KeyError):
        return None
    return path if (path / "state.json").exists() else None


def load_checkpoint(path: Path, nets: dict[str, torch.nn.Module],
                    optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, Any]:
    """Restores weights, optimiser states and the random generators; returns the checkpoint's state.json."""
    state = json.loads((Path(path) / "state.json").read_text())
    for name, net in nets.items():
        load_network(Path(path) / f"net.{name}.safetensors", net, "of this run")
    for name, opt in optimizers.items():
        _optimizer_from_tensors(opt, load_tensors(Path(path) / f"optim.{name}.safetensors"),
                                state["optimizers"][name])
    if state.get("rng") and (Path(path) / "rng.safetensors").exists():
        set_rng_state(load_tensors(Path(path) / "rng.safetensors"), state["rng"])
    return state
