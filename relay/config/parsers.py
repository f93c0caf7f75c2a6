"""The value parsers of the settings: one function per kind of value, each raising
``SettingsError`` with a message an operator can act on, and URL masking for ``repr``.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from typing import Any
from urllib.parse import urlsplit

from relay.config.zones import UnknownTimeZoneError, zone

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class SettingsError(ValueError):
    """A setting is missing, unknown or malformed; the message names source and key."""


class SafeValueError(SettingsError):
    """A bad value whose message never repeats the value: shown even for a secret setting
    (an upstream URL holds a password)."""


_QUERY_PASSWORD = re.compile(r"([?&](?:sentinel_)?password=)[^&#]*", re.IGNORECASE)


def mask_url(url: str | None) -> str | None:
    if url is None:
        return None
    try:
        parts = urlsplit(url)
    except ValueError:
        return "***"
    if parts.password is not None:
        url = url.replace(f":{parts.password}@", ":***@", 1)
    # redis-py also takes the password as a query parameter (?password=…), and a Sentinel
    # URL the sentinels' own (?sentinel_password=…).
    return _QUERY_PASSWORD.sub(r"\1***", url)


def parse_bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"expected a boolean (1/0, true/false), got {value!r}")


def parse_positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise ValueError(f"must be a positive integer, got {number}")
    return number


def parse_non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError(f"must be 0 (off) or a positive integer, got {number}")
    return number


def parse_networks(value: str) -> tuple[IPNetwork, ...]:
    """Comma- or space-separated addresses and CIDR networks (``10.0.0.0/8, 192.0.2.7``)."""
    found: list[IPNetwork] = []
    for item in value.replace(",", " ").split():
        try:
            found.append(ipaddress.ip_network(item))
        except ValueError as exc:
            # ip_network's own message ("... has host bits set") names the mistake.
            raise ValueError(f"not an address or CIDR network: {exc}") from None
    return tuple(found)


def parse_positive_float(value: str) -> float:
    number = float(value)
    if number <= 0:
        raise ValueError(f"must be a positive number, got {number}")
    return number


def parse_non_negative_float(value: str) -> float:
    number = float(value)
    if not number >= 0 or number == float("inf"):  # also refuses nan
        raise ValueError(f"must be a number of seconds, 0 or more, got {value!r}")
    return number


def parse_workers(value: str) -> int | None:
    if value.strip().lower() == "auto":
        return None
    return parse_positive_int(value)


def parse_choice(*allowed: str) -> Any:
    def parse(value: str) -> str:
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}, got {value!r}")
        return value
    return parse


def parse_time_zone(value: str) -> str:
    try:
        zone(value)
    except UnknownTimeZoneError as exc:
        raise ValueError(str(exc)) from exc
    return value


def parse_hostname(value: str) -> str:
    # ASCII only: the name goes into the banner and the Received: header, which are ASCII.
    if not value or any(not 32 < ord(c) < 127 for c in value):
        raise ValueError(f"not a valid host name: {value!r}")
    return value


def parse_http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ValueError(f"expected an http:// or https:// URL, got {value!r}")
    return value


def parse_base_url(value: str) -> str:
    """An http(s) URL that paths are appended to: no query or fragment, no trailing slash,
    printable ASCII only (it goes into message headers as is)."""
    parse_http_url(value)
    parts = urlsplit(value)
    if parts.query or parts.fragment or not all(" " < c <= "~" for c in value) \
            or any(c in value for c in '<>"'):
        raise ValueError(f"expected a base URL (no query, fragment, spaces or <>\"), "
                         f"got {value!r}")
    return value.rstrip("/")


def parse_secret(value: str) -> str:
    # Short secrets are guessable: a signing key or bearer token needs real entropy.
    if len(value) < 16:
        raise SafeValueError(f"must be at least 16 characters (this one has {len(value)}); "
                             "e.g. the output of: python -c 'import secrets; "
                             "print(secrets.token_urlsafe(32))'")
    return value


def parse_fernet_key(value: str) -> str:
    try:
        raw = base64.urlsafe_b64decode(value.encode())
    except (ValueError, binascii.Error):
        raw = b""
    if len(raw) != 32:
        raise SafeValueError("must be a Fernet key: 32 bytes, url-safe base64 "
                         "(python -c 'from cryptography.fernet import Fernet; "
                         "print(Fernet.generate_key().decode())')")
    return value

