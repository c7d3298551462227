"""The one gate every image passes before ITK reads it (CLI, dataset check, trainer, predictor, HTTP uploads).

ITK trusts headers: a NRRD `data file:` or a MetaImage `ElementDataFile` sends it to any path (system files, a FIFO
that blocks forever, the service's own database), a header may claim gigabytes of voxels that are not there (ITK
allocates them, and fills the missing part with zeros), and a small gzip stream may inflate to gigabytes. So the
gate reads the header itself, by content (not by file name), and refuses before anything is allocated:
- anything but a regular file; formats other than NIfTI-1/2 (.nii, .nii.gz), NRRD and MetaImage with the data in the
  same file (detached headers: NRRD data files, MetaImage ElementDataFile other than LOCAL, NIfTI/Analyze .hdr/.img
  pairs);
- a voxel count above `Limits.max_voxels`;
- fewer data bytes than the header implies (truncated files), after decompression;
- compressed data that inflates past what the header implies (plus a small margin): inflation stops there.
A gzip-compressed NIfTI is inflated once, by the gate, into a temporary .nii that ITK then reads (ITK does not
decompress it a second time).
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
            offset = int(struct.unpack(order + "f", head[108:112])[0])
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
    # ITK reads a NaN, infinite or zero pixdim as 1 mm without a word: the image would load with a made-up geometry.
    # (An axis of one voxel may carry 0, as some writers give a single slice.)
    spacing = [float(pixdim[i]) for i in range(1, min(ndim, 3) + 1)]
    if any(not math.isfinite(v) or (v == 0 and dim[i + 1] > 1) for i, v in enumerate(spacing)):
        raise ImageError(f"{name}: voxel spacing (pixdim) {spacing} is not a size in mm; the header is broken: fix "
                         f"the spacing and save the image again")
    return _count(name, _dims(list(dim[1:ndim + 1]), name), bitpix // 8, limits, "nifti"), offset


# ---- NRRD and MetaImage (text headers) ---------------------------------------------------------------------------
def _text_header(data: bytes, name: str, what: str) -> tuple[list[str], int]:
    """Header lines and the offset of the data, for headers that end with an empty line (NRRD) or at the
    ElementDataFile line (MetaImage)."""
    end = data.find(b"\n\n") if what == "nrrd" else -1
    if what == "nrrd":
        alt = data.find(b"\r\n\r\n")
        if end < 0 or (0 <= alt < end):
            end, skip = alt, 4
        else:
            skip = 2
        if end < 0:
            raise ImageError(f"{name}: NRRD header without the empty line that ends it (a detached .nhdr or a "
                             f"truncated file); save the image as one .nrrd file")
        text, offset = data[:end], end + skip
    else:
        marker = data.find(b"ElementDataFile")
        if marker < 0:
            raise ImageError(f"{name}: MetaImage header without ElementDataFile")
        newline = data.find(b"\n", marker)
        if newline < 0:
            raise ImageError(f"{name}: truncated MetaImage header")
        text, offset = data[:newline], newline + 1
    # ITK's readers also end a line at a lone carriage return: a field after one ("# note\rdata file: /etc/passwd")
    # would be read by ITK and hidden from these checks. Only CR LF pairs are line ends here.
    if re.search(rb"\r(?!\n)", text):
        raise ImageError(f"{name}: its header has a line that ends with a lone carriage return; save the image again "
                         f"(lines end with LF or CR LF)")
    try:
        return text.decode("latin-1").replace("\r", "").split("\n"), offset
    except UnicodeDecodeError:
        raise ImageError(f"{name}: not a readable image (unreadable header)") from None


def nrrd_header(head: bytes, name: str, limits: Limits) -> tuple[Header, int, str]:
    """(header, data offset, encoding) of an attached NRRD; refuses `data file` fields."""
    if re.search(rb"^data ?file\s*:", head, re.MULTILINE | re.IGNORECASE):
        raise ImageError(f"{name}: a detached NRRD header (its voxels are in another file named by 'data file'); "
                         f"save the image as one .nrrd file with the data inside")
    lines, offset = _text_header(head, name, "nrrd")
    fields: dict[str, str] = {}
    for line in lines[1:]:
        if line.startswith("#") or ":" not in line:
            continue
        if ":=" in line and (": " not in line or line.index(":=") < line.index(": ")):
            continue  # a key/value pair, not a field
        key, value = line.split(":", 1)
        fields[key.strip().lower()] = value.strip()
    if fields.get("line skip", "0") not in ("0", "") or fields.get("byte skip", "0") not in ("0", ""):
        raise ImageError(f"{name}: NRRD 'line skip'/'byte skip' are not accepted; save the image again")
    try:
        sizes = [int(v) for v in fields["sizes"].split()]
        bytes_per_voxel = _NRRD_TYPES[fields["type"].lower()]
    except (KeyError, ValueError):
        raise ImageError(f"{name}: NRRD header without valid 'sizes' and 'type'") from None
    encoding = fields.get("encoding", "raw").lower()
    encoding = {"gz": "gzip", "bz2": "bzip2"}.get(encoding, encoding)
    if encoding not in ("raw", "gzip", "bzip2"):
        raise ImageError(f"{name}: NRRD encoding {encoding!r} is not accepted; save with raw or gzip encoding")
    return _count(name, _dims(sizes, name), bytes_per_voxel, limits, "nrrd"), offset, encoding


def metaimage_header(head: bytes, name: str, limits: Limits) -> tuple[Header, int, bool]:
    """(header, data offset, compressed) of a MetaImage with its data in the same file (ElementDataFile = LOCAL)."""
    lines, offset = _text_header(head, name, "metaimage")
    fields: dict[str, str] = {}
    for line in lines:
        if "=" in line:
            key, value = line.split("=", 1)
            fields[key.strip().lower()] = value.strip()
    if fields.get("elementdatafile", "").upper() != "LOCAL":
        raise ImageError(f"{name}: a MetaImage header whose voxels are in another file (ElementDataFile = "
                         f"{fields.get('elementdatafile', '')[:40]!r}); save the image as one .mha file")
    if fields.get("headersize", "0") not in ("0", ""):
        raise ImageError(f"{name}: MetaImage HeaderSize is not accepted; save the image again")
    try:
        sizes = [int(v) for v in fields["dimsize"].split()]
        bytes_per_voxel = _META_TYPES[fields["elementtype"].upper()]
        channels = int(fields.get("elementnumberofchannels", "1"))
    except (KeyError, ValueError):
        raise ImageError(f"{name}: MetaImage header without valid DimSize and ElementType") from None
    header = _count(name, _dims(sizes + [max(channels, 1)], name), bytes_per_voxel, limits, "metaimage")
    return header, offset, fields.get("compresseddata", "false").lower() == "true"


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


@contextmanager
def gated(path: str | Path, limits: Limits = Limits(), name: str | None = None) -> Iterator[Path]:
    """Checks `path` and yields the path ITK may read: the file itself, or for a gzip-compressed NIfTI a temporary
    .nii holding its inflated bytes (deleted afterwards). `name` is how messages call the file."""
    path = Path(path)
    name = name or str(path)
    size = regular_file(path)
    with open(path, "rb") as f:
        head = f.read(4096)
        if head[:2] == b"\x1f\x8b":
            with _inflated_nifti(f, name, limits) as tmp:
                yield tmp
            return
        if head[:4] == b"NRRD":
            header, offset, encoding = nrrd_header(_whole_header(f, head, name), name, limits)
            _check_payload(f, offset, size, header, encoding, name)
        elif b"ElementDataFile" in head or head.startswith((b"ObjectType", b"NDims")):
            header, offset, compressed = metaimage_header(_whole_header(f, head, name), name, limits)
            _check_payload(f, offset, size, header, "zlib" if compressed else "raw", name)
        elif len(head) >= 4 and {struct.unpack("<i", head[:4])[0], struct.unpack(">i", head[:4])[0]} & {348, 540}:
            header, offset = nifti_header(head, name, limits)
            if size < offset + header.data_bytes:
                raise _short(name, max(size - offset, 0), header.data_bytes)
        else:
            raise ImageError(f"{name}: not a readable image; give {ACCEPTED}")
    yield path


def _whole_header(f, head: bytes, name: str) -> bytes:
    """Text headers may run past the first 4 KiB: read up to 1 MiB of it."""
    data = head
    while b"\n\n" not in data and b"ElementDataFile" not in data and len(data) < CHUNK:
        more = f.read(4096)
        if not more:
            break
        data += more
    if b"ElementDataFile" in data and b"\n" not in data[data.find(b"ElementDataFile"):]:
        data += f.readline()
    return data


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
        if have < needed:
            raise _short(name, max(have - offset, 0), header.data_bytes)
        if not decompressor.eof:
            raise ImageError(f"{name}: truncated gzip stream; copy or download the file again")
        yield Path(tmp)
    finally:
        Path(tmp).unlink(missing_ok=True)
