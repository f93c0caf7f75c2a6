"""relay/message/wire.py: a message kept in SMTP wire form. stuff and unstuff against
aiosmtplib's own stuffing, which wire forms are clean, and what goes upstream: the received
pieces themselves when nothing changes, views of them when headers are taken out."""

from __future__ import annotations

import pytest
from aiosmtplib.protocol import normalize_message_line_endings

from relay.message.wire import WireMessage, is_clean_wire, stuff, unstuff
from tests.data_bodies import HEAD, stock_wire


@pytest.mark.parametrize("content", [b"", b"a\r\n", b".a\r\n", b"a\r\n.\r\n..\r\n", b"a\nb",
                                     b"a\rb\r\n", b"\r\n.", b"x" * 10])
def test_stuff_is_aiosmtplib_and_unstuff_reverses_it(content):
    wire = stuff(content)
    assert wire == (stock_wire(content) if content else b"")
    assert is_clean_wire(wire)
    assert unstuff(wire) == normalize_message_line_endings(content) if content else True


@pytest.mark.parametrize(("raw", "clean"), [
    (b"a\r\n", True), (b"..a\r\n", True), (b"a\r\n..b\r\n", True), (b"", True),
    (b".a\r\n", False), (b"a\r\n.b\r\n", False), (b"a\nb\r\n", False), (b"a\rb\r\n", False),
    (b"a", False),
])
def test_is_clean_wire(raw, clean):
    assert is_clean_wire(raw) is clean
    assert (stuff(unstuff(raw)) == raw) is clean or not raw.endswith(b"\r\n")


def test_outgoing_is_the_received_pieces_when_nothing_changes():
    pieces_in = [HEAD[:10], HEAD[10:] + b"..x\r\n", b"body\r\n"]
    chunks = WireMessage(pieces_in).outgoing(b"Received: x\r\n", (b"x-kw-",)).chunks
    assert chunks[0] == b"Received: x\r\n"
    assert all(a is b for a, b in zip(chunks[1:], pieces_in, strict=True))  # not copies
    with_control = [b"X-KW-Route: m\r\n" + HEAD[:5], HEAD[5:] + b"..x\r\n", b"more\r\n"]
    chunks = WireMessage(with_control).outgoing(b"R: x\r\n", (b"x-kw-",)).chunks
    assert chunks[-1] is with_control[-1]
    assert isinstance(chunks[-2], memoryview) and chunks[-2].obj is with_control[1]
    assert b"".join(chunks) == b"R: x\r\n" + HEAD + b"..x\r\nmore\r\n"


def test_capture_receives_content(tmp_path):
    """The capture folder gets content (un-stuffed), as before."""
    out = WireMessage([HEAD + b"..x\r\n"]).outgoing(b"R: 1\r\n", ())
    assert out.content() == b"R: 1\r\n" + HEAD + b".x\r\n"
