"""A slow client cannot hold an upload open (issue 11: a trickled upload stayed open for minutes). The limits are
module settings; the tests shrink them so that a stall is seconds long, not half a minute."""

from __future__ import annotations

import asyncio

import pytest

from crossmodalseg.service import uploads
from crossmodalseg.service.uploads import UploadError, stream_to_file


async def body(pieces: int, pause_s: float, size: int = 1024):
    for _ in range(pieces):
        await asyncio.sleep(pause_s)
        yield b"x" * size


def test_a_stalled_upload_is_refused_with_408_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(uploads, "IDLE_TIMEOUT_S", 0.2)
    with pytest.raises(UploadError, match="stalled") as refused:
        asyncio.run(stream_to_file(body(3, 0.5), tmp_path, 1 << 20))
    assert refused.value.status == 408
    assert list(tmp_path.iterdir()) == []


def test_a_trickled_upload_is_refused_with_408(tmp_path, monkeypatch):
    monkeypatch.setattr(uploads, "GRACE_S", 0.1)
    monkeypatch.setattr(uploads, "MIN_RATE_BYTES_S", 1 << 20)
    with pytest.raises(UploadError, match="too slow") as refused:
        asyncio.run(stream_to_file(body(20, 0.05, size=10), tmp_path, 1 << 20))
    assert refused.value.status == 408


def test_a_steady_upload_is_kept_whole(tmp_path):
    path = asyncio.run(stream_to_file(body(5, 0.01), tmp_path, 1 << 20))
    assert path.stat().st_size == 5 * 1024
