"""Seeded mutation fuzzing of what users and attackers hand the backend as files: image headers and model.json.

Each case is a real file (an image ITK wrote, the model.json of a real trained model) with one to three mutations:
header values replaced by hostile ones (negative, huge, NaN, another type), lines added or removed, bytes flipped,
truncation. A mutated image must be read or refused with an ImageError, never anything else; the reading runs in a
child process, so a crash inside ITK (NDims = -1 once caused a segmentation fault) fails the test instead of ending
the run. A mutated model.json must build or be refused with a ModelFolderError before any weight is allocated, and
a model that builds must predict. Derandomised: the same mutations every run.
"""

from __future__ import annotations

import copy
import gzip
import json
import random
import re
import struct
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

IMAGE_CASES = 3000
MODEL_CASES = 400
HOSTILE_TEXT = ["0", "-1", "1e30", "nan", "inf", "99999999999", "2 3", "1 1 1 1", "", "x", "3.5", "-0", "100",
                "(nan,0,0) (0,1,0) (0,0,1)", "none", "gzip", "raw", "bzip2", "LOCAL", "/etc/passwd", "MET_DOUBLE",
                "MET_CHAR_ARRAY", "double", "int64", "block", "True", "1 0 0 0 1 0 0 0 1", "0 0 0 0 0 0 0 0 0"]
EXTRA_LINES = ["data file: /etc/passwd", "line skip: 5", "byte skip: -1", "space: RAS", "NDims = 4",
               "ElementNumberOfChannels = 3", "HeaderSize = 100000", "CompressedDataSize = 3", "Offset = 1 2",
               "Position = 0 0 0", "ElementSpacing = 0 0 0", "spacings: 1 nan 1", "dimension: 1", "kinds: domain"]
HOSTILE_NUMBERS = [0, -1, 1, 3, 7, 255, 1024, 32767, -32768, 0.5, -352.0, 1e30, float("nan"), float("inf")]
NIFTI_FIELDS = [(0, "<i"), (40, "<8h"), (70, "<h"), (72, "<h"), (76, "<8f"), (108, "<f"), (252, "<2h"),
                (256, "<6f"), (280, "<12f")]


def seed_images(folder: Path) -> dict[str, bytes]:
    """Small float images ITK writes in every accepted format (raw and compressed), with an oblique grid."""
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(5, 6, 7)).astype(np.float32))
    image.SetSpacing((0.7, 0.8, 2.5))
    image.SetOrigin((1.0, 2.0, 3.0))
    image.SetDirection(np.linalg.qr(np.random.default_rng(1).normal(size=(3, 3)))[0].ravel().tolist())
    seeds = {}
    for name, compress in (("a.nii", False), ("a.nii.gz", True), ("a.nrrd", False), ("b.nrrd", True),
                           ("a.mha", False), ("b.mha", True)):
        sitk.WriteImage(image, str(folder / name), compress)
        seeds[name] = (folder / name).read_bytes()
    return seeds


def _mutate_text_header(rng: random.Random, data: bytes, name: str) -> bytes:
    end = data.find(b"\n\n") if name.endswith(".nrrd") else data.find(b"ElementDataFile")
    lines = data[:end].split(b"\n")
    if rng.random() < 0.3:
        lines.insert(rng.randrange(1, len(lines) + 1), rng.choice(EXTRA_LINES).encode())
    else:
        i = rng.randrange(1, len(lines))
        key = re.split(rb":=|: | = ", lines[i])[0]
        separator = b": " if name.endswith(".nrrd") else b" = "
        lines[i] = key + separator + rng.choice(HOSTILE_TEXT).encode() if rng.random() < 0.9 else b""
    return b"\n".join(lines) + data[end:]


def _mutate_nifti_header(rng: random.Random, data: bytes, compressed: bool) -> bytes:
    raw = bytearray(gzip.decompress(data) if compressed else data)
    offset, layout = rng.choice(NIFTI_FIELDS)
    values = list(struct.unpack_from(layout, raw, offset))
    i = rng.randrange(len(values))
    value = rng.choice(HOSTILE_NUMBERS)
    values[i] = int(max(-32768, min(32767, value))) if layout[-1] in "hi" and np.isfinite(value) else (
        0 if layout[-1] in "hi" else value)
    struct.pack_into(layout, raw, offset, *values)
    return gzip.compress(bytes(raw)) if compressed else bytes(raw)


def mutate_image(rng: random.Random, data: bytes, name: str) -> bytes:
    kind = rng.randrange(5)
    if kind == 0 and len(data) > 1:  # truncated
        return data[: rng.randrange(1, len(data))]
    if kind == 1:  # bytes flipped in the header's first 400
        flipped = bytearray(data)
        for _ in range(rng.randint(1, 6)):
            flipped[rng.randrange(min(len(flipped), 400))] = rng.randrange(256)
        return bytes(flipped)
    if kind == 2:  # junk after the data
        return data + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
    try:
        if name.endswith((".nrrd", ".mha")):
            return _mutate_text_header(rng, data, name)
        return _mutate_nifti_header(rng, data, name.endswith(".gz"))
    except Exception:  # noqa: BLE001 - an earlier mutation left nothing to parse (bad gzip, no header end)
        return data


def read_mutated_images(folder: str, first: int, count: int) -> dict[str, Any]:
    """In a child process: `count` mutated files read through the gate; what became of them."""
    from crossmodalseg.data.io import ImageError, read_image, to_array

    seeds = seed_images(Path(folder) / "seeds")
    outcome: dict[str, Any] = {"read": 0, "refused": 0, "other": []}
    for k in range(first, first + count):
        rng = random.Random(k)
        name = rng.choice(sorted(seeds))
        data = seeds[name]
        for _ in range(rng.randint(1, 3)):
            data = mutate_image(rng, data, name)
        path = Path(folder) / f"mutated{name[name.index('.'):]}"
        path.write_bytes(data)
        try:
            to_array(read_image(path))
            outcome["read"] += 1
        except ImageError:
            outcome["refused"] += 1
        except Exception as e:  # noqa: BLE001 - anything else is the finding
            outcome["other"].append((k, name, f"{type(e).__name__}: {str(e)[:200]}"))
    return outcome


def test_mutated_image_files_are_read_or_refused_never_anything_else(tmp_path: Path):
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:  # a crash breaks the pool: a failure
        outcome = pool.submit(read_mutated_images, str(tmp_path), 0, IMAGE_CASES).result(timeout=600)
    assert outcome["other"] == [], outcome["other"][:5]
    assert outcome["read"] > 50 and outcome["refused"] > 200, outcome  # the mutations reach both sides


def _leaves(value: Any, path: tuple = ()) -> list[tuple]:
    found = [path] if path else []
    if isinstance(value, dict):
        for key, item in value.items():
            found += _leaves(item, path + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _leaves(item, path + (index,))
    return found


HOSTILE_JSON = [0, -1, 1, 2, 3, 1e9, -1e9, 10**6, 0.5, "", "x", None, True, [], {}, [0], [1, 1, 1], [0, 0, 0],
                [1e9, 1, 1], [-1, 48, 48], [[1, 1, 1]], "../../etc/passwd", "ct", [2, 2, 2], 65536]


def mutate_model(rng: random.Random, meta: dict) -> dict:
    meta = copy.deepcopy(meta)
    for _ in range(rng.randint(1, 3)):
        path = rng.choice(_leaves({k: meta[k] for k in ("method", "task", "plan") if k in meta}))
        parent = meta
        for key in path[:-1]:
            parent = parent[key]
        if rng.random() < 0.85:
            parent[path[-1]] = copy.deepcopy(rng.choice(HOSTILE_JSON))
        elif isinstance(parent, dict):
            del parent[path[-1]]
    return meta


def test_mutated_model_descriptions_build_and_predict_or_are_refused(trained_single: Path):
    import torch

    from crossmodalseg.engine.checkpoint import ModelFolderError, read_model_meta
    from crossmodalseg.engine.inferer import build_method, predict_probabilities
    from crossmodalseg.errors import UserError

    meta = read_model_meta(trained_single)
    image = np.random.default_rng(0).normal(size=(1, 12, 20, 20)).astype(np.float32)
    built = refused = 0
    findings = []
    for k in range(MODEL_CASES):
        mutated = json.loads(json.dumps(mutate_model(random.Random(k), meta)))
        try:
            method = build_method(mutated)
        except ModelFolderError:
            refused += 1
            continue
        except Exception as e:  # noqa: BLE001 - anything else is the finding
            findings.append((k, f"build: {type(e).__name__}: {str(e)[:200]}"))
            continue
        built += 1
        try:
            probabilities = predict_probabilities(method, image, method.input_modalities(), torch.device("cpu"))
            assert all(torch.isfinite(p).all() for p in probabilities.values())
        except UserError:
            pass
        except Exception as e:  # noqa: BLE001
            findings.append((k, f"predict: {type(e).__name__}: {str(e)[:200]}"))
    assert findings == [], findings[:5]
    assert built > 10 and refused > 50, (built, refused)
