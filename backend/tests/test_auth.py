"""Who may talk to the service (issue 11): guessable tokens are refused for a reachable address, and the bearer
scheme is matched as HTTP says (case-insensitive scheme, exact token)."""

from __future__ import annotations

import pytest

from crossmodalseg.service.auth import MIN_TOKEN_CHARS, InsecureBindError, check_bind, token_matches

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
