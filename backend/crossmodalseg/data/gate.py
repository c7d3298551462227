"""The one gate every image passes before ITK reads it (CLI, dataset check, trainer, predictor, HTTP uploads).

ITK trusts headers: a NRRD `data file:` or a MetaImage `ElementDataFile` sends it to any path (system files, a FIFO
that blocks forever, the service's own database), a header may claim gigabytes of voxels that are not there (ITK
allocates them, and fills the missing part with zeros), and a small gzip stream may inflate to gigabytes. So the
gate reads the header itself, parsing it as ITK does, and refuses before anything is allocated:
- anything but a regular file; formats other than NIfTI-1/2 (.nii, .nii.gz), NRRD and MetaImage with the data in the
  same file (detached headers: NRRD data files, MetaImage ElementDataFile other than LOCAL, NIfTI/Analyze .hdr/.img
  pairs); a file whose name does not end in its format's extension (ITK would pick another reader by the name);
- header text ITK might read otherwise than the gate: lone CR line ends, fields given twice, MetaImage keys in
  another letter case;
- a voxel count above `Limits.max_voxels`;
- fewer data bytes than the header implies (truncated files), after decompression;
- compressed data that inflates past what the header implies (plus a small margin): inflation stops there.
A gzip-compressed NIfTI is inflated once, by the gate, into a temporary .nii that ITK then reads (ITK does not
decompress it a second time). `gated` names the ITK reader to use: the one whose header the gate checked.
"""

from __future__ import annotations

import bz2
import math
import os
import re
import stat
import struct
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

CHUNK = 1 << 20
INFLATE_MARGIN = 1 << 16  # bytes a compressed stream may hold past the voxels (NIfTI extensions, padding)
DEFAULT_MAX_VOXELS = 1 << 28  # 268 M voxels: a 512 x 512 x 1024 CT


class ImageError(UserError):
    """An image file that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class Limits:
    max_voxels: int = DEFAULT_MAX_VOXELS


@dataclass(frozen=True)
class Header:
    format: str  # "nifti", "nrrd", "metaimage"
    voxels: int
    data_bytes: int  # bytes of voxel data the header implies


_NRRD_TYPES = {
    **dict.fromkeys(("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t"), 1),
    **dict.fromkeys(("short", "short int", "signed short", "signed short int", "int16", "int16_t", "ushort",
                     "unsigned short", "unsigned short int", "uint16", "uint16_t"), 2),
    **dict.fromkeys(("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32", "uint32_t",
                     "float"), 4),
    **dict.fromkeys(("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64",
                     "int64_t", "ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t",
                     "double"), 8),
}
_META_TYPES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
               "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4,
               "MET_DOUBLE": 8}
ACCEPTED = "NIfTI (.nii, .nii.gz), NRRD (.nrrd, data in the same file) or MetaImage (.mha)"


def regular_file(path: Path) -> int:
    """The file's size; refuses what is not a regular file (a FIFO or device would block or never end)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ImageError(f"{path}: file not found") from None
    except OSError as e:
        raise ImageError(f"{path}: cannot be read ({e.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise ImageError(f"{path}: not a regular file (a pipe, device or folder); give an image file")
    return info.st_size


def _count(name: str, voxels: int, bytes_per_voxel: int, limits: Limits, fmt: str) -> Header:
    if voxels > limits.max_voxels:
        raise ImageError(f"{name}: the header claims {voxels:,} voxels, more than the limit of "
                         f"{limits.max_voxels:,}; crop or downsample the image")
    return Header(fmt, voxels, voxels * bytes_per_voxel)


def _dims(values: list[int], name: str) -> int:
    if not values or any(v < 1 for v in values):
        raise ImageError(f"{name}: the header gives invalid dimensions {values}")
    n = 1
    for v in values:
        n *= v
    return n


# ---- NIfTI ------------------------------------------------------------------------------------------------------
def nifti_header(head: bytes, name: str, limits: Limits) -> tuple[Header, int]:
    """(header, offset of the voxel data) of a NIfTI-1 or NIfTI-2 single file; refuses .hdr/.img pairs and
    Analyze headers (their voxels live in another file)."""
    if len(head) < 348:
        raise ImageError(f"{name}: truncated NIfTI header")
    for order in "<>":
        size = struct.unpack(order + "i", head[:4])[0]
        if size == 348:
            magic = head[344:348]
            if magic == b"ni1\0":
                raise ImageError(f"{name}: a NIfTI header whose voxels are in a separate .img file (a .hdr/.img "
                                 f"pair); save the image as one .nii or .nii.gz file")
            if magic != b"n+1\0":
                raise ImageError(f"{name}: an Analyze 7.5 header (voxels in a separate .img file); save the image as "
                                 f"one .nii or .nii.gz file")
            dim = struct.unpack(order + "8h", head[40:56])
            pixdim = struct.unpack(order + "8f", head[76:108])
            bitpix = struct.unpack(order + "h", head[72:74])[0]
            vox_offset = struct.unpack(order + "f", head[108:112])[0]
            if not math.isfinite(vox_offset):
                raise ImageError(f"{name}: the NIfTI header's vox_offset is {vox_offset}, not a position in the file; "
                                 f"the header is broken: save the image again")
            offset = int(vox_offset)
            break
        if size == 540:
            if len(head) < 540:
                raise ImageError(f"{name}: truncated NIfTI-2 header")
            magic = head[4:12]
            if magic[:4] == b"ni2\0":
                raise ImageError(f"{name}: a NIfTI-2 header whose voxels are in a separate file; save one .nii file")
            if magic[:4] != b"n+2\0":
                raise ImageError(f"{name}: not a valid NIfTI-2 header")
            bitpix = struct.unpack(order + "h", head[14:16])[0]
            dim = struct.unpack(order + "8q", head[16:80])
            pixdim = struct.unpack(order + "8d", head[104:168])
            offset = struct.unpack(order + "q", head[168:176])[0]
            break
    else:
        raise ImageError(f"{name}: not a readable image (not a NIfTI file)")
    ndim = dim[0]
    if not 1 <= ndim <= 7 or bitpix <= 0 or bitpix % 8 or offset < 348:
        raise ImageError(f"{name}: the NIfTI header is invalid (dim {list(dim)}, bitpix {bitpix})")
    if offset > MAX_NIFTI_OFFSET:
        raise ImageError(f"{name}: the NIfTI header puts the voxels {offset:,} bytes into the file (vox_offset), past "
                         f"{MAX_NIFTI_OFFSET:,}; save the image again")
    # ITK reads a NaN, infinite or zero pixdim as 1 mm without a word: the image would load with a made-up geometry.
    # (An axis of one voxel may carry 0, as some writers give a single slice.)
    spacing = [float(pixdim[i]) for i in range(1, min(ndim, 3) + 1)]
    if any(not math.isfinite(v) or (v == 0 and dim[i + 1] > 1) for i, v in enumerate(spacing)):
        raise ImageError(f"{name}: voxel spacing (pixdim) {spacing} is not a size in mm; the header is broken: fix "
                         f"the spacing and save the image again")
    _check_qform_sform(head, order, size, [float(v) for v in pixdim[:4]], name)
    return _count(name, _dims(list(dim[1:ndim + 1]), name), bitpix // 8, limits, "nifti"), offset


QFORM_SFORM_TURN = 1e-3  # largest difference of a qform and an sform axis direction (about 0.06 degrees)


def _check_qform_sform(head: bytes, order: str, size: int, pixdim: list[float], name: str) -> None:
    """Refuses a NIfTI whose qform and sform (both set) place the voxels differently: ITK reads one of them and
    writes its outputs with sform = qform, so in tools that read the sform (nibabel, FSL) a segmentation would lie
    elsewhere than the image it was made from."""
    if size == 348:
        qcode, scode = struct.unpack(order + "2h", head[252:256])
        b, c, d, *offset = struct.unpack(order + "6f", head[256:280])
        rows = struct.unpack(order + "12f", head[280:328])
    else:
        qcode, scode = struct.unpack(order + "2i", head[344:352])
        b, c, d, *offset = struct.unpack(order + "6d", head[352:400])
        rows = struct.unpack(order + "12d", head[400:496])
    if qcode <= 0 or scode <= 0:
        return
    a = math.sqrt(max(0.0, 1.0 - (b * b + c * c + d * d)))
    rotation = [[a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
                [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
                [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b]]
    qfac = -1.0 if pixdim[0] < 0 else 1.0
    scale = [abs(pixdim[1]), abs(pixdim[2]), qfac * abs(pixdim[3])]
    qform = [[rotation[i][j] * scale[j] for j in range(3)] + [offset[i]] for i in range(3)]
    sform = [list(rows[4 * i:4 * i + 4]) for i in range(3)]
    if not all(math.isfinite(v) for row in qform + sform for v in row):
        raise ImageError(f"{name}: the NIfTI qform or sform holds NaN or infinite values; the header is broken")
    voxel = min((abs(v) for v in pixdim[1:4] if v), default=1.0)
    apart = max(abs(qform[i][3] - sform[i][3]) for i in range(3))
    # Axes compared as directions (each column over its voxel size): the qform's float32 quaternion turns an oblique
    # axis by up to 2.6e-4 against the sform in files ITK writes itself (4000 random orientations), which compared
    # in mm along a 12 mm axis exceeded the old 1e-3 mm bound and refused them.
    turned = max(abs(qform[i][j] - sform[i][j]) / max(abs(scale[j]), 1e-6) for i in range(3) for j in range(3))
    if apart > 0.1 * voxel or turned > QFORM_SFORM_TURN:
        raise ImageError(f"{name}: the NIfTI header's qform and sform place the image differently ({apart:.3g} mm "
                         f"apart, axes turned by up to {turned:.2g}); tools disagree on where such an image lies: make "
                         f"them equal (e.g. copy one to the other) and save it again")


# ---- NRRD and MetaImage (text headers) ---------------------------------------------------------------------------
# Both are parsed as ITK parses them, and whatever ITK might read differently is refused: lines end with LF or CR LF
# (ITK also ends one at a lone CR, so "# note\rdata file: /etc/passwd" would hide a field in a comment), a NRRD
# header ends at its first empty line (whatever the line ends), MetaImage keys are matched in their exact letter case
# (MetaIO compares with strcmp, so "elementdatafile = LOCAL" is no field for ITK) and its header ends at the line
# whose key is ElementDataFile (not at those letters anywhere, e.g. in a Comment), and no field may appear twice.
_META_KEYS = ("ObjectType", "ObjectSubType", "NDims", "DimSize", "ElementType", "ElementDataFile", "HeaderSize",
              "CompressedData", "CompressedDataSize", "ElementNumberOfChannels", "BinaryData", "BinaryDataByteOrderMSB",
              "ElementByteOrderMSB", "TransformMatrix", "Orientation", "Rotation", "Offset", "Position", "Origin",
              "CenterOfRotation", "AnatomicalOrientation", "ElementSpacing", "ElementSize", "ElementMin", "ElementMax",
              "Comment", "Name", "ID", "ParentID", "Color", "DistanceUnits", "Modality", "SequenceID",
              "ElementToIntensityFunctionSlope", "ElementToIntensityFunctionOffset", "AcquisitionDate", "TransformType")
_META_KEY_CASE = {k.lower(): k for k in _META_KEYS}


def _header_lines(data: bytes, name: str, ends_at) -> tuple[list[str], int]:
    """The header's lines up to and including the one `ends_at(line)` accepts, and the offset of the data after it."""
    lines, position = [], 0
    for newline in re.finditer(rb"\r\n|\n", data):
        line = data[position:newline.start()]
        position = newline.end()
        if b"\r" in line:
            raise ImageError(f"{name}: its header has a line that ends with a lone carriage return; save the image "
                             f"again (lines end with LF or CR LF)")
        text = line.decode("latin-1")
        lines.append(text)
        if ends_at(text):
            return lines, position
    raise ImageError(f"{name}: a header without its end (a detached header, a truncated file, or a header over "
                     f"{CHUNK // 2**20} MiB); save the image as one file")


def _once(fields: dict[str, str], key: str, value: str, name: str) -> None:
    if key in fields:
        raise ImageError(f"{name}: the header gives {key!r} twice; save the image again")
    fields[key] = value


def nrrd_header(head: bytes, name: str, limits: Limits) -> tuple[Header, int, str]:
    """(header, data offset, encoding) of an attached NRRD; refuses `data file` fields."""
    lines, offset = _header_lines(head, name, lambda line: line == "")
    fields: dict[str, str] = {}
    for line in lines[1:-1]:
        if line.startswith("#") or ":" not in line:
            continue
        if ":=" in line and (": " not in line or line.index(":=") < line.index(": ")):
            continue  # a key/value pair, not a field
        key, value = line.split(":", 1)
        _once(fields, key.strip().lower(), value.strip(), name)
    if {"data file", "datafile"} & set(fields):
        raise ImageError(f"{name}: a detached NRRD header (its voxels are in another file named by 'data file'); "
                         f"save the image as one .nrrd file with the data inside")
    if fields.get("line skip", "0") not in ("0", "") or fields.get("byte skip", "0") not in ("0", ""):
        raise ImageError(f"{name}: NRRD 'line skip'/'byte skip' are not accepted; save the image again")
    try:
        sizes = [int(v) for v in fields["sizes"].split()]
        bytes_per_voxel = _NRRD_TYPES[fields["type"].lower()]
    except (KeyError, ValueError):
        raise ImageError(f"{name}: NRRD header without valid 'sizes' and 'type'") from None
    _check_nrrd_spacing(fields, name)
    encoding = fields.get("encoding", "raw").lower()
    encoding = {"gz": "gzip", "bz2": "bzip2"}.get(encoding, encoding)
    if encoding not in ("raw", "gzip", "bzip2"):
        raise ImageError(f"{name}: NRRD encoding {encoding!r} is not accepted; save with raw or gzip encoding")
    return _count(name, _dims(sizes, name), bytes_per_voxel, limits, "nrrd"), offset, encoding


def _check_nrrd_spacing(fields: dict[str, str], name: str) -> None:
    """ITK reads a NaN or missing voxel size as 1 mm without a word (as it does NIfTI's pixdim): refused. (In 4D files
    the non-spatial axis rightly has none; check_3d refuses those with its own message.)"""
    if fields.get("dimension") != "3":
        return
    spacings = fields.get("spacings", "").split()
    if any(not _positive_number(v) for v in spacings):
        raise ImageError(f"{name}: NRRD spacings {' '.join(spacings)[:60]!r} are not sizes in mm; the header is "
                         f"broken: fix the spacing and save the image again")
    if "none" in fields.get("space directions", "").split():
        raise ImageError(f"{name}: NRRD space directions give an axis of this 3D volume no direction ('none'); the "
                         f"header is broken: fix the directions and save the image again")


def _positive_number(text: str) -> bool:
    try:
        value = float(text)
    except ValueError:
        return False
    return math.isfinite(value) and value > 0


def _meta_key(line: str) -> str:
    return line.split("=", 1)[0].strip()


def metaimage_header(head: bytes, name: str, limits: Limits) -> tuple[Header, int, bool]:
    """(header, data offset, compressed) of a MetaImage with its data in the same file (ElementDataFile = LOCAL)."""
    lines, offset = _header_lines(head, name, lambda line: _meta_key(line) == "ElementDataFile")
    fields: dict[str, str] = {}
    for line in lines:
        if not line.strip():
            continue
        if "=" not in line:
            raise ImageError(f"{name}: a MetaImage header line without '=' ({line[:40]!r}); save the image again")
        key, value = _meta_key(line), line.split("=", 1)[1].strip()
        canonical = _META_KEY_CASE.get(key.lower())
        if canonical is not None and key != canonical:
            raise ImageError(f"{name}: MetaImage key {key!r} is not written {canonical!r} (ITK would not read it as "
                             f"that field); save the image again")
        _once(fields, key, value, name)
    if fields["ElementDataFile"].upper() != "LOCAL":
        raise ImageError(f"{name}: a MetaImage header whose voxels are in another file (ElementDataFile = "
                         f"{fields['ElementDataFile'][:40]!r}); save the image as one .mha file")
    if fields.get("HeaderSize", "0") not in ("0", ""):
        raise ImageError(f"{name}: MetaImage HeaderSize is not accepted; save the image again")
    try:
        sizes = [int(v) for v in fields["DimSize"].split()]
        bytes_per_voxel = _META_TYPES[fields["ElementType"].upper()]
        channels = int(fields.get("ElementNumberOfChannels", "1"))
    except (KeyError, ValueError):
        raise ImageError(f"{name}: MetaImage header without valid DimSize and ElementType") from None
    _check_meta_dimensions(fields, len(sizes), name)
    header = _count(name, _dims(sizes + [max(channels, 1)], name), bytes_per_voxel, limits, "metaimage")
    return header, offset, fields.get("CompressedData", "False").lower() == "true"


# MetaIO sizes its arrays by NDims and reads NDims (or NDims²) numbers from each of these fields whatever the line
# holds: NDims = -1 or 100 crashes ITK (a segmentation fault, heap corruption), too few numbers leave made-up values.
# Each group is one field under several names, and which name wins depends on their order, so only one may be given.
_META_VECTOR_FIELDS = (("ElementSpacing",), ("ElementSize",), ("Offset", "Position", "Origin"), ("CenterOfRotation",))
_META_MATRIX_FIELDS = ("TransformMatrix", "Rotation", "Orientation")
MAX_META_DIMS = 4  # a 3D volume, or a 4D/2D one that check_3d then refuses with its own message


def _check_meta_dimensions(fields: dict[str, str], sizes: int, name: str) -> None:
    ndims = fields.get("NDims", "").strip()
    if not ndims.isdigit() or not 2 <= int(ndims) <= MAX_META_DIMS:
        raise ImageError(f"{name}: MetaImage NDims {ndims[:20]!r} is not 2 to {MAX_META_DIMS} (CrossModalSeg reads 3D "
                         f"volumes); the header is broken: save the image again")
    n = int(ndims)
    if sizes != n:
        raise ImageError(f"{name}: MetaImage DimSize gives {sizes} sizes for NDims = {n}; save the image again")
    for group, count in [*((g, n) for g in _META_VECTOR_FIELDS), (_META_MATRIX_FIELDS, n * n)]:
        given = [key for key in group if key in fields]
        if len(given) > 1:
            raise ImageError(f"{name}: the MetaImage header gives both {given[0]} and {given[1]} (one field under two "
                             f"names); save the image again")
        if given and len(fields[given[0]].split()) != count:
            raise ImageError(f"{name}: MetaImage {given[0]} needs {count} numbers for NDims = {n}, the header gives "
                             f"{len(fields[given[0]].split())}; save the image again")


# ---- data checks ---------------------------------------------------------------------------------------------------
def _inflate(chunks: Iterator[bytes], decompressor, expected: int, name: str, sink=None) -> int:
    """Inflates a zlib/gzip or bzip2 stream (writing to `sink` when given) and returns the inflated size; stops with
    an error past `expected + INFLATE_MARGIN` bytes, so a decompression bomb costs no more than an honest file."""
    total, limit = 0, expected + INFLATE_MARGIN
    try:
        for data in chunks:
            while True:
                out = decompressor.decompress(data, max(1, min(CHUNK, limit + 1 - total)))
                total += len(out)
                if total > limit:
                    raise ImageError(f"{name}: the compressed data inflate to more than the header's {expected:,} "
                                     f"bytes (a corrupt file or a decompression bomb)")
                if sink is not None:
                    sink.write(out)
                if decompressor.eof:
                    return total
                if isinstance(decompressor, bz2.BZ2Decompressor):
                    if decompressor.needs_input:
                        break
                    data = b""
                else:
                    data = decompressor.unconsumed_tail
                    if not data:
                        break
    except (zlib.error, OSError, EOFError) as e:
        raise ImageError(f"{name}: not a readable image: corrupt compressed data ({e}); copy or download the file again") from None
    return total


def _file_chunks(f, first: bytes = b"") -> Iterator[bytes]:
    if first:
        yield first
    while True:
        block = f.read(CHUNK)
        if not block:
            return
        yield block


def _short(name: str, have: int, need: int) -> ImageError:
    return ImageError(f"{name}: truncated: the header implies {need:,} bytes of voxel data, the file holds {have:,}; "
                      f"copy or download it again")


# The ITK reader for each format: forced, so that ITK reads a file with the reader whose header the gate checked
# (left to itself, ITK picks a reader by file name: a .nii with MetaImage text inside, or a .spr whose Stimulate
# header names another file, went past the checks of another format).
IMAGE_IO = {"nifti": "NiftiImageIO", "nrrd": "NrrdImageIO", "metaimage": "MetaImageIO"}
_FORMAT_OF_SUFFIX = {".nii.gz": "nifti", ".nii": "nifti", ".nrrd": "nrrd", ".mha": "metaimage"}
_FORMAT_NAMES = {"nifti": "NIfTI", "nrrd": "NRRD", "metaimage": "MetaImage"}
MAX_NIFTI_OFFSET = 16 << 20  # vox_offset: the header and its extensions; a larger one is inflated for nothing


def _content_format(head: bytes) -> str | None:
    """The format the first bytes show: "nifti-gz", "nifti", "nrrd", "metaimage", or None. A binary NIfTI header is
    recognised before any MetaImage text that may follow it."""
    if head[:2] == b"\x1f\x8b":
        return "nifti-gz"
    if head[:4] == b"NRRD":
        return "nrrd"
    if len(head) >= 4 and {struct.unpack("<i", head[:4])[0], struct.unpack(">i", head[:4])[0]} & {348, 540}:
        return "nifti"
    if head.startswith((b"ObjectType", b"NDims")) or b"ElementDataFile" in head:
        return "metaimage"
    return None


def image_suffix(path: str | Path) -> str | None:
    lower = Path(path).name.lower()
    return next((suffix for suffix in _FORMAT_OF_SUFFIX if lower.endswith(suffix)), None)


@contextmanager
def gated(path: str | Path, limits: Limits = Limits(), name: str | None = None) -> Iterator[tuple[Path, str]]:
    """Checks `path` and yields (the path ITK may read, the name of the ITK reader to read it with): the file itself,
    or for a gzip-compressed NIfTI a temporary .nii holding its inflated bytes (deleted afterwards). The file's name
    must end in .nii, .nii.gz, .nrrd or .mha and its content must be that format. `name` is how messages call the
    file."""
    path = Path(path)
    name = name or str(path)
    size = regular_file(path)
    with open(path, "rb") as f:
        head = f.read(CHUNK)
        content = _content_format(head)
        if content is None:
            raise ImageError(f"{name}: not a readable image; give {ACCEPTED}")
        family = "nifti" if content == "nifti-gz" else content
        suffix = image_suffix(path)
        if suffix is not None and _FORMAT_OF_SUFFIX[suffix] != family:
            raise ImageError(f"{name}: holds a {_FORMAT_NAMES[family]} image but its name ends in {suffix}; give it "
                             f"the extension of its format ({ACCEPTED})")
        if content == "nifti-gz":
            with _inflated_nifti(f, name, limits) as tmp:
                _known_suffix(suffix, name)
                yield tmp, IMAGE_IO[family]
            return
        if content == "nrrd":
            header, offset, encoding = nrrd_header(head, name, limits)
            _check_payload(f, offset, size, header, encoding, name)
        elif content == "metaimage":
            header, offset, compressed = metaimage_header(head, name, limits)
            _check_payload(f, offset, size, header, "zlib" if compressed else "raw", name)
        else:
            header, offset = nifti_header(head, name, limits)
            if size < offset + header.data_bytes:
                raise _short(name, max(size - offset, 0), header.data_bytes)
        _known_suffix(suffix, name)
    yield path, IMAGE_IO[family]


def _known_suffix(suffix: str | None, name: str) -> None:
    """Checked after the content (whose problems are the more useful message): the name must say the format."""
    if suffix is None:
        raise ImageError(f"{name}: an image file name must end in .nii, .nii.gz, .nrrd or .mha (the extension of its "
                         f"format); rename it")


def _check_payload(f, offset: int, size: int, header: Header, encoding: str, name: str) -> None:
    if encoding == "raw":
        if size - offset < header.data_bytes:
            raise _short(name, max(size - offset, 0), header.data_bytes)
        return
    f.seek(offset)
    decompressor = (zlib.decompressobj(16 + zlib.MAX_WBITS) if encoding == "gzip" else
                    bz2.BZ2Decompressor() if encoding == "bzip2" else zlib.decompressobj())
    have = _inflate(_file_chunks(f), decompressor, header.data_bytes, name)
    if have < header.data_bytes:
        raise _short(name, have, header.data_bytes)


@contextmanager
def _inflated_nifti(f, name: str, limits: Limits) -> Iterator[Path]:
    """A gzip stream must hold one NIfTI file: inflated once, into a temporary .nii, checked on the way."""
    f.seek(0)
    decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        head = decompressor.decompress(f.read(CHUNK), 540)
    except zlib.error as e:
        raise ImageError(f"{name}: not a readable image: corrupt gzip data ({e}); copy or download the file again") from None
    if not (len(head) >= 4 and {struct.unpack("<i", head[:4])[0], struct.unpack(">i", head[:4])[0]} & {348, 540}):
        raise ImageError(f"{name}: a gzip file that does not hold a NIfTI image; give {ACCEPTED}")
    header, offset = nifti_header(head, name, limits)
    needed = offset + header.data_bytes
    fd, tmp = tempfile.mkstemp(prefix="crossmodalseg-", suffix=".nii")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(head)
            # The same decompressor goes on: first with the input it was given but did not inflate yet.
            have = len(head) + _inflate(_file_chunks(f, decompressor.unconsumed_tail), decompressor,
                                        needed - len(head), name, out)
            # A gzip file may hold several members one after the other (concatenated, or written by parallel gzip
            # tools); ITK reads them as one stream, and so does the gate.
            while have < needed and decompressor.eof:
                rest = decompressor.unused_data or f.read(CHUNK)
                if rest[:2] != b"\x1f\x8b":
                    break
                decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
                have += _inflate(_file_chunks(f, rest), decompressor, needed - have, name, out)
        if have < needed:
            raise _short(name, max(have - offset, 0), header.data_bytes)
        if not decompressor.eof:
            raise ImageError(f"{name}: truncated gzip stream; copy or download the file again")
        yield Path(tmp)
    finally:
        Path(tmp).unlink(missing_ok=True)
