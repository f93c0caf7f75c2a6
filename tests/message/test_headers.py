"""relay.message: the only byte changes the relay makes (strip X-KW-*, add Received:)."""

from __future__ import annotations

import email
import email.policy
from datetime import UTC, datetime, timedelta, timezone

import pytest

from relay.message.headers import CONTROL_HEADER_PREFIX, received_header, strip_headers

NOW = datetime(2026, 11, 15, 12, 0, tzinfo=UTC)
CONTROL = (CONTROL_HEADER_PREFIX,)  # the X-KW-* fields


# -- strip_headers, of the control headers --------------------------------------------------------
def test_strip_control_headers_removes_fields_in_any_case() -> None:
    """X-KW-* fields go whatever their case; every other byte stays as it was."""
    content = (b"From: agent@kw.test\r\n"
               b"X-KW-Plan: smart-7\r\n"
               b"To: client@example.test\r\n"
               b"x-kw-contact: 42\r\n"
               b"X-Kw-Step: 3\r\n"
               b"Subject: Hello\r\n"
               b"\r\n"
               b"Body line\r\n")
    assert strip_headers(content, CONTROL) == (b"From: agent@kw.test\r\n"
                                               b"To: client@example.test\r\n"
                                               b"Subject: Hello\r\n"
                                               b"\r\n"
                                               b"Body line\r\n")


def test_strip_control_headers_removes_folded_continuations() -> None:
    """A folded X-KW-* field goes with its continuation lines; other folded fields stay whole."""
    content = (b"X-KW-Long: part one\r\n"
               b"\tpart two\r\n"
               b"  part three\r\n"
               b"Subject: a subject\r\n"
               b" that is folded\r\n"
               b"X-KW-Last: x\r\n"
               b" y\r\n"
               b"\r\n"
               b"Body\r\n")
    assert strip_headers(content, CONTROL) == (b"Subject: a subject\r\n"
                                               b" that is folded\r\n"
                                               b"\r\n"
                                               b"Body\r\n")


def test_strip_control_headers_keeps_folded_line_that_looks_like_control() -> None:
    """A continuation line whose text starts with X-KW- belongs to its field and is kept."""
    content = (b"Subject: hi\r\n"
               b" X-KW-Not: a field\r\n"
               b"X-KW-Real: 1\r\n"
               b"\r\n"
               b"Body\r\n")
    assert strip_headers(content, CONTROL) == (b"Subject: hi\r\n"
                                               b" X-KW-Not: a field\r\n"
                                               b"\r\n"
                                               b"Body\r\n")


def test_strip_control_headers_leaves_body_untouched() -> None:
    """Body lines that start with X-KW- are content and stay, byte for byte."""
    body = (b"X-KW-Plan: in the body\r\n"
            b"\r\n"
            b"x-kw-also: here\r\n"
            b"Trailing \xff\xfe bytes\r\n")
    content = b"X-KW-Plan: 1\r\nSubject: s\r\n\r\n" + body
    assert strip_headers(content, CONTROL) == b"Subject: s\r\n\r\n" + body


def test_strip_control_headers_returns_same_object_when_nothing_to_strip() -> None:
    """A message without control headers is returned as the very same object."""
    content = (b"From: agent@kw.test\r\nSubject: s\r\n\r\n"
               b"X-KW-Plan: only in the body\r\n")
    assert strip_headers(content, CONTROL) is content


def test_strip_control_headers_keeps_similar_names() -> None:
    """Only the X-KW- prefix counts: X-KW, X-KWID and X-Other-KW- fields stay."""
    content = (b"X-KW: 1\r\nX-KWID: 2\r\nX-Other-KW-Thing: 3\r\n"
               b"Subject: mentions x-kw-plan in its value\r\n\r\nBody\r\n")
    assert strip_headers(content, CONTROL) == content


def test_strip_control_headers_lf_only_message() -> None:
    """A message with bare LF line endings is stripped and keeps its LF endings."""
    content = (b"From: agent@kw.test\n"
               b"X-KW-Plan: 7\n"
               b"\tcontinued\n"
               b"Subject: s\n"
               b"\n"
               b"X-KW-Body: stays\n")
    assert strip_headers(content, CONTROL) == (b"From: agent@kw.test\n"
                                               b"Subject: s\n"
                                               b"\n"
                                               b"X-KW-Body: stays\n")


def test_strip_control_headers_lf_header_then_crlf_body() -> None:
    """The header ends at the first blank line of either kind; a later CRLF blank line in the
    body does not make body lines part of the header."""
    content = (b"Subject: s\n"
               b"X-KW-Plan: 7\n"
               b"\n"
               b"X-KW-Body: stays\r\n"
               b"\r\n"
               b"end\r\n")
    assert strip_headers(content, CONTROL) == (b"Subject: s\n"
                                               b"\n"
                                               b"X-KW-Body: stays\r\n"
                                               b"\r\n"
                                               b"end\r\n")


def test_strip_control_headers_crlf_header_then_bare_lf_blank_line() -> None:
    """A CRLF header ended by a bare-LF blank line: the body after it is left alone."""
    content = b"Subject: s\r\nX-KW-Plan: 7\r\n\nX-KW-Body: stays\r\n\r\nend\r\n"
    assert strip_headers(content, CONTROL) == b"Subject: s\r\n\nX-KW-Body: stays\r\n\r\nend\r\n"


def test_strip_control_headers_message_without_body() -> None:
    """A message that is only a header section (no blank line) is stripped too."""
    assert strip_headers(b"Subject: s\r\nX-KW-Plan: 7\r\n", CONTROL) == b"Subject: s\r\n"
    assert strip_headers(b"Subject: s\r\nX-KW-Plan: 7", CONTROL) == b"Subject: s\r\n"
    assert strip_headers(b"X-KW-Plan: 7\r\n", CONTROL) == b""


def test_strip_control_headers_empty_header_section() -> None:
    """A message that starts with the blank line has no header: its body is never touched."""
    content = b"\r\nX-KW-Body: stays\r\n\r\nmore\r\n"
    assert strip_headers(content, CONTROL) == content
    lf_content = b"\nX-KW-Body: stays\n\nmore\n"
    assert strip_headers(lf_content, CONTROL) == lf_content


def test_strip_control_headers_empty_message() -> None:
    """Empty content comes back unchanged."""
    assert strip_headers(b"", CONTROL) == b""


# -- received_header -------------------------------------------------------------------------------
def test_received_header_format() -> None:
    """The trace header is three CRLF lines: from HELO ([ip]), by host with protocol id, date."""
    header = received_header(helo="client.test", peer_ip="127.0.0.1", hostname="relay.test",
                             protocol="ESMTPSA", txn_id="0123abcd", now=NOW)
    assert header == (b"Received: from client.test ([127.0.0.1])\r\n"
                      b"\tby relay.test (Command Email Relay) with ESMTPSA id 0123abcd;\r\n"
                      b"\tSun, 15 Nov 2026 12:00:00 +0000\r\n")


def test_received_header_keeps_the_time_zone_of_now() -> None:
    """The date line carries the offset of the instant it is given (RFC 5322 date-time)."""
    now = datetime(2026, 11, 15, 4, 0, tzinfo=timezone(timedelta(hours=-8)))
    header = received_header(helo="c", peer_ip="::1", hostname="relay.test",
                             protocol="ESMTPA", txn_id="t", now=now)
    assert header.endswith(b"\tSun, 15 Nov 2026 04:00:00 -0800\r\n")
    assert header.startswith(b"Received: from c ([::1])\r\n")


@pytest.mark.parametrize("helo", [
    "evil host",
    "evil (comment) host",
    "evil\r\nBcc: victim@example.test",
    "evil\nX-KW-Plan: 1",
    "evil\rX: y",
    "évil.example",
    "evil\x00\x7f\x1b",
    ")(",
    "x" * 1000,
])
def test_received_header_hostile_helo_cannot_break_it(helo: str) -> None:
    """Whatever the client said in HELO, the header stays three lines of printable ASCII, the
    HELO is one token without spaces or parentheses, and it parses as one Received field."""
    header = received_header(helo=helo, peer_ip="192.0.2.7", hostname="relay.test",
                             protocol="ESMTPA", txn_id="t1", now=NOW)
    lines = header.split(b"\r\n")
    assert lines[-1] == b"" and len(lines) == 4
    assert all(b"\r" not in line and b"\n" not in line for line in lines)
    assert all(0x20 <= byte < 0x7f or byte == 0x09 for byte in header.replace(b"\r\n", b""))
    first = lines[0].decode("ascii")
    assert first.startswith("Received: from ") and first.endswith(" ([192.0.2.7])")
    token = first.removeprefix("Received: from ").removesuffix(" ([192.0.2.7])")
    assert token and len(token) <= 255
    assert not any(c in token for c in " ()\t")
    assert lines[1].startswith(b"\tby relay.test ") and lines[2].startswith(b"\t")
    parsed = email.message_from_bytes(header + b"Subject: s\r\n\r\nbody\r\n",
                                      policy=email.policy.compat32)
    assert parsed.keys() == ["Received", "Subject"]


def test_received_header_empty_helo_is_unknown() -> None:
    """An empty HELO name is written as "unknown"."""
    header = received_header(helo="", peer_ip="127.0.0.1", hostname="relay.test",
                             protocol="ESMTPA", txn_id="t", now=NOW)
    assert header.startswith(b"Received: from unknown ([127.0.0.1])\r\n")


def test_received_header_address_literal_helo_is_kept() -> None:
    """An address-literal HELO ([192.0.2.1]) is printable and kept as written."""
    header = received_header(helo="[192.0.2.1]", peer_ip="192.0.2.1", hostname="relay.test",
                             protocol="ESMTPA", txn_id="t", now=NOW)
    assert header.startswith(b"Received: from [192.0.2.1] ([192.0.2.1])\r\n")
