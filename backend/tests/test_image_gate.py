"""The image gate: every entry point (read_image, `dataset check`, `train`, `predict`, HTTP uploads and /predict)
refuses detached headers, size bombs and truncated data with a clear message, before ITK allocates or follows
anything, and the server goes on answering."""

from __future__ import annotations

import gzip
import io
import itertools
import json
import os
import re
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from crossmodalseg.data.io import ImageError, read_image

from .service_harness import Server

CLI = [sys.executable, "-m", "crossmodalseg.cli"]
SECRET = b"SECRET-TOKEN-0123456789" * 200


def _nifti_header(dims: tuple[int, ...], bitpix: int = 32, datatype: int = 16, magic: bytes = b"n+1\0") -> bytes:
    header = bytearray(352)
    struct.pack_into("<i", header, 0, 348)
    struct.pack_into("<8h", header, 40, len(dims), *dims, *([1] * (7 - len(dims))))
    struct.pack_into("<hh", header, 70, datatype, bitpix)
    struct.pack_into("<8f", header, 76, *([1.0] * 8))
    struct.pack_into("<f", header, 108, 352.0)
    header[344:348] = magic
    return bytes(header)


def bad_inputs(folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, a fragment of the message that must refuse it). Files that point elsewhere point at a secret
    file, a FIFO and a path with '..'."""
    folder.mkdir(parents=True, exist_ok=True)
    secret = folder / "secret.bin"
    secret.write_bytes(SECRET)
    fifo = folder / "pipe"
    if not fifo.exists():
        os.mkfifo(fifo)
    cases: dict[str, tuple[Path, str]] = {}

    def put(name: str, data: bytes, fragment: str) -> None:
        (folder / name).write_bytes(data)
        cases[name] = (folder / name, fragment)

    nrrd = "NRRD0004\ntype: uint8\ndimension: 3\nsizes: 10 10 10\nencoding: raw\n{}\n"
    for i, target in enumerate((str(secret), "pipe", "../" + folder.name + "/secret.bin")):
        put(f"detached{i}.nrrd", nrrd.format(f"data file: {target}\n").encode(), "detached NRRD")
        put(f"detached{i}b.nrrd", nrrd.format(f"datafile: {target}\n").encode(), "detached NRRD")
        put(f"detached{i}.mha", (f"ObjectType = Image\nNDims = 3\nDimSize = 10 10 10\nElementType = MET_UCHAR\n"
                                 f"ElementDataFile = {target}\n").encode(), "ElementDataFile")
    # ITK ends a header line at a lone CR as well: a field hidden behind one must not pass as part of a comment
    put("cr_datafile.nrrd", nrrd.format(f"# note\rdata file: {secret}\n").encode() + bytes(1000),
        "lone carriage return")
    put("cr_byteskip.nrrd", nrrd.format("# note\rbyte skip: -1\n").encode() + bytes(1000), "lone carriage return")
    put("cr_datafile.mha", (f"ObjectType = Image\nNDims = 3\nDimSize = 10 10 10\nElementType = MET_UCHAR\n"
                            f"Comment = x\rElementDataFile = {secret}\rElementDataFile = LOCAL\n").encode()
        + bytes(1000), "lone carriage return")
    # Parsed as ITK parses, whatever ITK might read differently refused (each of these once read the secret file, or
    # a header's fake fields stood in for the real ones):
    put("meta_case.mha", (f"ObjectType = Image\nNDims = 3\nDimSize = 2 2 2\nElementType = MET_UCHAR\n"
                          f"elementdatafile = LOCAL\nComment = ElementDataFile\nElementDataFile = {secret}\n").encode()
        + bytes(8), "is not written 'ElementDataFile'")
    put("meta_comment.mha", (f"ObjectType = Image\nNDims = 3\nDimSize = 2 2 2\nElementType = MET_UCHAR\n"
                             f"Comment = ElementDataFile = LOCAL\nElementDataFile = {secret}\n").encode() + bytes(8),
        "ElementDataFile")
    put("meta_twice.mha", (b"ObjectType = Image\nNDims = 3\nDimSize = 2 2 2\nDimSize = 2 2 2\nElementType = MET_UCHAR\n"
                           b"ElementDataFile = LOCAL\n") + bytes(8), "twice")
    put("nrrd_twice.nrrd", nrrd.format("sizes: 2 2 2\n").encode() + bytes(1000), "twice")
    # a NRRD header that ends, for ITK, at "\n\r\n": fake fields in the gzip stream's comment must not count
    put("nrrd_crlf_end.nrrd", b"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 700 700 700\nencoding: gzip\n\r\n"
        + b"\x1f\x8b\x08\x10\0\0\0\0\x00\x03" + b"x\nsizes: 2 2 2\nencoding: raw\n\n\0", "more than the limit")
    # a NIfTI with MetaImage text after its header: checked as the NIfTI it is, and read as one
    polyglot = _nifti_header((512, 512, 300), 8, 2)[:348] + bytes(4) + (
        b"\nObjectType = Image\nNDims = 3\nDimSize = 2 2 2\nElementType = MET_UCHAR\nElementDataFile = LOCAL\n")
    put("polyglot.nii", polyglot.ljust(900, b" ") + bytes(64), "truncated")
    offset_bomb = bytearray(_nifti_header((8, 8, 8)))
    struct.pack_into("<f", offset_bomb, 108, 3e8)  # vox_offset: 300 MB of nothing to inflate before the voxels
    put("offset_bomb.nii.gz", gzip.compress(bytes(offset_bomb)), "vox_offset")
    # qform and sform both set, 30 mm apart: ITK reads one, writes outputs with sform = qform, and a tool reading
    # the sform would put the segmentation 30 mm off the image
    disagreeing = bytearray(_nifti_header((8, 8, 8)))
    struct.pack_into("<2h", disagreeing, 252, 1, 1)
    struct.pack_into("<12f", disagreeing, 280, 1, 0, 0, 30.0, 0, 1, 0, 0.0, 0, 0, 1, 0.0)
    put("qform_sform.nii", bytes(disagreeing) + bytes(512 * 4), "qform and sform place the image differently")
    turned = bytearray(_nifti_header((8, 8, 8)))  # same origin, the sform's axes turned by 1 degree about z
    struct.pack_into("<2h", turned, 252, 1, 1)
    cos, sin = np.cos(np.radians(1.0)), np.sin(np.radians(1.0))
    struct.pack_into("<12f", turned, 280, cos, -sin, 0, 0.0, sin, cos, 0, 0.0, 0, 0, 1, 0.0)
    put("qform_sform_turned.nii", bytes(turned) + bytes(512 * 4), "axes turned by up to 0.017")
    put("list.mha", b"NDims = 3\nDimSize = 2 2 2\nElementType = MET_UCHAR\nElementDataFile = LIST 2D\n",
        "ElementDataFile")
    put("pair.hdr", _nifti_header((10, 10, 10), 8, 2, magic=b"ni1\0"), ".hdr/.img pair")
    put("analyze.hdr", _nifti_header((10, 10, 10), 8, 2, magic=b"\0\0\0\0"), "Analyze")
    put("huge.nii.gz", gzip.compress(_nifti_header((1024, 1024, 512))), "more than the limit")
    put("claims.nii.gz", gzip.compress(_nifti_header((512, 512, 200))), "truncated")
    put("claims.nii", _nifti_header((512, 512, 200)), "truncated")
    whole = _nifti_header((20, 30, 40)) + np.random.default_rng(0).normal(size=24000).astype(np.float32).tobytes()
    put("half.nii", whole[: len(whole) // 2], "truncated")
    put("half.nii.gz", gzip.compress(whole)[: len(gzip.compress(whole)) // 2], "truncated")
    put("bomb.nii.gz", gzip.compress(_nifti_header((8, 8, 8)) + bytes(2048) + bytes(64 << 20), 1),
        "decompression bomb")
    put("nrrdbomb.nrrd", nrrd.format("").replace("raw", "gzip").encode() + gzip.compress(bytes(32 << 20), 1),
        "decompression bomb")
    put("notimage.png", b"\x89PNG\r\n\x1a\n" + bytes(100), "not a readable image")

    def mha(spacing: str = "1 1 1", origin: str = "0 0 0", direction: str = "1 0 0 0 1 0 0 0 1") -> bytes:
        # a small, well-formed float image otherwise
        return (f"ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
                f"TransformMatrix = {direction}\nOffset = {origin}\nElementSpacing = {spacing}\n"
                f"DimSize = 8 8 8\nElementType = MET_FLOAT\nElementDataFile = LOCAL\n").encode() + bytes(2048)

    # A NaN, infinite or zero pixdim: ITK alone would read it as 1 mm, an invented geometry.
    for label, value in (("nan", float("nan")), ("inf", float("inf")), ("zero", 0.0)):
        header = bytearray(_nifti_header((8, 8, 8)))
        struct.pack_into("<f", header, 80, value)  # pixdim[1]
        put(f"{label}pixdim.nii.gz", gzip.compress(bytes(header) + bytes(8 * 8 * 8 * 4)), "not a size in mm")
    # Complex voxels: read as float, the imaginary part would vanish without a word.
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((8, 8, 8), np.complex64)), str(folder / "complex.nii.gz"))
    cases["complex.nii.gz"] = (folder / "complex.nii.gz", "complex-valued")
    # Broken geometry: resampled to a plan's spacing, a 1e30 mm voxel would ask for ~1e30 voxels.
    put("hugespacing.mha", mha(spacing="1e30 1 1"), "voxel spacing")
    put("farorigin.mha", mha(origin="1e20 0 0"), "not a position in mm")
    put("sheared.mha", mha(direction="1 0 0 0.3 1 0 0 0 1"), "not orthonormal")  # NIfTI would rotate it
    # MetaIO sizes its arrays by NDims whatever DimSize holds: NDims = -1 crashed ITK (segmentation fault) and 100
    # corrupted its heap, through an upload too; too few numbers, or one field under two names, made up a geometry.
    for label, ndims in (("negative", "-1"), ("hundred", "100"), ("missing", "")):
        put(f"ndims_{label}.mha", mha().replace(b"NDims = 3", f"NDims = {ndims}".encode()), "NDims")
    put("short_offset.mha", mha(origin="1"), "Offset needs 3 numbers")
    put("two_origins.mha", mha().replace(b"Offset", b"Position = 0 0 0\nOffset"), "one field under two names")
    # A NaN or infinite vox_offset: the gate's own arithmetic failed (a 500 from the server), where it must refuse.
    for label, value in (("nan", float("nan")), ("inf", float("inf"))):
        header = bytearray(_nifti_header((8, 8, 8)))
        struct.pack_into("<f", header, 108, value)
        put(f"{label}offset.nii.gz", gzip.compress(bytes(header) + bytes(8 * 8 * 8 * 4)), "vox_offset")
    # NRRD: ITK reads a NaN spacing, or an axis without a direction, as 1 mm without a word
    put("nan_spacings.nrrd", nrrd.format("spacings: 1 nan 1\n").encode() + bytes(1000), "not sizes in mm")
    put("none_direction.nrrd", nrrd.format("space: left-posterior-superior\nspace directions: none (0,1,0) "
                                           "(0,0,1)\n").encode() + bytes(1000), "no direction")
    cases["fifo"] = (fifo, "not a regular file")
    return cases


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    return bad_inputs(tmp_path_factory.mktemp("bad") / "files")


def test_read_image_refuses_each_bad_input_fast(corpus):
    for name, (path, fragment) in corpus.items():
        started = time.perf_counter()
        with pytest.raises(ImageError) as refused:
            read_image(path)
        assert fragment in str(refused.value), (name, str(refused.value))
        assert SECRET[:10].decode() not in str(refused.value)
        assert time.perf_counter() - started < 5, name  # a FIFO never blocks; a bomb is not inflated


def test_good_images_of_every_format_still_read(tmp_path: Path):
    image = sitk.GetImageFromArray(np.random.default_rng(1).normal(size=(6, 7, 8)).astype(np.float32))
    image.SetSpacing((0.5, 0.7, 2.0))
    for name, compress in (("a.nii", False), ("a.nii.gz", True), ("a.nrrd", False), ("b.nrrd", True),
                           ("a.mha", False), ("b.mha", True)):
        sitk.WriteImage(image, str(tmp_path / name), compress)
        read = read_image(tmp_path / name)
        assert np.array_equal(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(image)), name
        assert read.GetSpacing() == pytest.approx(image.GetSpacing())


def test_nifti_files_that_itk_writes_read_in_every_orientation(tmp_path: Path):
    """Coronal and sagittal acquisitions (axes permuted) and oblique ones are written with qform and sform both set,
    the qform as a float32 quaternion that turns each axis slightly (up to 2.6e-4). The qform/sform check compared
    the axes in mm against a bound in mm, so the 5 mm slice axis of a coronal MR with 0.8 mm pixels failed it and
    ITK's own files were refused (found by a predictor fuzz run: 4 of 300 geometries). Every orientation must read,
    with the direction ITK wrote."""
    signed_permutations = [np.eye(3)[list(order)] * np.array(signs) for order in itertools.permutations(range(3))
                           for signs in itertools.product((1, -1), repeat=3)]
    rng = np.random.default_rng(7)
    oblique = [np.linalg.qr(rng.normal(size=(3, 3)))[0] for _ in range(50)]  # either handedness
    refused = []
    for i, rotation in enumerate(signed_permutations + oblique):
        for spacing in ((0.8, 0.8, 5.0), (1.0, 5.0, 12.0)):
            image = sitk.Image(2, 3, 4, sitk.sitkUInt8)
            image.SetSpacing(spacing)
            image.SetDirection(rotation.ravel().tolist())
            sitk.WriteImage(image, str(tmp_path / "oriented.nii.gz"))
            try:
                read = read_image(tmp_path / "oriented.nii.gz")
            except ImageError as e:
                refused.append((rotation.round(3).tolist(), spacing, str(e)))
                continue
            assert np.allclose(read.GetDirection(), image.GetDirection(), atol=1e-3)
    assert not refused, (len(refused), refused[:2])


def test_a_gzip_file_of_several_members_reads_as_itk_reads_it(tmp_path: Path):
    """Concatenated gzip members (cat a.gz b.gz, parallel gzip tools) are one valid stream for ITK; the gate said
    'truncated: the file holds 0 bytes'."""
    image = sitk.GetImageFromArray(np.random.default_rng(2).normal(size=(6, 7, 8)).astype(np.float32))
    sitk.WriteImage(image, str(tmp_path / "one.nii"))
    raw = (tmp_path / "one.nii").read_bytes()
    (tmp_path / "two.nii.gz").write_bytes(gzip.compress(raw[:700]) + gzip.compress(raw[700:]))
    assert np.array_equal(sitk.GetArrayFromImage(read_image(tmp_path / "two.nii.gz")), sitk.GetArrayFromImage(image))
    (tmp_path / "short.nii.gz").write_bytes(gzip.compress(raw[:700]) + gzip.compress(raw[700:900]))
    with pytest.raises(ImageError, match="truncated"):
        read_image(tmp_path / "short.nii.gz")


def test_an_image_is_read_by_the_reader_of_its_checked_format_and_named_for_it(tmp_path: Path):
    """ITK picks a reader by file name: a Stimulate .spr header that names another file, or an image named for one
    format holding another, went past the checks of the format the content showed. The name must say the format the
    content is, and ITK reads it with that format's reader."""
    secret = tmp_path / "secret.bin"
    secret.write_bytes(SECRET)
    spr = tmp_path / "poly.spr"  # Stimulate fields for ITK, MetaImage ones for a content sniffer
    spr.write_bytes(f"numDim: 3\ndim: 4 2 1\ndataType: BYTE\nstimFileName: {secret}\nObjectType = Image\nNDims = 3\n"
                    f"DimSize = 2 2 2\nElementType = MET_UCHAR\nElementDataFile = LOCAL\n".encode() + bytes(8))
    image = sitk.GetImageFromArray(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))
    sitk.WriteImage(image, str(tmp_path / "good.mha"))
    (tmp_path / "good.mhd").write_bytes((tmp_path / "good.mha").read_bytes())
    sitk.WriteImage(image, str(tmp_path / "good.nrrd"))
    (tmp_path / "nrrd.nii").write_bytes((tmp_path / "good.nrrd").read_bytes())
    for path, fragment in ((spr, "MetaImage header line without '='"), (tmp_path / "good.mhd", "must end in .nii"),
                           (tmp_path / "nrrd.nii", "holds a NRRD image but its name ends in .nii")):
        with pytest.raises(ImageError, match=re.escape(fragment)) as refused:
            read_image(path)
        assert SECRET[:10].decode() not in str(refused.value)
    assert np.array_equal(sitk.GetArrayFromImage(read_image(tmp_path / "good.mha")), sitk.GetArrayFromImage(image))
    (tmp_path / "upper.NRRD").write_bytes((tmp_path / "good.nrrd").read_bytes())  # the letter case is not the format
    assert read_image(tmp_path / "upper.NRRD").GetSize() == (4, 3, 2)


def test_dataset_check_and_cli_refuse_them(corpus, tmp_path: Path):
    label = tmp_path / "label.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((10, 10, 10), np.uint8)), str(label))
    cases = [{"id": f"c{i}", "images": {"ct": str(path)}, "labels": {"ct": str(label)}}
             for i, (path, _) in enumerate(corpus.values())]
    (tmp_path / "dataset.json").write_text(json.dumps({"name": "bad", "labels": {"background": 0, "x": 1},
                                                       "modalities": {"ct": "CT"}, "cases": cases}))
    run = subprocess.run([*CLI, "dataset", "check", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    for name, (_, fragment) in corpus.items():
        assert fragment in run.stdout, (name, run.stdout)
    assert SECRET[:10].decode() not in run.stdout
    train = subprocess.run([*CLI, "train", str(tmp_path), "--target", "ct", "--out", str(tmp_path / "m"),
                            "--epochs", "1", "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert train.returncode == 2 and "Traceback" not in train.stderr and "detached" in train.stderr


def _model_archive(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for p in [*folder.glob("*.safetensors"), folder / "model.json"]:
            z.write(p, p.name)
    return buffer.getvalue()


def test_http_uploads_and_predict_refuse_them_and_the_server_goes_on(corpus, trained_single: Path, tmp_path: Path):
    server = Server(tmp_path / "home").start()
    try:
        server.create_dataset("d", {"ct": "CT"})
        imported = server.client.post("/models", content=_model_archive(trained_single))
        assert imported.status_code == 201, imported.text
        model_id = imported.json()["id"]
        for name, (path, fragment) in corpus.items():
            if name == "fifo":
                continue  # a client cannot upload a FIFO; its header-borne twins are in the corpus
            r = server.client.put("/datasets/d/cases/c/images/ct", content=path.read_bytes())
            assert 400 <= r.status_code < 500, (name, r.status_code, r.text)
            detail = r.json()["detail"]
            assert SECRET[:10].decode() not in detail and str(tmp_path) not in detail, (name, detail)
            r = server.client.post("/predict", data={"model": model_id}, files={"ct": ("x", path.read_bytes())})
            assert 400 <= r.status_code < 500, (name, r.status_code, r.text)
            assert SECRET[:10].decode() not in r.text and str(tmp_path) not in r.text, (name, r.text)
        assert server.client.get("/health").status_code == 200
        assert server.client.get("/datasets/d").json()["cases"] == []  # nothing was stored
    finally:
        server.stop()
