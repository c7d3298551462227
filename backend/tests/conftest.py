"""Shared fixtures: small phantom datasets with known, non-trivial geometry, and one model trained on them once per
session (several tests reuse it rather than each paying for training)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from crossmodalseg.data.phantom import make_phantom_dataset
from crossmodalseg.data.spec import DatasetSpec

from .learning import BATCH

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"

# A rotated (30 degrees about z), left-right flipped grid with anisotropic spacing: every geometry bug shows.
_c, _s = np.cos(np.pi / 6), np.sin(np.pi / 6)
OBLIQUE_DIRECTION = tuple(float(v) for v in np.array([[-_c, -_s, 0], [-_s, _c, 0], [0, 0, 1]]).ravel())
PHANTOM_SIZE = (48, 48, 32)
PHANTOM_SPACING = (3.0, 3.0, 4.0)

# Training budget of the session model: measured to reach held-out Dice >= 0.8 on every structure. It trains the
# learning tests' 2 patches a step (learning.BATCH), each a whole case (the patch covers these images), where the
# plan takes 4: 930 against 1769 ms a step at one thread (AVX2, benchmarks/bench_batch_step.py), and liver / kidney /
# spleen 0.916 / 0.962 / 0.837 on the held-out pair (2026-12-08).
SESSION_EPOCHS = int(os.environ.get("CMS_TEST_EPOCHS", "12"))
SESSION_ITERATIONS = 25


SLOW_FIXTURES = {"trained_single"}  # tests that need a model trained for minutes belong to the slow part

# scripts/test.sh runs the suite on two pytest-xdist workers (--dist loadgroup). One group per module keeps a
# module's fixtures (a server, the panel and its backend) on one worker, and the modules that use the session model
# form one group, so that it is trained once. The longest groups start first, so that no worker is left with one of
# them at the end: the two learning modules (about 18 and 13 min at one torch thread on a 2-core AVX2 CPU), then
# the others (the panel's about 430 s there, the session model's group 355 s, real BraTS 280 s; 2026-12-08).
LONGEST_GROUPS_FIRST = ("test_methods.py", "test_cmc_learning.py", "test_panel_session.py", "trained_single",
                        "test_real_brats.py", "test_training_engine.py", "test_logic.py", "test_demo.py")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config, items) -> None:
    sharing = {item.path for item in items if "trained_single" in getattr(item, "fixturenames", ())}
    groups = {}
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
        groups[item] = "trained_single" if item.path in sharing else item.path.name
        item.add_marker(pytest.mark.xdist_group(groups[item]))
    rank = {group: i for i, group in enumerate(LONGEST_GROUPS_FIRST)}
    items.sort(key=lambda item: rank.get(groups[item], len(rank)))  # stable: a module's tests stay in order


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "slow: trains a model for a while (still CPU, still part of the suite)")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a learning module (why: tests/learning.py), restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def shared_data(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"real test data {path} is not here (tests expect ../shared/data beside the checkout)")
    return path


@pytest.fixture(scope="session")
def phantom(tmp_path_factory) -> DatasetSpec:
    """10 paired CT+MR phantom cases on an oblique, anisotropic grid: 8 to train, 2 held out."""
    return make_phantom_dataset(tmp_path_factory.mktemp("phantom"), n_cases=10, seed=1, size=PHANTOM_SIZE,
                                spacing=PHANTOM_SPACING, direction=OBLIQUE_DIRECTION)


@pytest.fixture(scope="session")
def phantom_split(phantom, tmp_path_factory) -> tuple[DatasetSpec, DatasetSpec]:
    root = tmp_path_factory.mktemp("split")
    train = DatasetSpec("phantom-train", phantom.labels, phantom.modalities, phantom.cases[:8], root / "train")
    test = DatasetSpec("phantom-test", phantom.labels, phantom.modalities, phantom.cases[8:], root / "test")
    train.save()
    test.save()
    return train, test


@pytest.fixture(scope="session")
def trained_single(phantom_split, tmp_path_factory) -> Path:
    """`single` on phantom CT, trained once for the session."""
    from crossmodalseg.engine.trainer import TrainConfig, train

    train_spec, _ = phantom_split
    out = tmp_path_factory.mktemp("models") / "single_ct"
    config = TrainConfig(method="single", target="ct", epochs=SESSION_EPOCHS, iterations_per_epoch=SESSION_ITERATIONS,
                         batch_size=BATCH, device="cpu", val_every=SESSION_EPOCHS, seed=0)
    return train(train_spec.root, out, config)


def write_image(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
                direction=None) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    sitk.WriteImage(image, str(path))
    return path
