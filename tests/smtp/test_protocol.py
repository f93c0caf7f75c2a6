"""relay/smtp/protocol.py, the server side of one connection (RelaySMTP and the base its
mixins share, relay/smtp/connection.py), on real sockets against a relay started in process:
the greeting and the extensions offered, a session id on every line of a session, an
unfinished transaction given back whenever aiosmtpd drops its envelope, the one log line for
each refusal aiosmtpd writes (without the client's words), a path the parser would change,
and the end of a session on the client's end of file. DATA is in tests/smtp/test_data.py,
admission in tests/smtp/test_admission.py, the timers in tests/smtp/test_timeouts.py."""

from __future__ import annotations

from typing import Any

from structlog.testing import capture_logs

from relay.decisions.quota import QuotaStore
from relay.identity.accounts import AccountStore
from relay.process.wiring import RelayApp
from tests.conftest import RelayFactory, add_user, wait_for
from tests.rawsmtp import RawSMTP


def lines(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [entry for entry in logs if entry["event"] == name]


async def used(app: RelayApp, user_id: str) -> int:
    return (await QuotaStore(app.redis).usage(user_id, "2026-11")).used


async def test_the_greeting_and_ehlo_say_what_the_relay_offers(
        make_relay: RelayFactory) -> None:
    """220 with the configured hostname and the relay's name; EHLO offers the message size
    limit, 8BITMIME, SMTPUTF8, STARTTLS and (plaintext AUTH allowed here) PLAIN and LOGIN."""
    app: RelayApp = await make_relay(max_message_size=123_456)
    raw = await RawSMTP.connect(app.port)
    try:
        assert await raw.reply() == "220 relay.test Command Email Relay"
        ehlo = (await raw.send(b"EHLO client.test\r\n")).splitlines()
    finally:
        await raw.close()
    assert ehlo[0] == "250-relay.test"
    offered = {line[4:] for line in ehlo[1:]}
    assert {"SIZE 123456", "8BITMIME", "SMTPUTF8", "STARTTLS"} <= offered
    [auth] = [line.split()[1:] for line in offered if line.startswith("AUTH ")]
    assert sorted(auth) == ["LOGIN", "PLAIN"]


async def test_every_line_of_a_session_carries_its_own_session_id(
        relay: RelayApp) -> None:
    """Two connections: each has a session id of its own, on its opened line, on a refusal
    and on its closed line."""
    with capture_logs() as logs:
        first, second = await RawSMTP.open(relay.port), await RawSMTP.open(relay.port)
        assert (await first.send(b"NOOP\r\n")).startswith("250")
        assert (await first.send(b"MAIL FROM:<a@kw.test>\r\n")).startswith("503")
        assert (await second.send(b"QUIT\r\n")).startswith("221")
        await first.close()
        await second.close()
        await wait_for(lambda: len(lines(logs, "session.closed")) == 2)
    opened = [e["session_id"] for e in lines(logs, "session.opened")]
    assert len(set(opened)) == 2
    [refusal] = lines(logs, "command.refused")
    assert refusal["session_id"] == opened[0]
    assert {e["session_id"] for e in lines(logs, "session.closed")} == set(opened)
    assert all(e["peer"] == "127.0.0.1" for e in lines(logs, "session.opened"))


async def test_a_new_ehlo_inside_a_transaction_gives_its_units_back(
        relay: RelayApp, accounts: AccountStore) -> None:
    """aiosmtpd drops the envelope on EHLO: the open transaction ends (abandoned, refunded)
    and the session may start a new one."""
    user = await add_user(accounts)
    raw = await RawSMTP.open(relay.port)
    try:
        await raw.login()
        assert (await raw.send(b"MAIL FROM:<agent@kw.test>\r\n")).startswith("250")
        assert (await raw.send(b"RCPT TO:<a@example.test>\r\n")).startswith("250")
        assert await used(relay, user.id) == 1
        with capture_logs() as logs:
            assert (await raw.send(b"EHLO client.test\r\n")).startswith("250")
            await wait_for(lambda: lines(logs, "delivery.finished"))
        assert await used(relay, user.id) == 0
        [finished] = lines(logs, "delivery.finished")
        assert (finished["outcome"], finished["reason"]) == ("abandoned", "reset")
        assert (await raw.send(b"MAIL FROM:<agent@kw.test>\r\n")).startswith("250")
    finally:
        await raw.close()


async def test_a_refusal_quoting_the_client_is_logged_without_its_words(
        relay: RelayApp) -> None:
    """aiosmtpd's 500 repeats the unknown command; a client that sent its password as a line
    must not find it in the log."""
    raw = await RawSMTP.open(relay.port)
    try:
        with capture_logs() as logs:
            reply = await raw.send(b"HUNTER2PASSWORD\r\n")
    finally:
        await raw.close()
    assert reply.startswith("500") and "HUNTER2PASSWORD" in reply
    [refusal] = lines(logs, "command.refused")
    assert refusal["smtp_code"] == 500
    assert "HUNTER2PASSWORD" not in str(refusal) and '"…"' in refusal["reply"]


async def test_a_path_the_parser_would_change_is_refused_as_sender_or_recipient(
        relay: RelayApp, accounts: AccountStore) -> None:
    """A source route in MAIL FROM or RCPT TO is refused (501, 5.1.7 for the sender, 5.1.3
    for a recipient) with a mail.refused or rcpt.refused line, no traceback."""
    await add_user(accounts)
    raw = await RawSMTP.open(relay.port)
    try:
        await raw.login()
        with capture_logs() as logs:
            assert (await raw.send(b"MAIL FROM:<@route:agent@kw.test>\r\n")).startswith(
                "501 5.1.7")
            assert (await raw.send(b"MAIL FROM:<agent@kw.test>\r\n")).startswith("250")
            assert (await raw.send(b"RCPT TO:<@route:a@example.test>\r\n")).startswith(
                "501 5.1.3")
    finally:
        await raw.close()
    assert [(e["event"], e["reason"]) for e in logs if e["event"].endswith(".refused")] == [
        ("mail.refused", "AddressSyntaxError"), ("rcpt.refused", "AddressSyntaxError")]
    assert not lines(logs, "session.exception")


async def test_the_clients_end_of_file_ends_the_session(relay: RelayApp) -> None:
    """A client that half-closes after the greeting is closed at once (its connection slot
    and descriptor freed), with a session.closed line."""
    raw = await RawSMTP.open(relay.port)
    with capture_logs() as logs:
        raw.writer.write_eof()
        assert await raw.rest() == b""
        await wait_for(lambda: lines(logs, "session.closed"))
    await raw.close()
