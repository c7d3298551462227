"""Who may talk to the service (issue 11): guessable tokens are refused for a reachable address, and the bearer
scheme is matched as HTTP says (case-insensitive scheme, exact token)."""

from __future__ import annotations

import pytest

from crossmodalseg.service.auth import (
    MIN_TOKEN_CHARS,
    InsecureBindError,
    browser_attack,
    check_bind,
    token_matches,
)

GOOD = "k" * MIN_TOKEN_CHARS


@pytest.mark.parametrize("token,message", [(None, "without a token"), ("", "without a token"),
                                           ("   ", "whitespace"), ("short-token", "11 characters"),
                                           (f" {GOOD}", "whitespace")])
def test_a_public_bind_refuses_missing_blank_or_short_tokens(token, message):
    with pytest.raises(InsecureBindError, match=message):
        check_bind("0.0.0.0", token)


def test_a_public_bind_accepts_a_long_token_and_loopback_needs_none():
    check_bind("0.0.0.0", GOOD)
    check_bind("127.0.0.1", None)
    check_bind("::1", "short")  # loopback: a token is optional, so any is accepted


@pytest.mark.parametrize("header,ok", [(f"Bearer {GOOD}", True), (f"bearer {GOOD}", True), (f"BEARER {GOOD}", True),
                                       (f"Bearer {GOOD}x", False), (GOOD, False), (f"Basic {GOOD}", False),
                                       ("Bearer", False), (None, False), ("", False)])
def test_the_bearer_scheme_is_case_insensitive_and_the_token_exact(header, ok):
    assert token_matches(header, GOOD) is ok


@pytest.mark.parametrize("host,origin,token_set,refused", [
    ("127.0.0.1:8765", None, False, False), ("localhost:8765", None, False, False), ("[::1]:8765", None, False, False),
    ("127.0.0.1", "http://127.0.0.1:8765", False, False), ("127.0.0.1:8765", "http://localhost:3000", False, False),
    # DNS rebinding: the attacker's name now points at 127.0.0.1, so the browser sends it as the Host
    ("rebind.evil.example:8765", None, False, True), ("rebind.evil.example:8765", None, True, False),
    (None, None, False, True), ("", None, False, True),
    # a page of another site posting to the service (form POST, text/plain body: no preflight)
    ("127.0.0.1:8765", "https://evil.example", False, True), ("127.0.0.1:8765", "null", False, True),
    ("gpu.lab.example:8765", "https://evil.example", True, True),
    # the server's own pages (/docs) on a remote server with a token
    ("gpu.lab.example:8765", "http://gpu.lab.example:8765", True, False),
    ("127.0.0.1.evil.example", None, False, True), ("localhost.evil.example:80", None, False, True),
])
def test_requests_from_other_sites_pages_are_refused(host, origin, token_set, refused):
    """The token-less server on 127.0.0.1 answered any Host and any Origin: a web page could post models and
    predictions to it, and after DNS rebinding read and overwrite patient images."""
    assert (browser_attack(host, origin, token_set) is not None) is refused
