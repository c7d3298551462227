"""Every transport failure reaches the panel as one BackendError, and status calls wait seconds, not minutes (issue
12: a slow or dropped connection raised a bare TimeoutError past the error handling, and each poll tick could block
for up to 600 s). Real sockets on 127.0.0.1 play the misbehaving server."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from CrossModalSegLib.client import BackendClient, BackendError


def misbehaving_server(behaviour: str) -> tuple[str, socket.socket]:
    """`silent`: accepts and never answers; `hang_up`: closes each connection as soon as the request arrives;
    `garbage`: answers something that is not HTTP."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)

    def serve() -> None:
        held = []
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conn.recv(65536)
            if behaviour == "silent":
                held.append(conn)
            elif behaviour == "garbage":
                conn.sendall(b"\x00\x01 not http at all\r\n\r\n")
                conn.close()
            else:
                conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return f"http://127.0.0.1:{server.getsockname()[1]}", server


@pytest.mark.parametrize("behaviour,message", [("silent", "did not answer within 0.5 s"),
                                               ("hang_up", "broke"), ("garbage", "broke")])
def test_transport_failures_are_backend_errors(behaviour: str, message: str):
    url, server = misbehaving_server(behaviour)
    try:
        client = BackendClient(url, "token", status_timeout=0.5)
        started = time.monotonic()
        with pytest.raises(BackendError, match=message):
            client.job("some-job")
        assert time.monotonic() - started < 5
        assert client.health() is False
    finally:
        server.close()


def test_an_unreachable_backend_is_a_backend_error():
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    with pytest.raises(BackendError, match="cannot reach"):
        BackendClient(f"http://127.0.0.1:{port}").info()
