"""The relay's rules for command lines and envelope paths (relay/smtp/syntax.py), as plain
tables: invalid UTF-8 and control characters are syntax errors, and a path is acknowledged
only when the address forwarded is the text the client wrote between the brackets."""

from __future__ import annotations

import pytest
from aiosmtpd.smtp import SMTP

from relay.errors import AddressSyntaxError, ControlCharacterError, InvalidUtf8Error
from relay.smtp.syntax import command_problem, parse_path


def _aiosmtpd(limit: int):
    smtp = SMTP.__new__(SMTP)
    smtp.local_part_limit = limit

    def parse(arg: str):
        return SMTP._getaddr(smtp, arg)
    return parse


def _parse(arg: str, limit: int = 0):
    return parse_path(arg, "recipient", local_part_limit=limit, full_parser=_aiosmtpd(limit))


# Paths the relay takes exactly as aiosmtpd's parser does (the fast expression or the parser).
SAME_AS_AIOSMTPD = [
    "<a@b.c>", "<agent@kw.test> SIZE=100 BODY=8BITMIME", "<first.last+tag@sub.example.test>",
    "<a@b>", "<x!#$%&'*+/=?^_`{|}~-@d-1.e>", "<>", "", "<a@b.c>   ", "<A@B.C>x",
    "<a..b@c.d>", "<.a@b.c>", "<a.@b.c>", "<a@-b.c>", "<a@b-.c>", "<a@b..c>",
    "<\"quoted local\"@b.c>", "<\"a>b\"@c.d>", "<\"a\\\"b\"@c.d>", "<a@[127.0.0.1]>", "a@b.c",
    "<a@b.c> <x@y.z>", "<caf\u00e9@b.c>", "<a@caf\u00e9.test>", "<" + "l" * 70 + "@b.c>",
    "<a@b.c> (comment) SIZE=1", "<a@b.c>\t SIZE=1", "<a@b.c>\u00a0X", "<a@b.c.>",
    "<u%c@relay.test>", "<c!u@d.e>",
]
# Paths without a domain: nowhere to forward them that the client chose.
WITHOUT_A_DOMAIN = ["<victim>", "<example.test!victim>", "victim", "<\"a@b\">", "<postmaster>"]
# Paths aiosmtpd's parser would turn into another address: refused, never acknowledged.
ALTERED_BY_THE_PARSER = [
    "<@route:a@b.c>", "<@a,@b:c@d.e>", "<a(c)@b.c>", "a(x)@b.c", "< a@b.c >", "<a b@c.d>",
    "<a@b.c",
]


@pytest.mark.parametrize("arg", SAME_AS_AIOSMTPD)
@pytest.mark.parametrize("limit", [0, 64])
def test_commandsyntax_paths_parse_as_aiosmtpd_does(arg, limit):
    assert _parse(arg, limit) == _aiosmtpd(limit)(arg)


@pytest.mark.parametrize("arg", ALTERED_BY_THE_PARSER)
def test_commandsyntax_paths_the_parser_would_alter_are_refused(arg):
    address, _ = _aiosmtpd(0)(arg)
    assert address  # aiosmtpd alone would acknowledge (and forward) this changed address
    with pytest.raises(AddressSyntaxError) as refused:
        _parse(arg)
    assert refused.value.reply == "501 5.1.3 Bad recipient address syntax"


@pytest.mark.parametrize("arg", WITHOUT_A_DOMAIN)
def test_commandsyntax_a_path_needs_a_domain(arg):
    assert _aiosmtpd(0)(arg)[0]  # aiosmtpd alone would take it
    with pytest.raises(AddressSyntaxError):
        _parse(arg)


@pytest.mark.parametrize("line", [b"RCPT TO:<r@example.test>\x0b\r\n",
                                  b"RCPT TO:<r@example.test>\x0c\n",
                                  b"RCPT TO:<r@example.test>\r\r\n", b"\tRCPT TO:<r@e.test>\r\n"])
def test_commandsyntax_controls_aiosmtpd_strips_are_seen_in_the_raw_line(line):
    assert command_problem("RCPT", "TO:<r@example.test>") is None  # what aiosmtpd hands on
    assert isinstance(command_problem("RCPT", "TO:<r@example.test>", line),
                      ControlCharacterError)


def test_commandsyntax_the_line_terminator_is_not_a_control():
    for line in (b"RCPT TO:<r@example.test>\r\n", b"RCPT TO:<r@example.test>\n"):
        assert command_problem("RCPT", "TO:<r@example.test>", line) is None


def test_commandsyntax_sender_refusal_names_the_sender():
    with pytest.raises(AddressSyntaxError) as refused:
        parse_path("<@r:a@b.c>", "sender", local_part_limit=0, full_parser=_aiosmtpd(0))
    assert refused.value.reply == "501 5.1.7 Bad sender address syntax"


@pytest.mark.parametrize("arg", [
    # aiosmtpd decodes arguments with surrogateescape: each bad byte is U+DC80..U+DCFF.
    b"FROM: \xed\xa0\x80", b"TO:\xff\xfe", b"<caf\xe9@b.c>", b"x \xc3",
])
def test_commandsyntax_invalid_utf8_is_a_500(arg):
    problem = command_problem("MAIL", arg.decode("utf-8", "surrogateescape"))
    assert isinstance(problem, InvalidUtf8Error)
    assert problem.reply == "500 5.5.2 Syntax error: command is not valid UTF-8"


@pytest.mark.parametrize("char", [chr(c) for c in range(0x20)] + ["\x7f"])
def test_commandsyntax_every_control_character_is_a_501(char):
    problem = command_problem("RCPT", f"TO:<a@b{char}c.example>")
    assert isinstance(problem, ControlCharacterError)
    assert problem.reply.startswith("501 5.5.2 ")


@pytest.mark.parametrize("arg", [None, "", "FROM:<a@b.c> SIZE=10", "TO:<caf\u00e9@b.c>",
                                 "PLAIN AGFAYgBj", "client.example"])
def test_commandsyntax_ordinary_arguments_pass(arg):
    assert command_problem("MAIL", arg) is None
