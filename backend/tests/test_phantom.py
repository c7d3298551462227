"""The synthetic CT + MR abdomen phantom: layout, spec, geometry, anatomy, intensities, determinism."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from crossmodalseg.data.io import Geometry, read_image
from crossmodalseg.data.phantom import make_phantom_dataset
from crossmodalseg.data.spec import load_spec

SMALL = dict(size=(48, 48, 30), spacing=(4.0, 4.0, 5.0))  # about the default field of view, fewer voxels

# An oblique direction: 30 degrees about z, then the y and z axes swapped with a flip (det +1).
_c, _s = np.cos(np.pi / 6), np.sin(np.pi / 6)
OBLIQUE = tuple((np.array([[_c, -_s, 0], [_s, _c, 0], [0, 0, 1]]) @ np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0]]))
                .ravel().tolist())


def _arrays(spec, case_id: str, modality: str) -> tuple[np.ndarray, np.ndarray]:
    case = spec.case(case_id)
    return (sitk.GetArrayFromImage(read_image(case.images[modality])),
            sitk.GetArrayFromImage(read_image(case.labels[modality])))


def test_files_and_spec(tmp_path):
    out = tmp_path / "phantom"
    spec = make_phantom_dataset(out, n_cases=3, seed=1, **SMALL)

    assert (out / "dataset.json").is_file()
    for i in range(3):
        for m in ("ct", "mr"):
            assert (out / f"case{i:03d}" / f"{m}.nii.gz").is_file()
            assert (out / f"case{i:03d}" / f"{m}_label.nii.gz").is_file()
    on_disk = json.loads((out / "dataset.json").read_text())
    assert on_disk["cases"][0]["images"] == {"ct": "case000/ct.nii.gz", "mr": "case000/mr.nii.gz"}  # relative

    loaded = load_spec(out)
    assert loaded.labels == spec.labels == {"background": 0, "liver": 1, "kidney": 2, "spleen": 3}
    assert loaded.modalities == spec.modalities == {"ct": "CT", "mr": "MR"}
    assert [c.id for c in loaded.cases] == [c.id for c in spec.cases] == ["case000", "case001", "case002"]
    assert loaded.root == spec.root == out.resolve()
    for a, b in zip(loaded.cases, spec.cases):
        assert a.images == b.images and a.labels == b.labels
        assert all(p.is_absolute() and p.is_file() for p in [*b.images.values(), *b.labels.values()])
    assert spec.structures == ["liver", "kidney", "spleen"]


def test_every_structure_in_every_label_and_paired_modalities_share_anatomy(tmp_path):
    for seed in (0, 7):
        spec = make_phantom_dataset(tmp_path / f"s{seed}", n_cases=6, seed=seed, **SMALL)
        for case in spec.cases:
            ct, ct_label = _arrays(spec, case.id, "ct")
            mr, mr_label = _arrays(spec, case.id, "mr")
            assert ct_label.dtype == np.uint8
            assert set(np.unique(ct_label)) == {0, 1, 2, 3}, case.id
            counts = np.bincount(ct_label.ravel(), minlength=4)
            assert counts[1] > counts[3] > 50 and counts[2] > 50, (case.id, counts)  # liver is the largest organ
            # Two kidneys, one either side of the volume's centre line.
            half = ct_label.shape[2] // 2
            assert (ct_label[..., :half] == 2).sum() > 20 and (ct_label[..., half:] == 2).sum() > 20
            np.testing.assert_array_equal(ct_label, mr_label)
            assert not np.array_equal(ct.astype(np.float32), mr.astype(np.float32))
            # The same body in both modalities: MR is bright inside CT's body outline and dark (air) outside it.
            body = ct > -500
            inside, outside = ndimage.binary_erosion(body, iterations=2), ~ndimage.binary_dilation(body, iterations=2)
            assert np.median(mr[inside]) > 80 > 3 * np.median(mr[outside])


def test_geometry_default_is_centred_identity(tmp_path):
    spec = make_phantom_dataset(tmp_path, n_cases=1)
    image = read_image(spec.cases[0].images["ct"])
    label = read_image(spec.cases[0].labels["ct"])
    assert image.GetSize() == (64, 64, 40)
    assert image.GetSpacing() == (3.0, 3.0, 4.0)
    assert image.GetDirection() == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    assert image.GetOrigin() == (-94.5, -94.5, -78.0)  # non-zero: the volume's centre is at world (0, 0, 0)
    assert Geometry.of(image) == Geometry.of(label)
    assert image.GetPixelID() == sitk.sitkInt16 and label.GetPixelID() == sitk.sitkUInt8


def test_geometry_non_identity_direction(tmp_path):
    size, spacing = (40, 36, 24), (5.0, 5.5, 7.0)
    spec = make_phantom_dataset(tmp_path, n_cases=2, size=size, spacing=spacing, direction=OBLIQUE)
    for case in spec.cases:
        for m in ("ct", "mr"):
            image, label = read_image(case.images[m]), read_image(case.labels[m])
            assert Geometry.of(image) == Geometry.of(label)  # written identically, read back identically
            assert image.GetSize() == size
            np.testing.assert_allclose(image.GetSpacing(), spacing, rtol=0, atol=1e-6)
            np.testing.assert_allclose(image.GetDirection(), OBLIQUE, rtol=0, atol=1e-6)
            centre = image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in size])
            np.testing.assert_allclose(centre, 0.0, atol=1e-3)
            assert np.abs(image.GetOrigin()).max() > 10
            assert set(np.unique(sitk.GetArrayFromImage(label))) == {0, 1, 2, 3}


def test_ct_and_mr_intensities(tmp_path):
    spec = make_phantom_dataset(tmp_path, n_cases=4, seed=3, **SMALL)
    liver_means, spleen_means = [], []
    for case in spec.cases:
        ct, label = _arrays(spec, case.id, "ct")
        mr, _ = _arrays(spec, case.id, "mr")
        assert ct.dtype == np.int16
        core = {k: ndimage.binary_erosion(label == k) for k in (1, 2, 3)}  # away from blurred borders
        liver, kidney, spleen = (float(ct[core[k]].mean()) for k in (1, 2, 3))
        assert 50 <= liver <= 70, liver
        assert 35 <= spleen <= 55, spleen
        assert kidney > 100, kidney
        assert ct[label == 1].std() > 8  # noisy, not a constant fill
        assert ct[0, :3, :3].mean() < -900  # air in the corner
        liver_means.append(liver)
        spleen_means.append(spleen)
        # MR (T2-like): liver dark, spleen and kidney brighter than liver and different from each other.
        assert mr.min() >= 0 and mr[0, :3, :3].mean() < 100
        mliver, mkidney, mspleen = (float(mr[core[k]].mean()) for k in (1, 2, 3))
        assert mspleen > 1.5 * mliver and mkidney > 1.5 * mliver
        assert mkidney - mspleen > 50 and mr[core[2]].std() > mr[core[3]].std()  # kidney: brighter, textured
    assert np.mean(liver_means) - np.mean(spleen_means) > 8


def test_deterministic_and_seed_dependent(tmp_path):
    kwargs = dict(n_cases=2, **SMALL)
    a = make_phantom_dataset(tmp_path / "a", seed=5, **kwargs)
    b = make_phantom_dataset(tmp_path / "b", seed=5, **kwargs)
    c = make_phantom_dataset(tmp_path / "c", seed=6, **kwargs)
    for case_id in ("case000", "case001"):
        for m in ("ct", "mr"):
            image_a, label_a = _arrays(a, case_id, m)
            image_b, label_b = _arrays(b, case_id, m)
            image_c, label_c = _arrays(c, case_id, m)
            np.testing.assert_array_equal(image_a, image_b)
            np.testing.assert_array_equal(label_a, label_b)
            assert not np.array_equal(image_a, image_c)
            assert not np.array_equal(label_a, label_c)
    # Different cases of one dataset are different patients.
    assert not np.array_equal(_arrays(a, "case000", "ct")[1], _arrays(a, "case001", "ct")[1])
    # A case does not depend on how many cases are made, nor on the other modality.
    one = make_phantom_dataset(tmp_path / "one", seed=5, n_cases=1, modalities=("mr",), **SMALL)
    for got, want in zip(_arrays(one, "case000", "mr"), _arrays(a, "case000", "mr")):
        np.testing.assert_array_equal(got, want)


def test_unpaired_alternates_modalities(tmp_path):
    spec = make_phantom_dataset(tmp_path / "u", n_cases=5, modalities=("mr", "ct"), paired=False, **SMALL)
    assert load_spec(tmp_path / "u").modalities == {"mr": "MR", "ct": "CT"}
    for i, case in enumerate(spec.cases):
        expected = ("mr", "ct")[i % 2]
        assert list(case.images) == [expected] and list(case.labels) == [expected]
        other = "ct" if expected == "mr" else "mr"
        assert not (tmp_path / "u" / case.id / f"{other}.nii.gz").exists()
        image, label = _arrays(spec, case.id, expected)
        assert set(np.unique(label)) == {0, 1, 2, 3}
        assert (image.dtype == np.int16) and ((image.min() < -900) == (expected == "ct"))
    assert [len(spec.cases_with(m)) for m in ("mr", "ct")] == [3, 2]


def test_single_modality_dataset(tmp_path):
    spec = make_phantom_dataset(tmp_path, n_cases=2, modalities=("ct",), **SMALL)
    assert spec.modalities == {"ct": "CT"}
    assert all(list(c.images) == ["ct"] for c in spec.cases)


@pytest.mark.parametrize("kwargs", [
    dict(modalities=("pet",)),
    dict(modalities=()),
    dict(modalities=("ct", "ct")),
    dict(n_cases=0),
    dict(direction=(1, 0, 0, 0, 1, 0)),
    dict(direction=(2, 0, 0, 0, 1, 0, 0, 0, 1)),
    dict(size=(64, 64)),
    dict(spacing=(3.0, 0.0, 4.0)),
])
def test_rejects_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        make_phantom_dataset(tmp_path, **kwargs)
