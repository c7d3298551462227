"""Atomic file writes: readers see the old file or the new one, never a part of it (a crash mid-write loses nothing).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def _new_file_mode() -> int:
    """The permissions open() gives a new file: 0666 without the process's umask (read once, at import)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


NEW_FILE_MODE = _new_file_mode()


def write_atomic(path: str | Path, write: Callable[[str], None], suffix: str = ".tmp") -> Path:
    """`write(tmp)` fills a temporary file beside `path` (same file system), which then replaces `path`. The file
    gets a new file's usual permissions: mkstemp makes its files private (0600), and every segmentation, dataset.json
    and model written through it was unreadable to the user's colleagues and group."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, NEW_FILE_MODE)  # after the write: some writers replace the file they are given
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
