"""relay/message/unsubscribe.py: reading a message's one-click unsubscribe fields (RFC 8058)
and the field names its DKIM signatures cover, and the bytes of the fields the relay adds."""

from __future__ import annotations

import pytest

from relay.message.unsubscribe import (
    LIST_UNSUBSCRIBE,
    LIST_UNSUBSCRIBE_POST,
    UnsubscribeHeaders,
    one_click_fields,
    read_unsubscribe_headers,
    signed_fields,
)

BOTH = ("List-Unsubscribe", "List-Unsubscribe-Post")


def head(*lines: str, body: str = "Body\r\n") -> bytes:
    return ("".join(f"{line}\r\n" for line in ["From: agent@kw.test", *lines])
            + "\r\n" + body).encode()


@pytest.mark.parametrize(("lines", "missing"), [
    pytest.param([], BOTH, id="neither"),
    pytest.param(["List-Unsubscribe: <https://kw.test/u/1>",
                  "List-Unsubscribe-Post: List-Unsubscribe=One-Click"], (), id="both"),
    pytest.param(["List-Unsubscribe: <mailto:u@kw.test>, <https://kw.test/u/1>",
                  "list-unsubscribe-post:   List-Unsubscribe=One-Click  "], (),
                 id="mailto-and-https-any-case-name"),
    pytest.param(["List-Unsubscribe:", " <https://kw.test/u/1>",
                  "List-Unsubscribe-Post:", "\tlist-unsubscribe=one-click"], (),
                 id="folded-values"),
    pytest.param(["List-Unsubscribe: <https://kw.test/u/1>"], ("List-Unsubscribe-Post",),
                 id="no-post"),
    pytest.param(["List-Unsubscribe-Post: List-Unsubscribe=One-Click"], ("List-Unsubscribe",),
                 id="no-list-unsubscribe"),
    pytest.param(["List-Unsubscribe: <mailto:u@kw.test>",
                  "List-Unsubscribe-Post: List-Unsubscribe=One-Click"], ("List-Unsubscribe",),
                 id="mailto-only-is-not-one-click"),
    pytest.param(["List-Unsubscribe: <http://kw.test/u/1>",
                  "List-Unsubscribe-Post: List-Unsubscribe=One-Click"], ("List-Unsubscribe",),
                 id="plain-http-is-not-one-click"),
    pytest.param(["List-Unsubscribe: <https://kw.test/u/1>", "List-Unsubscribe-Post: yes"],
                 ("List-Unsubscribe-Post",), id="post-without-one-click"),
])
def test_read_unsubscribe_headers_missing(lines: list[str], missing: tuple[str, ...]) -> None:
    """A field is missing when absent or not what RFC 8058 §3.1 asks (an https URI; the
    single pair List-Unsubscribe=One-Click)."""
    assert read_unsubscribe_headers(head(*lines)).missing == missing


def test_read_unsubscribe_headers_only_the_header_section() -> None:
    """Fields quoted in the body are not the message's."""
    content = head(body="List-Unsubscribe: <https://kw.test/u/1>\r\n"
                        "List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n")
    assert read_unsubscribe_headers(content) == UnsubscribeHeaders()


def test_read_unsubscribe_headers_first_field_wins() -> None:
    found = read_unsubscribe_headers(head("List-Unsubscribe: <https://kw.test/a>",
                                          "List-Unsubscribe: <https://kw.test/b>"))
    assert found.list_unsubscribe == "<https://kw.test/a>"


def test_read_unsubscribe_headers_signed_names_of_every_signature() -> None:
    """The h= names of each DKIM-Signature (folded, with FWS around the colons) are
    collected in lower case; other tags' values are not names."""
    content = head("DKIM-Signature: v=1; a=rsa-sha256; d=kw.test; s=sel;",
                   " h=From : To : Subject :", "\tList-Unsubscribe; bh=abc=; b=de:f=",
                   "DKIM-Signature: v=1; d=esp.test; h=list-unsubscribe-post:date; b=x")
    assert read_unsubscribe_headers(content).signed == {
        "from", "to", "subject", "list-unsubscribe", "list-unsubscribe-post", "date"}


@pytest.mark.parametrize(("value", "names"), [
    ("v=1; h=from:to; b=x", {"from", "to"}),
    ("v=1;h= from :\r\n to ;b=x", {"from", "to"}),
    ("v=1; bh=h=from; b=x", set()),
    ("v=1; b=x", set()),
    ("v=1; h=; b=x", set()),
])
def test_signed_fields_of_the_h_tag(value: str, names: set[str]) -> None:
    assert signed_fields(value) == names


def test_signed_as_absent_names_the_covered_fields() -> None:
    found = UnsubscribeHeaders(signed=frozenset({"from", "list-unsubscribe-post"}))
    assert found.signed_as_absent(BOTH) == ("List-Unsubscribe-Post",)
    assert found.signed_as_absent(("List-Unsubscribe",)) == ()


def test_one_click_fields_bytes() -> None:
    """The two fields, CRLF-terminated, the URL in angle brackets (RFC 2369 §2); without
    the Post field when the message has its own."""
    url = "https://relay.kw.test/unsubscribe/abc.def"
    assert one_click_fields(url) == (
        b"List-Unsubscribe: <https://relay.kw.test/unsubscribe/abc.def>\r\n"
        b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n")
    assert one_click_fields(url, post=False) == \
        b"List-Unsubscribe: <https://relay.kw.test/unsubscribe/abc.def>\r\n"
    assert read_unsubscribe_headers(one_click_fields(url) + head()).missing == ()
    assert (LIST_UNSUBSCRIBE, LIST_UNSUBSCRIBE_POST) == BOTH


@pytest.mark.parametrize("url", [
    "https://kw.test/u/1>\r\nBcc: x@example.test", "https://kw.test/a b", "ftp://kw.test/u",
    "https://kw.test/<x>", "https://kw.test/\u00e9",
])
def test_one_click_fields_refuses_a_url_that_breaks_the_header(url: str) -> None:
    with pytest.raises(ValueError):
        one_click_fields(url)
