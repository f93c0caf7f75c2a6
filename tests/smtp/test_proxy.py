"""PROXY protocol v1/v2 on a real socket: the header bytes are written by hand (v2's binary
header built here with struct), good and malformed, and the relay must take the real client
from a trusted balancer only, for its logs, its limits and the Received: header."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Any

import aiosmtplib
import pytest
from structlog.testing import capture_logs

from relay.process.wiring import RelayApp
from relay.smtp.proxy import ProxiedClient, ProxyPolicy, client_from_header, normalize_ip
from tests.conftest import PASSWORD, RelayFactory, add_user, message, wait_for
from tests.proxyheaders import (
    CLIENT,
    CLIENT6,
    DGRAM,
    INET6,
    LOCAL,
    PROXY,
    UNIX,
    tlv,
    v1,
    v2,
)
from tests.rawsmtp import RawSMTP


async def proxied_relay(make_relay: RelayFactory, upstream: Any = None,
                        trusted: str = "127.0.0.1/32", **overrides: Any) -> RelayApp:
    app: RelayApp = await make_relay(
        upstream=upstream, proxy_protocol=True,
        trusted_proxies=(ipaddress.ip_network(trusted),), **overrides)
    return app


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [entry for entry in logs if entry["event"] == name]


async def send_through(raw: RawSMTP) -> None:
    """EHLO, AUTH, one message, QUIT on an open (greeted) raw connection."""
    await raw.login("client.test")
    assert (await raw.send(b"MAIL FROM:<agent@kw.test>\r\n")).startswith("250")
    assert (await raw.send(b"RCPT TO:<client@example.test>\r\n")).startswith("250")
    assert (await raw.send(b"DATA\r\n")).startswith("354")
    assert (await raw.send(message() + b".\r\n")).startswith("250")
    assert (await raw.send(b"QUIT\r\n")).startswith("221")


# -- the decision, as a pure function -----------------------------------------------------------
def test_normalize_ip_unmaps_ipv4_mapped_ipv6() -> None:
    """A dual-stack listener's ::ffff:a.b.c.d peer is the IPv4 client it is."""
    assert normalize_ip("::ffff:192.0.2.9") == "192.0.2.9"
    assert normalize_ip("2001:DB8:0::7") == "2001:db8::7"
    assert normalize_ip("192.0.2.9") == "192.0.2.9"


def test_proxy_policy_trusts_listed_networks_only() -> None:
    """Addresses inside a trusted network are trusted; others, garbage and None are not."""
    policy = ProxyPolicy((ipaddress.ip_network("10.0.0.0/8"),
                          ipaddress.ip_network("2001:db8::/32")), timeout=5)
    assert policy.trusts("10.1.2.3")
    assert policy.trusts("2001:db8::1")
    assert not policy.trusts("11.0.0.1")
    assert not policy.trusts("127.0.0.1")
    assert not policy.trusts("not-an-ip")
    assert not policy.trusts(None)


async def test_client_from_header_parses_what_aiosmtpd_parsed() -> None:
    """client_from_header reads aiosmtpd's ProxyData: TCP clients named, LOCAL/UNKNOWN as
    the balancer itself, UDP and Unix sockets refused."""
    from aiosmtpd.proxy_protocol import get_proxy

    from relay.smtp.proxy import ProxyHeaderError

    async def parse(header: bytes) -> Any:
        reader = asyncio.StreamReader()
        reader.feed_data(header)
        reader.feed_eof()
        data = await get_proxy(reader)
        assert data.valid, data.error
        return data

    assert client_from_header(await parse(v1())) == ProxiedClient(CLIENT, 40000)
    assert client_from_header(await parse(v1("TCP6", CLIENT6, "2001:db8::1"))) == \
        ProxiedClient(CLIENT6, 40000)
    assert client_from_header(await parse(v2())) == ProxiedClient(CLIENT, 40000)
    assert client_from_header(await parse(v2(family=INET6, src=CLIENT6,
                                             dst="2001:db8::1"))) == ProxiedClient(CLIENT6,
                                                                                   40000)
    assert client_from_header(await parse(b"PROXY UNKNOWN\r\n")) is None
    assert client_from_header(await parse(v2(command=LOCAL, family=0, proto=0))) is None
    assert client_from_header(await parse(v2(command=PROXY, family=0, proto=0))) is None
    with pytest.raises(ProxyHeaderError):
        client_from_header(await parse(v2(proto=DGRAM)))
    with pytest.raises(ProxyHeaderError):
        client_from_header(await parse(v2(family=UNIX)))


# -- good headers over a socket -------------------------------------------------------------------
@pytest.mark.parametrize(("header", "client"), [
    (v1(), CLIENT),
    (v1("TCP6", CLIENT6, "2001:db8::1"), CLIENT6),
    (v2(), CLIENT),
    (v2(family=INET6, src=CLIENT6, dst="2001:db8::1"), CLIENT6),
    # TLVs the balancer may add (here NOOP and UNIQUE_ID) are ignored.
    (v2(tlv=tlv(0x04, b"") + tlv(0x05, b"abc123")), CLIENT),
], ids=["v1-tcp4", "v1-tcp6", "v2-inet", "v2-inet6", "v2-tlvs"])
async def test_proxy_header_names_the_real_client(make_relay, upstream, accounts, header: bytes,
                                                  client: str):
    """After a trusted balancer's header, every session line, the AUTH and delivery lines and
    the Received: header name the real client, not the balancer."""
    await add_user(accounts)
    app = await proxied_relay(make_relay, upstream)
    with capture_logs() as logs:
        raw = await RawSMTP.connect(app.port, header)
        try:
            assert (await raw.reply()).startswith("220 ")
            await send_through(raw)
        finally:
            await raw.close()
        await wait_for(lambda: events(logs, "session.closed"))
    opened = events(logs, "session.opened")
    assert len(opened) == 1
    assert opened[0]["peer"] == client and opened[0]["proxy"] == "127.0.0.1"
    for name in ("auth.succeeded", "mail.accepted", "delivery.finished", "session.closed"):
        assert [entry["peer"] for entry in events(logs, name)] == [client], name
    assert not [entry for entry in logs if entry["log_level"] in ("warning", "error")]
    assert len(upstream.messages) == 1
    first_line = upstream.messages[0].content.split(b"\r\n", 1)[0]
    assert first_line == f"Received: from client.test ([{client}])".encode()


async def test_proxy_header_then_starttls_keeps_the_real_client(make_relay, upstream, accounts):
    """STARTTLS starts a new aiosmtpd session; the real client survives it (logs, Received:)."""
    await add_user(accounts)
    app = await proxied_relay(make_relay, upstream, allow_plaintext_auth=False)
    sock = socket.create_connection(("127.0.0.1", app.port))
    sock.sendall(v2())
    sock.setblocking(False)
    client = aiosmtplib.SMTP(sock=sock, start_tls=False, local_hostname="client.test",
                             timeout=10)
    with capture_logs() as logs:
        await client.connect()
        try:
            await client.starttls(validate_certs=False)
            await client.login("agent@kw.test", PASSWORD)
            errors, _ = await client.sendmail("agent@kw.test", ["x@example.test"], message())
            assert errors == {}
        finally:
            await client.quit()
        await wait_for(lambda: events(logs, "session.closed"))
    assert [entry["peer"] for entry in events(logs, "session.starttls")] == [CLIENT]
    assert [entry["peer"] for entry in events(logs, "auth.succeeded")] == [CLIENT]
    assert upstream.messages[0].content.startswith(
        f"Received: from client.test ([{CLIENT}])".encode())


@pytest.mark.parametrize("header", [b"PROXY UNKNOWN\r\n",
                                    b"PROXY UNKNOWN ffff::1 ffff::2 65535 65535\r\n",
                                    v2(command=LOCAL, family=0, proto=0)],
                         ids=["v1-unknown", "v1-unknown-addresses", "v2-local"])
async def test_proxy_balancer_own_connection_is_served_quietly(make_relay, header: bytes):
    """A header where the balancer speaks for itself (its health checks) is served with the
    balancer's own address, and logs nothing above debug."""
    app = await proxied_relay(make_relay)
    with capture_logs() as logs:
        raw = await RawSMTP.connect(app.port, header)
        try:
            assert (await raw.reply()).startswith("220 ")
            assert (await raw.send(b"HELO localhost\r\n")).startswith("250")
            assert (await raw.send(b"QUIT\r\n")).startswith("221")
        finally:
            await raw.close()
        await wait_for(lambda: events(logs, "session.closed"))
    assert events(logs, "session.opened")[0]["peer"] == "127.0.0.1"
    assert events(logs, "session.opened")[0]["proxy"] == "local"
    assert {entry["log_level"] for entry in logs} == {"debug"}


async def test_proxy_v1_header_naming_its_own_connection_is_the_balancer(make_relay):
    """HAProxy's v1 health checks send TCP4 with the check connection's own endpoints: the
    source equal to the socket's peer means the balancer itself, served quietly."""
    app = await proxied_relay(make_relay)
    with capture_logs() as logs:
        reader, writer = await asyncio.open_connection("127.0.0.1", app.port)
        port = writer.get_extra_info("sockname")[1]
        raw = RawSMTP(reader, writer)
        try:
            writer.write(v1(src="127.0.0.1", dst="127.0.0.1", sport=port, dport=app.port))
            assert (await raw.reply()).startswith("220 ")
            assert (await raw.send(b"QUIT\r\n")).startswith("221")
        finally:
            await raw.close()
        await wait_for(lambda: events(logs, "session.closed"))
    assert events(logs, "session.opened")[0]["proxy"] == "local"
    assert {entry["log_level"] for entry in logs} == {"debug"}


# -- refusals ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("header", "reason"), [
    (b"EHLO client.test\r\n", "PROXY unrecognized signature"),
    (b"PROXY TCP4 203.0.113.7 192.0.2.1 40000\r\n", "PROXY exception"),
    (b"PROXY TCP4 203.0.113.999 192.0.2.1 40000 587\r\n", "PROXYv1 address malformed"),
    (b"PROXY TCP4 2001:db8::7 192.0.2.1 40000 587\r\n", "PROXYv1 address not IPv4"),
    (b"PROXY TCP4 203.0.113.7 192.0.2.1 99999 587\r\n", "PROXYv1 src port out of bounds"),
    (b"PROXY TCP4 203.0.113.7 192.0.2.1 40000 587 extra\r\n", "PROXYv1 unrecognized extraneous"),
    (b"PROXY UDP4 203.0.113.7 192.0.2.1 40000 587\r\n", "PROXYv1 unrecognized protocol"),
    (b"PROXY TCP4 " + b"1" * 120 + b"\r\n", "PROXYv1 header too long"),
    (b"PROXY TCP4 203.0.113.7 192.0.2.1 40000 587\n", "PROXYv1 malformed"),
    (v2(version=1), "PROXYv2 illegal version"),
    (v2(command=0x7), "PROXYv2 unsupported command"),
    (v2(family=0x5), "PROXYv2 unsupported family"),
    (v2(length=4), "PROXYv2 truncated address"),
    (b"\r\n\r\n\x00\r\nQUIX\n" + v2()[12:], "PROXYv2 wrong signature"),
    (v2(proto=DGRAM), "not a TCP connection"),
    (v2(family=UNIX), "unsupported address family"),
], ids=["smtp-instead", "v1-missing-port", "v1-bad-ip", "v1-ipv6-as-tcp4", "v1-port-range",
        "v1-extra-field", "v1-udp", "v1-too-long", "v1-bare-lf", "v2-version", "v2-command",
        "v2-family", "v2-truncated", "v2-signature", "v2-udp", "v2-unix"])
async def test_proxy_malformed_header_is_refused(make_relay, upstream, header: bytes,
                                                 reason: str):
    """A trusted balancer's malformed or unusable header closes the connection before any
    greeting, with a proxy.refused warning naming the reason; the relay keeps serving."""
    app = await proxied_relay(make_relay, upstream)
    with capture_logs() as logs:
        raw = await RawSMTP.connect(app.port, header)
        try:
            assert await raw.rest() == b""
        finally:
            await raw.close()
        await wait_for(lambda: events(logs, "proxy.refused"))
    refused = events(logs, "proxy.refused")
    assert len(refused) == 1 and refused[0]["log_level"] == "warning"
    assert refused[0]["reason"].startswith(reason), refused[0]["reason"]
    assert refused[0]["peer"] == "127.0.0.1"
    assert not events(logs, "session.opened")
    # Still serving: a good header is greeted.
    raw = await RawSMTP.connect(app.port, v1())
    try:
        assert (await raw.reply()).startswith("220 ")
    finally:
        await raw.close()


async def test_proxy_untrusted_peer_is_refused(make_relay, upstream):
    """With PROXY on, a peer outside trusted_proxies is greeted with 421 4.7.0 and closed (it
    could claim any address in a header), with a proxy.untrusted warning; an SMTP client
    sees the refusal as a connect error."""
    app = await proxied_relay(make_relay, upstream, trusted="10.0.0.0/8")
    with capture_logs() as logs:
        raw = await RawSMTP.connect(app.port)
        try:
            assert await raw.rest() == b"421 4.7.0 Connection not accepted from this address\r\n"
        finally:
            await raw.close()
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=app.port, start_tls=False,
                                 timeout=10)
        with pytest.raises(aiosmtplib.SMTPConnectResponseError) as refused:
            await client.connect()
        assert refused.value.code == 421
    untrusted = events(logs, "proxy.untrusted")
    assert len(untrusted) == 2
    assert {(entry["peer"], entry["log_level"], entry["smtp_code"]) for entry in untrusted} == \
        {("127.0.0.1", "warning", 421)}
    assert not events(logs, "session.opened")
    assert upstream.handler.connections == 0


async def test_proxy_header_missing_times_out(make_relay):
    """A trusted peer that sends no header is cut after proxy_protocol_timeout, without a
    greeting, with a proxy.refused warning."""
    app = await proxied_relay(make_relay, proxy_protocol_timeout=0.3)
    with capture_logs() as logs:
        raw = await RawSMTP.connect(app.port)
        try:
            assert await raw.rest() == b""
        finally:
            await raw.close()
        await wait_for(lambda: events(logs, "proxy.refused"))
    (refused,) = events(logs, "proxy.refused")
    assert refused["reason"] == "no PROXY header in time" and refused["log_level"] == "warning"


async def test_proxy_header_cut_short_is_refused(make_relay):
    """A connection closed in the middle of a header is logged as refused."""
    app = await proxied_relay(make_relay)
    with capture_logs() as logs:
        raw = await RawSMTP.connect(app.port, v2()[:14])
        await raw.close()
        await wait_for(lambda: events(logs, "proxy.refused"))
    (refused,) = events(logs, "proxy.refused")
    assert refused["reason"] == "connection closed inside the PROXY header"


async def test_proxy_connect_and_close_is_a_quiet_health_check(make_relay):
    """A balancer's plain TCP check (connect, close, no byte) logs only at debug."""
    app = await proxied_relay(make_relay)
    with capture_logs() as logs:
        raw = await RawSMTP.connect(app.port)
        await raw.close()
        await wait_for(lambda: events(logs, "proxy.closed_without_header"))
    assert {entry["log_level"] for entry in logs} == {"debug"}


async def test_proxy_limits_count_the_real_client(make_relay, upstream):
    """Per-address connection limits apply to the address in the header, not the balancer's:
    a second connection for the same client is refused, another client's is served."""
    app = await proxied_relay(make_relay, upstream, max_connections_per_ip=1)
    first = await RawSMTP.connect(app.port, v1())
    try:
        assert (await first.reply()).startswith("220 ")
        with capture_logs() as logs:
            second = await RawSMTP.connect(app.port, v1())
            try:
                assert await second.rest() == \
                    b"421 4.7.0 Too many connections from your address, try again later\r\n"
            finally:
                await second.close()
        (refused,) = events(logs, "session.refused")
        assert (refused["peer"], refused["proxy"], refused["scope"]) == (CLIENT, "127.0.0.1",
                                                                         "ip")
        other = await RawSMTP.connect(app.port, v1(src="198.51.100.1"))
        try:
            assert (await other.reply()).startswith("220 ")
        finally:
            await other.close()
    finally:
        await first.close()
