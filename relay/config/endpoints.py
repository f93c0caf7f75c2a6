"""Where the relay listens and the upstream it sends to, parsed from their text forms
(``host:port``, ``smtp+starttls://user:password@host:587``).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from relay.config.parsers import SafeValueError, SettingsError


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        return self.host == "localhost" or ipaddress.ip_address(self.host).is_loopback


@dataclass(frozen=True, slots=True)
class UpstreamTarget:
    """Where allowed mail goes. ``tls`` is "none", "starttls" (required) or "implicit"."""

    host: str
    port: int
    tls: str
    username: str | None = field(default=None)
    password: str | None = field(default=None, repr=False)

    def __str__(self) -> str:
        scheme = {"none": "smtp", "starttls": "smtp+starttls", "implicit": "smtps"}[self.tls]
        user = f"{self.username}:***@" if self.username else ""
        return f"{scheme}://{user}{Endpoint(self.host, self.port)}"


_SCHEMES = {"smtp": ("none", 25), "smtp+starttls": ("starttls", 587), "smtps": ("implicit", 465)}
_SCHEME_NAME = re.compile(r"^[a-z][a-z0-9+.-]*$")
UPSTREAM_URL_EXAMPLE = ("smtp+starttls://user:password@smtp.example.com:587 (also smtps://…:465 "
                        "or smtp://host:25)")


def parse_upstream_url(url: str) -> UpstreamTarget:
    """``smtp+starttls://user:pass@host:587``, ``smtps://…`` or plain ``smtp://host:port``.

    Raises SafeValueError naming what is wrong, with a valid example; the message never
    repeats the URL (it may hold a password)."""
    example = f"; expected e.g. {UPSTREAM_URL_EXAMPLE}"
    scheme, sep, _ = url.partition("://")
    if not sep:
        raise SafeValueError("not a URL (no scheme:// at the start)" + example)
    if scheme not in _SCHEMES:
        named = f"{scheme!r} " if _SCHEME_NAME.match(scheme) else ""
        raise SafeValueError(f"scheme {named}is not one of {', '.join(_SCHEMES)}" + example)
    try:
        parts = urlsplit(url)
    except ValueError:
        raise SafeValueError("malformed host (an IPv6 address goes in [brackets])"
                             + example) from None
    if not parts.hostname:
        raise SafeValueError("no host after scheme://" + example)
    tls, default_port = _SCHEMES[scheme]
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise SafeValueError("the port must be a number from 1 to 65535" + example)
    port = port or default_port
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise SafeValueError("nothing may follow host:port (no path, ?query or #fragment)"
                             + example)
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    if (username is None) != (password is None):
        raise SafeValueError("needs both a user and a password (user:password@host), or "
                             "neither" + example)
    return UpstreamTarget(parts.hostname, port, tls, username, password)


def parse_endpoint(value: str) -> Endpoint:
    """``host:port`` or ``[v6]:port``; the host must be an IP literal (no DNS) or localhost."""
    host, sep, port_text = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise SettingsError(f"expected host:port, got {value!r}")
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError as exc:
            raise SettingsError(
                f"listen host must be an IP address or localhost (no DNS lookups), got {host!r}"
            ) from exc
    return Endpoint("127.0.0.1" if host == "localhost" else host, int(port_text))


def parse_optional_endpoint(value: str) -> Endpoint | None:
    # An empty value turns the listener off.
    return parse_endpoint(value) if value.strip() else None

