"""Who may talk to the service: loopback without a token by default; any other address only with a token, and
when a token is set every request must carry it (`Authorization: Bearer <token>`)."""

from __future__ import annotations

import hmac
import ipaddress
import secrets


class InsecureBindError(ValueError):
    """Refusal to serve on a reachable address without a token."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    if not is_loopback(host) and not token:
        raise InsecureBindError(
            f"refusing to serve on {host} without a token: anyone who can reach it could read images and run jobs. "
            f"Set CROSSMODALSEG_TOKEN (or --token-file), or bind 127.0.0.1 and tunnel (ssh -L)")


def token_matches(header: str | None, token: str) -> bool:
    expected = f"Bearer {token}".encode()
    return hmac.compare_digest((header or "").encode(), expected)


def new_token() -> str:
    return secrets.token_urlsafe(32)
