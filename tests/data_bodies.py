"""DATA bodies made of what dot-stuffing and SMTP-smuggling bugs are made of, and the
reference they are checked against: the bytes the former line-by-line path sent (aiosmtpd's
un-stuffing, then aiosmtplib's normalisation and stuffing), computed from aiosmtplib's own
functions and a copy of aiosmtpd 1.4.6's line rule, never from relay code."""

from __future__ import annotations

import random

from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings

LINE_LIMIT = 1001  # aiosmtpd's SMTP.line_length_limit

HEAD = b"From: agent@kw.test\r\nTo: r0@example.test\r\nSubject: t\r\n\r\n"

BODIES = {
    "plain": b"hello\r\n",
    "empty_body": b"",
    "stuffed_dots": b"..one dot\r\n...two dots\r\n..\r\nend\r\n",
    "lines_ending_in_dot": b"Thanks.\r\nx.\r\n.x.\r\n",
    "unstuffed_leading_dot": b".not stuffed\r\n.\r\r\n",
    "bare_lf": b"one\ntwo\n.\nthree\r\n",
    "bare_cr": b"one\rtwo\r.\rthree\r\n",
    "smuggle_lf_dot_lf": b"a\r\n\n.\nMAIL FROM:<x@evil.test>\r\nRCPT TO:<v@example.test>\r\n",
    "smuggle_lf_dot_crlf": b"a\n.\r\nDATA\r\n",
    "smuggle_cr_dot_cr": b"a\r.\rQUIT\r\n",
    "smuggle_crlf_dot_lf": b"a\r\n.\nRSET\r\n",
    "smuggle_crlf_dot_cr_crlf": b"a\r\n.\r\r\nNOOP\r\n",
    "eight_bit": "café ünïcode\r\n".encode(),
    "long_lines": (b"x" * 998 + b"\r\n") * 3,
    "nul_and_controls": b"a\x00b\x07c\r\n",
}


def stock_unstuff(raw: bytes) -> bytes:
    """aiosmtpd 1.4.6 smtp_DATA: lines end with CRLF only; a leading dot is removed."""
    lines = raw.split(b"\r\n")
    last = lines.pop()  # after the final CRLF: b"" for a complete body
    assert last == b""
    return b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n" for line in lines)


def stock_wire(content: bytes) -> bytes:
    """aiosmtplib 5.1 execute_data_command without the terminator."""
    return PERIOD_REGEX.sub(b"..", normalize_message_line_endings(content))


def random_message(rng: random.Random) -> bytes:
    """A DATA body (wire form, no terminator) from the pieces smuggling and stuffing bugs
    are made of; never containing a terminator before its end."""
    alphabet = [b"a", b".", b"..", b"\r", b"\n", b"\r\n", b"\r\n.", b"\r\n..", b"\r\r\n",
                b"\n.\n", b"\r.\r", b"X-KW-Route: mailchimp\r\n", b"\xff"]
    while True:
        body = HEAD + b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        if not body.endswith(b"\r\n"):
            body += b"\r\n"
        if b"\r\n.\r\n" not in b"\r\n" + body:
            return body


def pieces(data: bytes, rng: random.Random) -> list[bytes]:
    """``data`` cut at random places (network reads of any size)."""
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, 12))))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
