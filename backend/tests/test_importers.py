"""Importers: nnU-Net v2 raw and MSD folders become datasets that pass the check, voxel- and geometry-exact."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from crossmodalseg.data.check import check_dataset
from crossmodalseg.data.importers import import_msd, import_nnunet
from crossmodalseg.data.spec import DatasetError, load_spec

SIZE_ZYX = (8, 16, 16)
SPACING = (1.5, 1.5, 3.0)
ORIGIN = (10.0, -20.0, 5.0)
DIRECTION = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)


def make_image(array: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    image.SetDirection(DIRECTION)
    return image


def intensity(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 100, SIZE_ZYX).astype(np.float32)


def segmentation(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 3, SIZE_ZYX).astype(np.uint8)


def write(path: Path, image: sitk.Image) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def assert_same(imported: Path, source: sitk.Image | Path) -> None:
    """Voxels, pixel type and geometry exactly equal."""
    a = sitk.ReadImage(str(imported))
    b = sitk.ReadImage(str(source)) if isinstance(source, Path) else source
    assert a.GetDimension() == 3 and a.GetPixelID() == b.GetPixelID()
    assert a.GetSize() == b.GetSize() and a.GetSpacing() == b.GetSpacing() and a.GetOrigin() == b.GetOrigin()
    assert np.array_equal(np.asarray(a.GetDirection()), np.asarray(b.GetDirection()))  # -0.0 == 0.0
    assert np.array_equal(sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b))


# ---- nnU-Net v2 ----------------------------------------------------------------------------------------------------
def nnunet_source(root: Path, channels=None, train=("prostate_00", "prostate_01"), test=("prostate_00", "extra")):
    channels = channels or {"0": "T2", "1": "ADC"}
    meta = {"channel_names": channels, "labels": {"background": 0, "PZ": 1, "TZ": 2}, "numTraining": len(train),
            "file_ending": ".nii.gz", "name": "Dataset005_Prostate"}
    for i, cid in enumerate(train):
        for c in channels:
            write(root / "imagesTr" / f"{cid}_{int(c):04d}.nii.gz", make_image(intensity(10 * i + int(c))))
        write(root / "labelsTr" / f"{cid}.nii.gz", make_image(segmentation(i)))
    for i, cid in enumerate(test):
        for c in channels:
            write(root / "imagesTs" / f"{cid}_{int(c):04d}.nii.gz", make_image(intensity(100 + 10 * i + int(c))))
    (root / "dataset.json").write_text(json.dumps(meta))
    return meta


def test_nnunet_two_channels(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    nnunet_source(src)
    spec = import_nnunet(src, dst)
    assert spec.name == "Dataset005_Prostate"
    assert spec.labels == {"background": 0, "PZ": 1, "TZ": 2}
    assert spec.modalities == {"t2": "MR", "adc": "MR"}
    assert [c.id for c in spec.cases] == ["prostate_00", "prostate_01", "extra", "ts_prostate_00"]
    checked, problems = check_dataset(dst)
    assert problems == [] and checked.to_json() == spec.to_json()
    for case in spec.cases[:2]:
        assert case.labels["t2"] == case.labels["adc"]  # one co-registered label under each channel
        assert_same(case.labels["t2"], src / "labelsTr" / f"{case.id}.nii.gz")
        for channel, modality in (("0000", "t2"), ("0001", "adc")):
            assert_same(case.images[modality], src / "imagesTr" / f"{case.id}_{channel}.nii.gz")
            assert not case.images[modality].is_symlink()
    test_case = spec.case("ts_prostate_00")
    assert not test_case.labelled
    assert_same(test_case.images["adc"], src / "imagesTs" / "prostate_00_0001.nii.gz")
    assert load_spec(dst).to_json() == spec.to_json()


def test_nnunet_ct_and_modality_type_override(tmp_path):
    nnunet_source(tmp_path / "a", channels={"0": "CT"}, test=())
    assert import_nnunet(tmp_path / "a", tmp_path / "a_out").modalities == {"ct": "CT"}
    nnunet_source(tmp_path / "b", channels={"0": "T2", "1": "noNorm"}, test=())
    spec = import_nnunet(tmp_path / "b", tmp_path / "b_out", modality_types={"noNorm": "CT"})
    assert spec.modalities == {"t2": "MR", "nonorm": "CT"}
    assert check_dataset(tmp_path / "b_out")[1] == []


def test_nnunet_refuses_to_overwrite_unless_asked(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    nnunet_source(src)
    import_nnunet(src, dst)
    with pytest.raises(DatasetError, match="already holds a dataset.json.*overwrite=True"):
        import_nnunet(src, dst)
    assert len(import_nnunet(src, dst, overwrite=True).cases) == 4


def malformed(root: Path, fault: str) -> None:
    meta = nnunet_source(root)
    if fault == "no dataset.json":
        (root / "dataset.json").unlink()
    elif fault == "bad json":
        (root / "dataset.json").write_text("{")
    elif fault == "regions":
        meta["labels"] = {"background": 0, "whole": [1, 2], "core": 2}
    elif fault == "v1 labels":
        meta["labels"] = {"0": "background", "1": "PZ"}
    elif fault == "no channel_names":
        meta["modality"] = meta.pop("channel_names")
    elif fault == "file ending":
        meta["file_ending"] = ".png"
    elif fault == "missing channel":
        (root / "imagesTr" / "prostate_01_0001.nii.gz").unlink()
    elif fault == "missing label":
        (root / "labelsTr" / "prostate_00.nii.gz").unlink()
    elif fault == "numTraining":
        meta["numTraining"] = 5
    elif fault == "unknown channel":
        write(root / "imagesTr" / "prostate_00_0002.nii.gz", make_image(intensity(0)))
    elif fault == "detached label":  # copied as is once: every file now passes the image gate first
        (root / "labelsTr" / "prostate_00.nii.gz").write_bytes(
            b"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 2 2 2\nencoding: raw\ndata file: /etc/hostname\n\n")
    if fault not in ("no dataset.json", "bad json"):
        (root / "dataset.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("fault, message", [
    ("no dataset.json", "no dataset.json in .*nnU-Net"),
    ("bad json", "not valid JSON"),
    ("regions", "region-based labels are not supported"),
    ("v1 labels", "use import_msd"),
    ("no channel_names", "missing 'channel_names'.*use import_msd"),
    ("file ending", "'file_ending' is '.png'"),
    ("missing channel", "missing image .*imagesTr/prostate_01_0001.nii.gz"),
    ("missing label", "missing label .*labelsTr/prostate_00.nii.gz"),
    ("numTraining", "'numTraining' is 5 but imagesTr holds 2"),
    ("unknown channel", "prostate_00_0002.nii.gz: channel 2 is not in 'channel_names'"),
    ("detached label", "prostate_00.nii.gz: holds a NRRD image but its name ends in .nii.gz"),
])
def test_nnunet_malformed_sources(tmp_path, fault, message):
    malformed(tmp_path / "src", fault)
    with pytest.raises(DatasetError, match=message):
        import_nnunet(tmp_path / "src", tmp_path / "dst")
    assert not (tmp_path / "dst" / "dataset.json").exists()


def test_nnunet_lists_every_missing_file_before_writing(tmp_path):
    src = tmp_path / "src"
    nnunet_source(src)
    (src / "imagesTr" / "prostate_01_0001.nii.gz").unlink()
    (src / "labelsTr" / "prostate_00.nii.gz").unlink()
    with pytest.raises(DatasetError) as e:
        import_nnunet(src, tmp_path / "dst")
    assert "prostate_01_0001" in str(e.value) and "labelsTr/prostate_00" in str(e.value)
    assert not (tmp_path / "dst").exists()


def test_modality_type_override_must_name_a_channel_and_a_type(tmp_path):
    nnunet_source(tmp_path / "src")
    with pytest.raises(DatasetError, match="'PET'.*not channels.*'T2', 'ADC'"):
        import_nnunet(tmp_path / "src", tmp_path / "dst", modality_types={"PET": "MR"})
    with pytest.raises(DatasetError, match="type 'US'; use one of CT, MR"):
        import_nnunet(tmp_path / "src", tmp_path / "dst", modality_types={"adc": "US"})


# ---- MSD -----------------------------------------------------------------------------------------------------------
def msd_source(root: Path, modality: dict[str, str], train=("case_001", "case_002"), test=("case_001", "case_003")):
    """MSD task: multi-modal images are 4D (x, y, z, channel) files. Returns the 3D sources per case and channel."""
    sources: dict[str, list[sitk.Image]] = {}
    for i, cid in enumerate(list(train) + list(test)):
        folder = "imagesTr" if i < len(train) else "imagesTs"
        channels = [make_image(intensity(10 * i + c)) for c in range(len(modality))]
        image = sitk.JoinSeries(channels) if len(channels) > 1 else channels[0]
        write(root / folder / f"{cid}.nii.gz", image)
        sources[f"{folder}/{cid}"] = channels
    for i, cid in enumerate(train):
        write(root / "labelsTr" / f"{cid}.nii.gz", make_image(segmentation(i)))
    meta = {"name": "BrainTumour", "modality": modality,
            "labels": {"0": "background", "1": "edema", "2": "tumour"}, "numTraining": len(train),
            "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in train],
            "test": [f"./imagesTs/{c}.nii.gz" for c in test]}
    (root / "dataset.json").write_text(json.dumps(meta))
    return sources


def test_msd_multimodal_4d_is_split_per_modality(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    sources = msd_source(src, {"0": "FLAIR", "1": "T1w", "2": "t1gd"})
    four_d = sitk.ReadImage(str(src / "imagesTr" / "case_001.nii.gz"))
    assert four_d.GetDimension() == 4  # the fixture really is MSD-like
    spec = import_msd(src, dst)
    assert spec.modalities == {"flair": "MR", "t1w": "MR", "t1gd": "MR"}
    assert spec.labels == {"background": 0, "edema": 1, "tumour": 2}
    assert [c.id for c in spec.cases] == ["case_001", "case_002", "ts_case_001", "case_003"]
    assert check_dataset(dst)[1] == []
    for case in spec.cases:
        key = ("imagesTs/" if case.id in ("ts_case_001", "case_003") else "imagesTr/") + case.id.removeprefix("ts_")
        for c, modality in enumerate(spec.modalities):
            assert case.images[modality] == dst / case.id / f"{modality}.nii.gz"
            assert_same(case.images[modality], sources[key][c])  # voxels and 3D geometry of each channel
    assert_same(spec.case("case_002").labels["t1w"], src / "labelsTr" / "case_002.nii.gz")
    assert not spec.case("case_003").labelled


def test_msd_single_modality_is_copied(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    msd_source(src, {"0": "CT"})
    spec = import_msd(src, dst)
    assert spec.modalities == {"ct": "CT"}
    assert check_dataset(dst)[1] == []
    case = spec.case("case_002")
    image = case.images["ct"]
    assert image == dst / "case_002" / "ct.nii.gz" and not image.is_symlink()
    assert image.read_bytes() == (src / "imagesTr" / "case_002.nii.gz").read_bytes()
    assert_same(image, src / "imagesTr" / "case_002.nii.gz")
    assert_same(case.labels["ct"], src / "labelsTr" / "case_002.nii.gz")


def msd_fault(root: Path, fault: str) -> None:
    msd_source(root, {"0": "FLAIR", "1": "T1w"})
    meta = json.loads((root / "dataset.json").read_text())
    if fault == "no modality":
        meta["channel_names"] = meta.pop("modality")
    elif fault == "labels":
        meta["labels"] = {"background": 0, "edema": 1}
    elif fault == "entry":
        meta["training"][1] = {"image": "./imagesTr/case_002.nii.gz"}
    elif fault == "missing file":
        (root / "labelsTr" / "case_002.nii.gz").unlink()
    elif fault == "channels":
        meta["modality"] = {"0": "FLAIR", "1": "T1w", "2": "T2"}
    elif fault == "3d for several":
        write(root / "imagesTr" / "case_002.nii.gz", make_image(intensity(0)))
    elif fault == "corrupt":
        (root / "imagesTr" / "case_002.nii.gz").write_bytes(b"not an image")
    elif fault == "outside":  # paths in dataset.json once made the import copy any file the user could read
        meta["training"][1]["label"] = "../../../../../../etc/hostname"
    elif fault == "absolute":
        meta["training"][1]["image"] = str(root / "imagesTr" / "case_002.nii.gz")
    elif fault == "detached label":
        (root / "labelsTr" / "case_002.nrrd").write_bytes(
            b"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 2 2 2\nencoding: raw\ndata file: /etc/hostname\n\n")
        meta["training"][1]["label"] = "./labelsTr/case_002.nrrd"
    elif fault == "detached 4d":
        (root / "imagesTr" / "case_002.nii.gz").write_bytes(
            b"NRRD0004\ntype: uint8\ndimension: 4\nsizes: 2 2 2 2\nencoding: raw\ndata file: /etc/hostname\n\n")
    (root / "dataset.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("fault, message", [
    ("no modality", "missing 'modality'.*use import_nnunet"),
    ("labels", "not value -> name"),
    ("entry", "'training' entry #1 needs 'image' and 'label'"),
    ("missing file", "missing file .*labelsTr/case_002.nii.gz"),
    ("channels", "case_001.nii.gz: 'modality' names 3 modalities but the image has 2 channel"),
    ("3d for several", "case_002.nii.gz: 'modality' names 2 modalities but the image has 1 channel"),
    ("corrupt", "case_002.nii.gz: not a readable image"),
    ("outside", "'../../../../../../etc/hostname' points outside"),
    ("absolute", "case_002.nii.gz' points outside"),
    ("detached label", "case_002.nrrd: a detached NRRD header"),
    ("detached 4d", "case_002.nii.gz: holds a NRRD image"),
])
def test_msd_malformed_sources(tmp_path, fault, message):
    msd_fault(tmp_path / "src", fault)
    with pytest.raises(DatasetError, match=message):
        import_msd(tmp_path / "src", tmp_path / "dst")
    assert not (tmp_path / "dst" / "dataset.json").exists()


def test_msd_single_modality_rejects_a_4d_image(tmp_path):
    src = tmp_path / "src"
    msd_source(src, {"0": "CT"})
    write(src / "imagesTr" / "case_001.nii.gz", sitk.JoinSeries([make_image(intensity(0))] * 2))
    with pytest.raises(DatasetError, match="names 1 modality but the image has 2 channel"):
        import_msd(src, tmp_path / "dst")


def test_msd_single_modality_4d_with_one_channel_is_split_to_3d(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    msd_source(src, {"0": "CT"}, test=())
    source = make_image(intensity(7))
    write(src / "imagesTr" / "case_001.nii.gz", sitk.JoinSeries([source]))
    spec = import_msd(src, dst)
    assert_same(spec.case("case_001").images["ct"], source)
    assert check_dataset(dst)[1] == []
