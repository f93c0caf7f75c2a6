"""PROXY protocol headers written by hand, good and malformed: v1's text line and v2's
binary header built field by field with struct (haproxy doc/proxy-protocol.txt)."""

from __future__ import annotations

import socket
import struct

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
LOCAL, PROXY = 0x0, 0x1
INET, INET6, UNIX = 0x1, 0x2, 0x3
STREAM, DGRAM = 0x1, 0x2
# The real client a balancer's header names (documentation addresses).
CLIENT = "203.0.113.7"
CLIENT6 = "2001:db8::7"


def v1(family: str = "TCP4", src: str = CLIENT, dst: str = "192.0.2.1", sport: int = 40000,
       dport: int = 587) -> bytes:
    return f"PROXY {family} {src} {dst} {sport} {dport}\r\n".encode()


def v2(command: int = PROXY, family: int = INET, proto: int = STREAM, src: str = CLIENT,
       dst: str = "192.0.2.1", sport: int = 40000, dport: int = 587, tlv: bytes = b"",
       version: int = 2, length: int | None = None) -> bytes:
    """A PROXY v2 header (haproxy doc/proxy-protocol.txt §2.2), field by field."""
    if family == INET:
        body = socket.inet_pton(socket.AF_INET, src) + socket.inet_pton(socket.AF_INET, dst)
        body += struct.pack("!HH", sport, dport)
    elif family == INET6:
        body = socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst)
        body += struct.pack("!HH", sport, dport)
    elif family == UNIX:
        body = b"/run/client.sock".ljust(108, b"\0") + b"/run/relay.sock".ljust(108, b"\0")
    else:
        body = b""
    body += tlv
    return (V2_SIGNATURE + bytes([(version << 4) | command, (family << 4) | proto])
            + struct.pack("!H", len(body) if length is None else length) + body)


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value
