"""The Message-ID as resubmission reads it: the first field of the header section, unfolded
and stripped, every other byte (angle brackets, case) kept as sent."""

from __future__ import annotations

import pytest

from relay.message.msgid import message_id


@pytest.mark.parametrize(("header", "expected"), [
    (b"Subject: s\r\nMessage-ID: <a1@app.test>\r\n\r\n", b"<a1@app.test>"),
    (b"message-id:<A1@App.Test>\r\n\r\n", b"<A1@App.Test>"),          # name in any case
    (b"Message-Id :  \t<a1@app.test>  \r\n\r\n", b"<a1@app.test>"),    # blanks around
    (b"Message-ID:\r\n <a1@app.test>\r\nTo: x\r\n\r\n", b"<a1@app.test>"),  # folded
    (b"Message-ID: <a1@\r\n app.test>\r\n\r\n", b"<a1@ app.test>"),    # unfolded, not joined
    (b"Message-ID: a1@app.test\r\n\r\n", b"a1@app.test"),              # no brackets: as sent
    (b"Message-ID: <first@a>\r\nMessage-ID: <second@a>\r\n\r\n", b"<first@a>"),
    (b"Subject: s\nMessage-ID: <lf@app.test>\n\n", b"<lf@app.test>"),  # bare LF lines
], ids=["plain", "case", "blanks", "folded", "folded-inside", "bare", "first", "lf"])
def test_msgid_is_read_minimally_normalised(header: bytes, expected: bytes) -> None:
    assert message_id(header) == expected


@pytest.mark.parametrize("header", [
    b"Subject: no id\r\n\r\n",
    b"Message-ID:   \r\n\r\n",                                  # empty
    b"X-Message-ID: <not@this>\r\n\r\n",                        # another field
    b"Subject: s\r\n\r\nMessage-ID: <in@the.body>\r\n",         # the body is not read
    b"",
], ids=["none", "empty", "other-field", "in-body", "nothing"])
def test_msgid_absent(header: bytes) -> None:
    assert message_id(header) is None
