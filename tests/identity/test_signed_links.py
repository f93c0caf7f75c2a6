"""relay.identity.signed_links: tokens open only their own link, unaltered and in time."""

from __future__ import annotations

import pytest

from relay.identity.signed_links import (
    LinkExpiredError,
    LinkInvalidError,
    LinkSigner,
    load_link_secret,
)

SIGNER = LinkSigner(b"a-test-link-secret-of-32-bytes!!")


def test_round_trip_without_expiry() -> None:
    token = SIGNER.sign("unsubscribe", {"u": "u-1", "r": "Ann@example.com"})
    assert SIGNER.verify("unsubscribe", token) == {"u": "u-1", "r": "Ann@example.com"}


def test_expiry_is_enforced() -> None:
    token = SIGNER.sign("usage", {"u": "u-1"}, ttl=60, now=1000)
    assert SIGNER.verify("usage", token, now=1059) == {"u": "u-1"}
    with pytest.raises(LinkExpiredError):
        SIGNER.verify("usage", token, now=1060)


@pytest.mark.parametrize("mangle", [
    lambda t: t[:-1] + ("A" if t[-1] != "A" else "B"),     # tag altered
    lambda t: "e30" + t[t.index("."):],                      # body swapped for {}
    lambda t: t.replace(".", ""),                            # no separator
    lambda t: "",                                            # empty
    lambda t: t + "." + t,                                   # junk appended
])
def test_altered_tokens_are_invalid(mangle) -> None:  # type: ignore[no-untyped-def]
    token = SIGNER.sign("usage", {"u": "u-1"}, ttl=60)
    with pytest.raises(LinkInvalidError):
        SIGNER.verify("usage", mangle(token))


def test_a_token_opens_only_its_purpose_and_secret() -> None:
    token = SIGNER.sign("unsubscribe", {"u": "u-1"})
    with pytest.raises(LinkInvalidError):
        SIGNER.verify("usage", token)
    with pytest.raises(LinkInvalidError):
        LinkSigner(b"another-secret-of-enough-length").verify("unsubscribe", token)


def test_an_expiry_cannot_be_moved() -> None:
    # Re-encoding the body with a later exp breaks the tag: the expiry is signed.
    import base64
    token = SIGNER.sign("usage", {"u": "u-1"}, ttl=1, now=0)
    forged = base64.urlsafe_b64encode(b'{"exp":99999999999,"u":"u-1"}').rstrip(b"=").decode()
    with pytest.raises(LinkInvalidError):
        SIGNER.verify("usage", forged + token[token.index("."):])


def test_short_secrets_are_refused() -> None:
    with pytest.raises(ValueError):
        LinkSigner(b"short")


def test_development_secret_is_made_once(tmp_path) -> None:  # type: ignore[no-untyped-def]
    first = load_link_secret(None, tmp_path)
    assert load_link_secret(None, tmp_path) == first and len(first) >= 32
    assert (tmp_path / "link.key").stat().st_mode & 0o077 == 0
    assert load_link_secret("configured-secret-value", tmp_path) == b"configured-secret-value"
