"""Who may talk to the service: loopback without a token by default; any other address only with a token, and
when a token is set every request must carry it (`Authorization: Bearer <token>`)."""

from __future__ import annotations

import hmac
import ipaddress
import secrets

from ..errors import UserError


class InsecureBindError(UserError):
    """Refusal to serve on a reachable address without a token."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


MIN_TOKEN_CHARS = 16


def check_bind(host: str, token: str | None) -> None:
    """Refuses a reachable address without a token, and a token an attacker could guess (empty, blank, short)."""
    if token is not None and token != token.strip():
        raise InsecureBindError("the token starts or ends with whitespace (a copy-paste slip?); set it without")
    if is_loopback(host):
        return
    if not token:
        raise InsecureBindError(
            f"refusing to serve on {host} without a token: anyone who can reach it could read images and run jobs. "
            f"Set CROSSMODALSEG_TOKEN (or --token-file), or bind 127.0.0.1 and tunnel (ssh -L)")
    if len(token) < MIN_TOKEN_CHARS:
        raise InsecureBindError(f"refusing to serve on {host} with a token of {len(token)} characters: use at least "
                                f"{MIN_TOKEN_CHARS} (e.g. python -c \"import secrets; print(secrets.token_urlsafe(32))\")")


def token_matches(header: str | None, token: str) -> bool:
    """`Authorization: Bearer <token>`, the scheme in any letter case (RFC 9110: schemes are case-insensitive)."""
    scheme, _, value = (header or "").strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.strip().encode(), token.encode())


def new_token() -> str:
    return secrets.token_urlsafe(32)
