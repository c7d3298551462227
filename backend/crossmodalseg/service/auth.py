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


def _hostname(authority: str) -> str:
    """The host of a Host header or of an origin's authority ("127.0.0.1:8765", "[::1]:8765", "localhost")."""
    authority = authority.strip().lower()
    if authority.startswith("["):
        return authority[1:authority.find("]")] if "]" in authority else authority
    return authority.rsplit(":", 1)[0] if authority.count(":") == 1 else authority


def browser_attack(host: str | None, origin: str | None, token_set: bool) -> str | None:
    """Why a request is refused as coming from a web page of another site rather than from a client of this
    machine, or None.

    A browser lets any page it shows send simple requests to 127.0.0.1 (a form POST, a text/plain body) and, after
    DNS rebinding, read the answers too, under the page's own host name. Without a token the loopback address is
    the only protection, so the Host must name a loopback address. Whatever the token, a request whose Origin is
    another site than the server's own (or a loopback one) is refused: no other site's page is meant to drive the
    service. Clients that are not browsers (Slicer, the CLI, curl) send no Origin.
    """
    if not token_set and not is_loopback(_hostname(host or "")):
        return "this server without a token answers only requests addressed to a loopback host (127.0.0.1, localhost)"
    if origin is not None:
        authority = origin.strip().lower().partition("://")[2]
        if not authority or not (is_loopback(_hostname(authority)) or authority == (host or "").strip().lower()):
            return "requests from web pages of other sites are refused"
    return None


def new_token() -> str:
    return secrets.token_urlsafe(32)
