"""Geometry is sacred: IO, resampling and the predict path keep spacing, origin, direction and world positions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from crossmodalseg.data.geometry import (
    grid_with_spacing,
    index_to_world,
    resample_to_grid,
    world_to_index,
)
from crossmodalseg.data.io import (
    Geometry,
    from_array,
    read_image,
    to_array,
    write_image,
)
from crossmodalseg.data.plan import Normalisation, Plan, foreground_mask
from crossmodalseg.data.transforms import load_case_arrays
from crossmodalseg.engine.inferer import back_to_grid, class_index

from .conftest import OBLIQUE_DIRECTION


def oblique_image(size=(40, 36, 20), spacing=(1.5, 1.2, 3.0), origin=(-31.0, 12.5, 100.25)) -> sitk.Image:
    image = sitk.Image(list(size), sitk.sitkFloat32)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(OBLIQUE_DIRECTION)
    return image


def sphere_label(geometry: Geometry, centre_world, radius_mm: float) -> np.ndarray:
    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in geometry.size[::-1]], indexing="ij")
    idx = np.stack([xx.ravel(), yy.ravel(), zz.ravel()], 1)
    world = index_to_world(geometry, idx)
    inside = np.linalg.norm(world - np.asarray(centre_world), axis=1) <= radius_mm
    return inside.reshape(geometry.size[::-1]).astype(np.uint8)


def centroid_world(label: np.ndarray, geometry: Geometry) -> np.ndarray:
    zyx = np.argwhere(label > 0)
    return index_to_world(geometry, zyx[:, ::-1]).mean(0)


@pytest.mark.parametrize("suffix", [".mha", ".nrrd", ".nii.gz"])
def test_io_round_trip_is_exact(tmp_path: Path, suffix: str):
    image = oblique_image()
    array = np.random.default_rng(0).normal(size=image.GetSize()[::-1]).astype(np.float32)
    image = from_array(array, image)
    if suffix == ".nii.gz":
        # NIfTI stores geometry in float32: an image read from NIfTI must survive a write/read unchanged.
        image = read_image(write_image(image, tmp_path / "first.nii.gz"))
        assert Geometry.of(image).matches(Geometry.of(oblique_image()), tolerance=1e-6)
    path = write_image(image, tmp_path / f"a{suffix}")
    back = read_image(path)
    assert Geometry.of(back).matches(Geometry.of(image), tolerance=1e-9)
    if suffix != ".nrrd":  # NRRD stores spacing x direction as one matrix: equal to the last bit only elsewhere
        assert Geometry.of(back) == Geometry.of(image)
    np.testing.assert_array_equal(to_array(back), array)
    assert not [p.name for p in tmp_path.iterdir() if ".tmp" in p.name]  # no temporary file left behind


def test_world_index_maps_invert_each_other():
    geometry = Geometry.of(oblique_image())
    idx = np.array([[0, 0, 0], [3.5, 7.25, 11.0], [39, 35, 19]])
    np.testing.assert_allclose(world_to_index(geometry, index_to_world(geometry, idx)), idx, atol=1e-9)


def test_resampling_between_grids_keeps_world_positions():
    source = Geometry.of(oblique_image())
    centre = index_to_world(source, np.array([[20, 18, 10]]))[0]
    label = from_array(sphere_label(source, centre, 12.0), source)
    # Another grid: identity direction, other spacing and origin, covering the same region.
    # (The origin offset avoids voxel centres exactly halfway between source voxels, where nearest-neighbour ties
    # would bias the centroid by design.)
    target = Geometry(size=(60, 60, 40), spacing=(1.0, 1.0, 1.5), origin=tuple(centre - [29.63, 29.79, 29.6]),
                      direction=(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    moved = resample_to_grid(label, target, "nearest")
    assert Geometry.of(moved) == target
    np.testing.assert_allclose(centroid_world(to_array(moved), target), centre, atol=0.5)
    # Volume in mm^3 is preserved (to the discretisation).
    vol_src = to_array(label).sum() * np.prod(source.spacing)
    vol_dst = to_array(moved).sum() * np.prod(target.spacing)
    assert abs(vol_dst - vol_src) / vol_src < 0.05


def test_refine_and_back_is_voxel_exact():
    source = oblique_image()
    labels = np.random.default_rng(1).integers(0, 4, size=source.GetSize()[::-1]).astype(np.uint8)
    label = from_array(labels, source)
    fine = Geometry(size=tuple(2 * n for n in source.GetSize()), spacing=tuple(s / 2 for s in source.GetSpacing()),
                    origin=tuple(index_to_world(Geometry.of(source), np.array([[-0.25, -0.25, -0.25]]))[0]),
                    direction=source.GetDirection())
    back = resample_to_grid(resample_to_grid(label, fine, "nearest"), source, "nearest")
    np.testing.assert_array_equal(to_array(back, np.uint8), labels)


def test_grid_with_spacing_keeps_origin_direction_and_extent():
    geometry = Geometry.of(oblique_image())
    coarse = grid_with_spacing(geometry, (3.0, 2.4, 6.0))
    assert coarse.origin == geometry.origin and coarse.direction == geometry.direction
    assert coarse.size == (20, 18, 10)


def test_no_resampling_asks_for_more_voxels_than_the_gate_allows():
    """A 400^3 volume at 2.5 mm brought to 0.01 mm would be 1e15 voxels: refused with a message, before
    allocating."""
    from crossmodalseg.data.gate import DEFAULT_MAX_VOXELS, ImageError

    geometry = Geometry((400, 400, 400), (2.5, 2.5, 2.5), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    with pytest.raises(ImageError, match="more than 268,435,456 voxels; check the image's spacing"):
        grid_with_spacing(geometry, (0.01, 0.01, 0.01))
    side = int(round(DEFAULT_MAX_VOXELS ** (1 / 3)))  # just inside the limit still works
    assert grid_with_spacing(geometry, (1000 / side,) * 3).size == (side, side, side)


def test_a_tiny_image_cannot_ask_for_a_huge_grid():
    """A 4x4x4 upload at 250 mm spacing (valid, if odd) brought to a 1 mm plan asked for 1e9 voxels' work; past
    256^3 voxels a grid may be at most 64 times the image's own. Honest resolution changes stay possible."""
    from crossmodalseg.data.gate import ImageError
    from crossmodalseg.data.geometry import MAX_UPSAMPLING, SMALL_GRID_VOXELS

    eye = (1, 0, 0, 0, 1, 0, 0, 0, 1)
    tiny = Geometry((4, 4, 4), (250.0, 250.0, 250.0), (0.0, 0.0, 0.0), eye)
    with pytest.raises(ImageError, match="more than 268,435,456 voxels"):
        grid_with_spacing(tiny, (1.0, 1.0, 1.0))
    with pytest.raises(ImageError, match="more than 64 times its own"):
        grid_with_spacing(tiny, (2.0, 2.0, 2.0))  # 500^3 = 1.25e8 voxels from 64
    assert np.prod(grid_with_spacing(tiny, (4.0, 4.0, 4.0)).size) <= SMALL_GRID_VOXELS  # 250^3: allowed
    mr = Geometry((256, 256, 30), (0.9, 0.9, 6.0), (0.0, 0.0, 0.0), eye)  # thick-slice MR to a 1 mm plan: 5.4x
    assert grid_with_spacing(mr, (1.0, 1.0, 1.0)).size == (230, 230, 180)
    ct = Geometry((128, 128, 64), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0), eye)  # a 2 mm CT to a 0.5 mm plan: 64x
    assert grid_with_spacing(ct, (0.5, 0.5, 0.5)).size == (512, 512, 256)
    assert MAX_UPSAMPLING == 64


def _plan(spacing_zyx) -> Plan:
    return Plan(preset="fast", spacing=list(spacing_zyx), patch_size=[16, 16, 16], strides=[[1, 1, 1]],
                kernels=[[3, 3, 3]], filters=[8], batch_size=1, iterations_per_epoch=1, learning_rate=1e-3,
                deep_supervision_heads=0, normalisation={"ct": Normalisation("ct", "CT", (-100, 200), 50.0, 60.0)})


def test_preprocess_and_back_at_native_spacing_is_exact():
    """load -> preprocess -> (perfect) prediction -> back to the input grid reproduces the label voxel for voxel."""
    image = oblique_image()
    geometry = Geometry.of(image)
    label = sphere_label(geometry, index_to_world(geometry, np.array([[20, 18, 10]]))[0], 10.0)
    label[label > 0] += np.random.default_rng(0).integers(0, 2, size=int(label.sum())).astype(np.uint8)
    arrays = load_case_arrays({"ct": image}, ["ct"], _plan(image.GetSpacing()[::-1]), from_array(label, image),
                              [0, 1, 2])
    assert arrays["grid"] == geometry
    one_hot = torch.nn.functional.one_hot(torch.as_tensor(arrays["label"][0]), 3).permute(3, 0, 1, 2).float()
    np.testing.assert_array_equal(back_to_grid(one_hot, arrays["grid"], geometry), label)


def test_prediction_on_a_coarser_grid_lands_in_place():
    """A perfect prediction made on the coarser processing grid, mapped back, sits where the object is."""
    image = oblique_image()
    geometry = Geometry.of(image)
    centre = index_to_world(geometry, np.array([[20, 18, 10]]))[0]
    arrays = load_case_arrays({"ct": image}, ["ct"], _plan((4.5, 1.8, 2.25)))
    grid = arrays["grid"]
    assert grid.spacing == (2.25, 1.8, 4.5)
    assert grid.origin == geometry.origin and grid.direction == geometry.direction
    coarse = sphere_label(grid, centre, 12.0)  # the object as seen on the processing grid
    one_hot = torch.nn.functional.one_hot(torch.as_tensor(coarse, dtype=torch.long), 2).permute(3, 0, 1, 2).float()
    back = back_to_grid(one_hot, grid, geometry)
    truth = sphere_label(geometry, centre, 12.0)
    assert back.shape == truth.shape
    np.testing.assert_allclose(centroid_world(back, geometry), centre, atol=0.75)
    dice = 2 * np.logical_and(back, truth).sum() / (back.sum() + truth.sum())
    assert dice > 0.9


@pytest.mark.parametrize("classes", [2, 5, 300])
def test_class_index_is_the_argmax_ties_included(classes: int):
    """The running comparison that replaces argmax (on the device, one byte per voxel back) gives argmax's classes,
    ties to the lower class as argmax, in uint8 and past 256 classes in uint16."""
    rng = np.random.default_rng(classes)
    shape = (classes, 6, 7, 8) if classes > 256 else (classes, 12, 14, 16)
    probabilities = rng.integers(0, 4, size=shape).astype(np.float32)  # coarse values: many exact ties
    index = class_index(torch.from_numpy(probabilities))
    np.testing.assert_array_equal(index, probabilities.argmax(0))
    assert index.dtype == (np.uint16 if classes > 256 else np.uint8)
    assert (probabilities.max(0) == probabilities[:1].max(0)).any()  # the ties to class 0 were really there


def test_normalisation_keeps_the_textbook_formula():
    """In place on one new array, bit for bit the clip-then-z-score (CT) and z-score (MR) it replaced; the input is
    left untouched."""
    rng = np.random.default_rng(1)
    array = rng.normal(40.0, 300.0, (10, 12, 14)).astype(np.float32)
    before = array.copy()
    ct = Normalisation("ct", "CT", (-100.0, 200.0), 50.0, 60.0)
    np.testing.assert_array_equal(ct.apply(array), (np.clip(array, -100.0, 200.0) - 50.0) / 60.0)
    mr = Normalisation("mr", "MR").apply(array)
    mask = foreground_mask(array)
    np.testing.assert_array_equal(mr, (array - float(array[mask].mean())) / float(array[mask].std()))
    assert mr.dtype == np.float32 and np.array_equal(array, before)


def test_mr_normalisation_is_the_whole_images_z_score():
    """A skull-stripped MR whose background is filled with its lowest value (as in the shared BraTS cases): the whole
    image is z-scored, background included (measured: z-scoring inside the brain learnt far slower, RESULTS.md)."""
    rng = np.random.default_rng(0)
    array = np.full((20, 24, 24), -3.5, np.float32)
    array[5:15, 6:18, 6:18] = np.clip(rng.normal(0.0, 1.3, (10, 12, 12)), -3.0, 4.0)
    out = Normalisation("t1c", "MR").apply(array)
    assert abs(float(out.mean())) < 1e-5 and abs(float(out.std()) - 1.0) < 1e-5
    # one affine map for the whole image: the background stays one value, below every brain voxel's
    background = out[array == -3.5]
    assert np.ptp(background) == 0 and background[0] < out[5:15, 6:18, 6:18].min()


def test_written_files_get_a_new_files_usual_permissions(tmp_path: Path):
    """Every segmentation, dataset.json and model file came out 0600 (mkstemp's private mode, whatever the umask):
    unreadable to a colleague or a group sharing the folder. They now get 0666 without the umask, as open() gives."""
    import os
    import stat

    from crossmodalseg.data.spec import write_json_atomic
    from crossmodalseg.engine.checkpoint import save_tensors

    mask = os.umask(0)
    os.umask(mask)
    expected = 0o666 & ~mask
    image = write_image(from_array(np.zeros((2, 3, 4), np.uint8), oblique_image()[:4, :3, :2]), tmp_path / "s.nrrd")
    write_json_atomic(tmp_path / "d.json", {"a": 1})
    save_tensors(tmp_path / "w.safetensors", {"x": torch.zeros(2)})
    for path in (image, tmp_path / "d.json", tmp_path / "w.safetensors"):
        assert stat.S_IMODE(path.stat().st_mode) == expected, (path.name, oct(path.stat().st_mode))
    assert expected & 0o044  # readable by the group and others under the usual umask (022 or 002)
