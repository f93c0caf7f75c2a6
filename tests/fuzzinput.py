"""What the session fuzzer sends (tests/flows/test_fuzz.py): command lines, AUTH exchanges,
MAIL/RCPT arguments in odd forms, DATA bodies. Each is built from a seeded generator, one
hypothesis draw per rule argument: the engine's draws cost more than a session does."""

from __future__ import annotations

import base64
import random
from collections.abc import Callable
from typing import Any

from hypothesis import strategies as st

from tests import fuzzmodel as fm
from tests.conftest import PASSWORD
from tests.data_bodies import BODIES, HEAD

APP_PASSWORD = "fuzz app credential passphrase"


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


CONTROL_BYTES = [bytes([c]) for c in (0, 1, 7, 8, 9, 11, 12, 13, 27, 31, 127)]
ODD_BYTES = [b"\xff", b"\xfe", b"\xed\xa0\x80", b"\xc3\xa9", b"\xe2\x80\xae", b"\x80"]


def dirty(rng: random.Random, clean: bytes) -> bytes:
    """``clean`` with a control character, a NUL, a bare CR or non-UTF-8 bytes put in."""
    insert = rng.choice(CONTROL_BYTES + ODD_BYTES)
    at = rng.randint(0, len(clean))
    return clean[:at] + insert + clean[at:]


GOOD_SENDERS = [b"agent@kw.test", b"alias@kw.test", b"AGENT@KW.TEST", b"Alias@Kw.Test",
                b"other@kw.test"]
BAD_SENDERS = [b"nobody@nowhere.test", b"agent@kw.test.", b"agent@kw.tes", b"agent@kw.test>",
               b"\xd0\xb0gent@kw.test", b"agent@kw.t\xc3\xa9st", b"agent", b"@kw.test",
               b'"agent"@kw.test', b"agent@[127.0.0.1]", "agent@\u212aw.test".encode()]
RCPTS = [b"r1@example.test", b"r2@example.test", b"R3@Example.Test", b"refused@example.test",
         b"later@example.test", b"u%c.example@relay.test", b"c.example!u", b'"q u"@c.example',
         b"x@[192.0.2.1]", b"x@c\xc3\xa9.example", b"l" * 70 + b"@example.test", b"a@b",
         b"trailing@dot.example."]


def path(rng: random.Random, choices: list[bytes]) -> bytes:
    """A MAIL/RCPT argument: an address in one of its odd forms, then parameters."""
    address = rng.choice(choices)
    if rng.randint(0, 5) == 0:
        address = dirty(rng, address)
    form = rng.choice(["angle"] * 6 + ["bare", "route", "space", "open", "two",
                                                  "empty", "display"])
    wrapped = {
        "angle": b"<" + address + b">", "bare": address, "route": b"<@a.test,@b.test:" +
        address + b">", "space": b" <" + address + b"> ", "open": b"<" + address,
        "two": b"<" + address + b"> <x@y.test>", "empty": b"<>",
        "display": b'"Boss" <' + address + b">",
    }[form]
    params = rng.choice([b""] * 6 + [
        b" SIZE=100", b" SIZE=99999999", b" BODY=8BITMIME", b" BODY=9BIT", b" SMTPUTF8",
        b" SMTPUTF8=yes", b" AUTH=<>", b" AUTH=<other@kw.test>", b" NOTIFY=NEVER",
        b" RET=HDRS", b" SIZE=", b" BODY=7BIT\rSMTPUTF8", b" \x0b", b" X=\xff"])
    return wrapped + params


def plain(login: bytes, password: bytes, authzid: bytes = b"") -> bytes:
    return b64(authzid + b"\0" + login + b"\0" + password)


USER = fm.USER_LOGIN.encode()
GOOD_AUTH = {
    "plain_user": [b"AUTH PLAIN " + plain(USER, PASSWORD.encode())],
    "plain_app": [b"AUTH PLAIN " + plain(b"smartplans", APP_PASSWORD.encode())],
    "plain_authzid": [b"AUTH PLAIN " + plain(USER, PASSWORD.encode(), USER)],
    "plain_continued": [b"AUTH PLAIN", plain(USER, PASSWORD.encode())],
    "login_user": [b"AUTH LOGIN", b64(USER), b64(PASSWORD.encode())],
    "login_initial_app": [b"AUTH LOGIN " + b64(b"smartplans"), b64(APP_PASSWORD.encode())],
}
BAD_AUTH = {
    "wrong_password": [b"AUTH PLAIN " + plain(USER, b"wrong " + PASSWORD.encode())],
    "app_with_user_password": [b"AUTH PLAIN " + plain(b"smartplans", PASSWORD.encode())],
    "bad_base64": [b"AUTH PLAIN !!!notbase64"],
    "padding_only": [b"AUTH PLAIN ="],
    "empty_answer": [b"AUTH PLAIN", b""],
    "aborted": [b"AUTH LOGIN", b"*"],
    "aborted_password": [b"AUTH LOGIN", b64(USER), b"*"],
    "other_authzid": [b"AUTH PLAIN " + plain(USER, PASSWORD.encode(), b"other@kw.test")],
    "extra_nul": [b"AUTH PLAIN " + b64(b"\0" + USER + b"\0" + PASSWORD.encode() + b"\0")],
    "lower_mechanism": [b"AUTH plain " + plain(USER, PASSWORD.encode())],
    "cram": [b"AUTH CRAM-MD5"],
    "too_many": [b"AUTH PLAIN a b"],
    "no_mechanism": [b"AUTH"],
    "login_bad_base64": [b"AUTH LOGIN", b"%%%", ],
    "login_wrong": [b"AUTH LOGIN", b64(USER), b64(b"nope " + PASSWORD.encode())],
    "unknown_login": [b"AUTH PLAIN " + plain(b"ghost@kw.test", b"whatever")],
    "nul_in_answer": [b"AUTH PLAIN", b"AGFnZW50\x00QGt3"],
    "bad_utf8_answer": [b"AUTH LOGIN", b"\xff\xfe"],
}
HOSTS = [b"client.test", b"x", b"[127.0.0.1]", b"a" * 300, b"", b" ", b"\xff\xfe", b"h\x00st",
         b"h\rst", b"h\x0bst", b"(comment)", b"caf\xc3\xa9.test"]


def garbage(rng: random.Random) -> bytes:
    """Random bytes without CR or LF."""
    return bytes(rng.randrange(256) for _ in range(rng.randint(0, 60))).replace(
        b"\n", b"").replace(b"\r", b"")


def command_lines(rng: random.Random) -> list[bytes]:
    """One command line (several for an AUTH exchange with its continuation answers)."""
    kind = rng.choice(
        ["greet"] * 4 + ["auth_good"] * 4 + ["auth_bad"] * 2 + ["mail"] * 4 + ["rcpt"] * 6 +
        ["rset", "noop", "vrfy", "help", "expn", "quit_arg", "garbage", "garbage", "long",
         "empty", "verb_case", "nul_verb"])
    if kind == "greet":
        verb = rng.choice([b"EHLO", b"EHLO", b"HELO", b"ehlo", b"Ehlo"])
        host = rng.choice(HOSTS)
        return [verb + b" " + host]
    if kind == "auth_good":
        return list(GOOD_AUTH[rng.choice(sorted(GOOD_AUTH))])
    if kind == "auth_bad":
        return list(BAD_AUTH[rng.choice(sorted(BAD_AUTH))])
    if kind == "mail":
        keyword = rng.choice([b"MAIL FROM:", b"MAIL FROM:", b"mail from:",
                                        b"MAIL FROM: ", b"MAIL TO:", b"MAIL"])
        return [keyword + path(rng, GOOD_SENDERS * 3 + BAD_SENDERS)]
    if kind == "rcpt":
        keyword = rng.choice([b"RCPT TO:", b"RCPT TO:", b"rcpt to:", b"RCPT TO: ",
                                        b"RCPT FROM:"])
        return [keyword + path(rng, RCPTS)]
    if kind == "long":
        size = rng.choice([1100, 5000, 70_000])
        return [b"NOOP " + b"x" * size]
    return [{
        "rset": b"RSET", "noop": b"NOOP", "vrfy": b"VRFY agent@kw.test", "help": b"HELP",
        "expn": b"EXPN list", "quit_arg": b"QUIT now", "empty": b"", "verb_case": b"nOoP",
        "nul_verb": b"NO\x00OP",
    }.get(kind) or b"X" + garbage(rng)]


def bodies(rng: random.Random) -> bytes:
    """A DATA body in wire form, without the final dot and never containing it."""
    kind = rng.choice(["named"] * 3 + ["pieces"] * 3 + ["oversize", "long_line",
                                                                     "controls"])
    if kind == "named":
        return HEAD + BODIES[rng.choice(sorted(BODIES))]
    if kind == "oversize":
        return HEAD + (b"y" * 98 + b"\r\n") * (fm.MAX_MESSAGE_SIZE // 100 + 5)
    if kind == "long_line":
        return HEAD + b"z" * rng.choice([1000, 1001, 5000]) + b"\r\n"
    if kind == "controls":
        header = b"X-KW-Route: " + dirty(rng, b"mailchimp") + b"\r\n"
        return header + HEAD + b"body\r\n"
    alphabet = [b"a", b".", b"..", b"\r", b"\n", b"\r\n", b"\r\n.", b"\r\n..", b"\r\r\n",
                b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"X-KW-Route: command\r\n",
                b"\xff", b"\x00", b"MAIL FROM:<x@evil.test>\r\n"]
    body = HEAD + b"".join([rng.choice(alphabet) for _ in range(rng.randint(0, 30))])
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    while b"\r\n.\r\n" in b"\r\n" + body:  # would end DATA early
        body = body.replace(b"\r\n.\r\n", b"\r\n..\r\n")
    return body


SEEDS = st.integers(0, 2**32 - 1)


def seeded(make: Callable[[random.Random], Any]) -> st.SearchStrategy[Any]:
    """What ``make`` builds from a seeded generator: one draw per rule argument, which keeps
    hypothesis's cost per session low (its draws cost more than the session itself); the
    failing case it reports shows the bytes built."""
    return SEEDS.map(lambda seed: make(random.Random(seed)))
