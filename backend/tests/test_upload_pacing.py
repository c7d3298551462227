"""A slow client cannot hold a connection open (issue 11: a trickled upload stayed open for minutes): not with an
upload body, a JSON body or its request headers. The limits are module settings (the header timeout also an
environment variable); the tests shrink them so that a stall is seconds long, not half a minute."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from crossmodalseg.service import schemas, uploads
from crossmodalseg.service.uploads import UploadError, stream_to_file

from .service_harness import Server


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


def test_a_trickled_prediction_form_is_refused_with_408(monkeypatch):
    """POST /predict's multipart body is read whole by Starlette, outside the upload pacing: a body trickled a byte
    every 20 s stayed open past 90 s. It now has GRACE_S plus its length at MIN_RATE_BYTES_S."""
    from starlette.requests import Request

    monkeypatch.setattr(uploads, "GRACE_S", 0.3)
    monkeypatch.setattr(uploads, "MIN_RATE_BYTES_S", 1 << 20)

    async def trickle():
        await asyncio.sleep(0.2)
        return {"type": "http.request", "body": b"-", "more_body": True}

    headers = [(b"content-type", b"multipart/form-data; boundary=xyz"), (b"content-length", b"100000")]
    request = Request({"type": "http", "method": "POST", "path": "/predict", "headers": headers}, trickle)
    started = time.monotonic()
    with pytest.raises(UploadError, match="did not arrive") as refused:
        asyncio.run(uploads.read_form(request))
    assert refused.value.status == 408 and time.monotonic() - started < 2.0
    no_length = Request({"type": "http", "method": "POST", "path": "/predict", "headers": headers[:1]}, trickle)
    with pytest.raises(UploadError, match="Content-Length") as refused:
        asyncio.run(uploads.read_form(no_length))
    assert refused.value.status == 411


def test_a_trickled_json_body_is_refused_with_408(monkeypatch):
    """The JSON routes' gate (POST /jobs, /datasets) bounds the time of the body too, not only its size."""
    monkeypatch.setattr(schemas, "JSON_BODY_TIMEOUT_S", 0.3)
    reached = []

    async def app(scope, receive, send):
        reached.append(scope["path"])

    async def trickle():
        await asyncio.sleep(0.2)
        return {"type": "http.request", "body": b"{", "more_body": True}

    sent = []

    async def send(message):
        sent.append(message)

    gate = schemas.JsonBodyGate(app, {("POST", "/jobs")})
    asyncio.run(gate({"type": "http", "method": "POST", "path": "/jobs"}, trickle, send))
    assert sent[0]["status"] == 408 and b"did not arrive" in sent[1]["body"]
    assert reached == [], "the app never sees a body that did not arrive in time"


def test_a_client_trickling_its_request_headers_is_disconnected(tmp_path):
    """Slowloris: a request head trickled a byte at a time is cut off after the header timeout (1.5 s here), on a
    new connection and on a kept-alive one; a prompt request on the same server is answered."""
    server = Server(tmp_path / "home", env={"CROSSMODALSEG_HEADER_TIMEOUT_S": "1.5"}).start()
    try:
        host, port = server.url.removeprefix("http://").split(":")

        def trickle(sock: socket.socket) -> float:
            started = time.monotonic()
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            try:
                for _ in range(40):  # up to 12 s of one header byte every 0.3 s
                    time.sleep(0.3)
                    sock.sendall(b"X")
                    sock.settimeout(0.01)
                    try:
                        if sock.recv(1024) == b"":
                            break
                    except socket.timeout:
                        pass
            except (BrokenPipeError, ConnectionResetError):
                pass
            return time.monotonic() - started

        with socket.create_connection((host, int(port))) as fresh:
            assert trickle(fresh) < 4.0
        with socket.create_connection((host, int(port))) as kept:
            kept.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert b"200 OK" in kept.recv(4096)
            assert trickle(kept) < 4.0
        assert server.client.get("/health").status_code == 200
    finally:
        server.stop()
