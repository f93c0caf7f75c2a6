"""PROXY protocol v1/v2 from trusted load balancers (STYLE §1 step 1, before the session).

Behind an L4 load balancer every connection comes from the balancer's address. With
``proxy_protocol`` on, aiosmtpd (``proxy_protocol_timeout``) reads the balancer's PROXY
header before the greeting and hands the parsed header to the ``handle_PROXY`` hook; this
module decides what the header means. ``relay/smtp/protocol.py`` then rebinds the
session's peer, so logs, connection limits, AUTH throttling and the ``Received:`` header
name the real client.

Only peers inside ``trusted_proxies`` may speak: anyone else could claim any address. The
rules, from the specification (haproxy ``doc/proxy-protocol.txt``):

- v1 ``TCP4``/``TCP6`` and v2 ``PROXY`` over TCP/IPv4 or IPv6: the client is the source.
- v1 ``UNKNOWN``, v2 ``LOCAL`` and v2 ``PROXY`` with an unspecified family: the balancer
  opened the connection itself (health checks do this); the receiver must accept it and use
  the real connection endpoints (spec §2.1 and §2.2).
- Anything else (UDP, Unix sockets, a malformed header) is refused.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from aiosmtpd.proxy_protocol import AF, PROTO, V2_CMD

from relay.config.parsers import IPNetwork


class ProxyHeaderError(ValueError):
    """A PROXY header that is valid on the wire but cannot name a TCP client."""


@dataclass(frozen=True, slots=True)
class ProxyPolicy:
    """Who may send PROXY headers, and how long to wait for one."""

    trusted: tuple[IPNetwork, ...]
    timeout: float

    def trusts(self, ip: str | None) -> bool:
        if ip is None:
            return False
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(address in network for network in self.trusted)


@dataclass(frozen=True, slots=True)
class ProxiedClient:
    """The real client, as the load balancer reported it."""

    ip: str
    port: int


def normalize_ip(ip: str) -> str:
    """``ip`` in canonical form; an IPv4-mapped IPv6 address (``::ffff:192.0.2.1``, seen on a
    dual-stack listener) as the IPv4 address it is."""
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def client_from_header(data: Any) -> ProxiedClient | None:
    """The client a valid aiosmtpd ``ProxyData`` names, or None when the balancer speaks for
    itself (v1 UNKNOWN, v2 LOCAL: keep the connection's own endpoints).

    Raises ProxyHeaderError for a header that names no TCP client (UDP, Unix sockets).
    """
    if data.version == 2 and data.command == V2_CMD.LOCAL:
        return None
    if data.family == AF.UNSPEC:
        return None
    if data.protocol != PROTO.STREAM:
        raise ProxyHeaderError("not a TCP connection")
    if data.family not in (AF.INET, AF.INET6) or data.src_addr is None:
        raise ProxyHeaderError("unsupported address family")
    return ProxiedClient(normalize_ip(str(data.src_addr)), int(data.src_port or 0))
