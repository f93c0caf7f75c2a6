"""Settings: where things are and the secrets, read once into a frozen ``Settings`` (STYLE §5).

Sources, later ones winning: built-in defaults, an optional TOML file (``RELAY_CONFIG`` or
``--config``; keys are the variable names without ``RELAY_``, lower case), then ``RELAY_*``
environment variables. Unknown keys and bad values stop start-up with the source, the key
and the reason. What the business wants (plans, replies) lives in ``policies/`` instead.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from relay.period import UnknownTimeZoneError, zone
from relay.redisconf import CLUSTER, RedisUrlError, parse_redis_url

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class SettingsError(ValueError):
    """A setting is missing, unknown or malformed; the message names source and key."""


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


class SafeValueError(SettingsError):
    """A bad value whose message never repeats the value: shown even for a secret setting
    (an upstream URL holds a password)."""


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


_QUERY_PASSWORD = re.compile(r"([?&](?:sentinel_)?password=)[^&#]*", re.IGNORECASE)


def _mask_url(url: str | None) -> str | None:
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


@dataclass(frozen=True, slots=True)
class Settings:
    listen: Endpoint = Endpoint("127.0.0.1", 2525)
    smtps_listen: Endpoint | None = None
    redis_url: str | None = field(default=None, repr=False)
    upstream: UpstreamTarget | None = None
    state_dir: Path = Path(".relay-state")
    policies_dir: Path = Path("policies")
    allow_plaintext_auth: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    hostname: str = field(default_factory=socket.gethostname)
    default_tz: str = "UTC"
    max_message_size: int = 25 * 1024 * 1024
    max_recipients: int = 500
    idle_timeout: float = 300.0
    upstream_pool_size: int = 20
    upstream_timeout: float = 30.0
    upstream_tls_verify: bool = True
    upstream_ca_file: Path | None = None
    redis_timeout: float = 2.0
    redis_wait_replicas: int = 0
    log_format: str = "auto"
    log_level: str = "info"
    notify_webhook_url: str | None = None
    notify_webhook_secret: str | None = field(default=None, repr=False)
    admin_listen: Endpoint = Endpoint("127.0.0.1", 8025)
    admin_token: str | None = field(default=None, repr=False)
    timeline_webhook_url: str | None = None
    timeline_webhook_secret: str | None = field(default=None, repr=False)
    credentials_key: str | None = field(default=None, repr=False)
    # Lifecycle: seconds a SIGTERM waits for open transactions; worker processes of `serve`
    # (None: one per core); the event loop (auto: uvloop when it is installed).
    drain_timeout: float = 30.0
    workers: int | None = None
    event_loop: str = "auto"
    # PROXY protocol from trusted load balancers, and the client protections (relay/proxy.py,
    # relay/limits.py). Limits of 0 are off.
    proxy_protocol: bool = False
    trusted_proxies: tuple[IPNetwork, ...] = ()
    proxy_protocol_timeout: float = 10.0
    max_connections: int = 1000
    max_connections_per_ip: int = 200
    auth_max_failures_per_ip: int = 30
    auth_max_failures_per_login: int = 10
    auth_failure_window: float = 600.0
    transaction_timeout: float = 600.0
    # Seconds a TLS handshake (STARTTLS or the smtps listener) may take before the connection
    # is closed: a client sending anything but TLS must not hold it until the idle timeout.
    tls_handshake_timeout: float = 10.0
    # /metrics, /healthz and /readyz of serve and of the notifier; None = no listener.
    metrics_listen: Endpoint | None = Endpoint("127.0.0.1", 9465)
    notifier_metrics_listen: Endpoint | None = Endpoint("127.0.0.1", 9466)
    # RELAY_ROUTE_<NAME>_URL: the upstream of each route with upstream = "setting".
    route_urls: Mapping[str, UpstreamTarget] = field(default_factory=dict)

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if f.name != "redis_url")
        return f"Settings(redis_url={_mask_url(self.redis_url)!r}, {shown})"

    @property
    def capture_dir(self) -> Path:
        """Where the development default delivers mail when no upstream is configured."""
        return self.state_dir / "capture"


def _bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"expected a boolean (1/0, true/false), got {value!r}")


def _positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise ValueError(f"must be a positive integer, got {number}")
    return number


def _non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError(f"must be 0 (off) or a positive integer, got {number}")
    return number


def _networks(value: str) -> tuple[IPNetwork, ...]:
    """Comma- or space-separated addresses and CIDR networks (``10.0.0.0/8, 192.0.2.7``)."""
    found: list[IPNetwork] = []
    for item in value.replace(",", " ").split():
        try:
            found.append(ipaddress.ip_network(item))
        except ValueError as exc:
            # ip_network's own message ("... has host bits set") names the mistake.
            raise ValueError(f"not an address or CIDR network: {exc}") from None
    return tuple(found)


def _positive_float(value: str) -> float:
    number = float(value)
    if number <= 0:
        raise ValueError(f"must be a positive number, got {number}")
    return number


def _non_negative_float(value: str) -> float:
    number = float(value)
    if not number >= 0 or number == float("inf"):  # also refuses nan
        raise ValueError(f"must be a number of seconds, 0 or more, got {value!r}")
    return number


def _workers(value: str) -> int | None:
    if value.strip().lower() == "auto":
        return None
    return _positive_int(value)


def _choice(*allowed: str) -> Any:
    def parse(value: str) -> str:
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}, got {value!r}")
        return value
    return parse


def _tz(value: str) -> str:
    try:
        zone(value)
    except UnknownTimeZoneError as exc:
        raise ValueError(str(exc)) from exc
    return value


def _hostname(value: str) -> str:
    # ASCII only: the name goes into the banner and the Received: header, which are ASCII.
    if not value or any(not 32 < ord(c) < 127 for c in value):
        raise ValueError(f"not a valid host name: {value!r}")
    return value


def _http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ValueError(f"expected an http:// or https:// URL, got {value!r}")
    return value


def _secret(value: str) -> str:
    # Short secrets are guessable: a signing key or bearer token needs real entropy.
    if len(value) < 16:
        raise SafeValueError(f"must be at least 16 characters (this one has {len(value)}); "
                             "e.g. the output of: python -c 'import secrets; "
                             "print(secrets.token_urlsafe(32))'")
    return value


def _optional_endpoint(value: str) -> Endpoint | None:
    # An empty value turns the listener off.
    return parse_endpoint(value) if value.strip() else None


def _fernet_key(value: str) -> str:
    try:
        raw = base64.urlsafe_b64decode(value.encode())
    except (ValueError, binascii.Error):
        raw = b""
    if len(raw) != 32:
        raise SafeValueError("must be a Fernet key: 32 bytes, url-safe base64 "
                         "(python -c 'from cryptography.fernet import Fernet; "
                         "print(Fernet.generate_key().decode())')")
    return value


# name -> parser from text. Every key a TOML file or the environment may set.
_PARSERS: dict[str, Any] = {
    "listen": parse_endpoint,
    "smtps_listen": parse_endpoint,
    "redis_url": str,
    "upstream_url": parse_upstream_url,
    "state_dir": Path,
    "policies_dir": Path,
    "allow_plaintext_auth": _bool,
    "tls_cert": Path,
    "tls_key": Path,
    "hostname": _hostname,
    "default_tz": _tz,
    "max_message_size": _positive_int,
    "max_recipients": _positive_int,
    "idle_timeout": _positive_float,
    "upstream_pool_size": _positive_int,
    "upstream_timeout": _positive_float,
    "upstream_tls_verify": _bool,
    "upstream_ca_file": Path,
    "redis_timeout": _positive_float,
    "redis_wait_replicas": _non_negative_int,
    "log_format": _choice("auto", "json", "console"),
    "log_level": _choice("debug", "info", "warning", "error"),
    "notify_webhook_url": _http_url,
    "notify_webhook_secret": _secret,
    "admin_listen": parse_endpoint,
    "admin_token": _secret,
    "timeline_webhook_url": _http_url,
    "timeline_webhook_secret": _secret,
    "credentials_key": _fernet_key,
    "drain_timeout": _non_negative_float,
    "workers": _workers,
    "event_loop": _choice("auto", "asyncio", "uvloop"),
    "proxy_protocol": _bool,
    "trusted_proxies": _networks,
    "proxy_protocol_timeout": _positive_float,
    "max_connections": _non_negative_int,
    "max_connections_per_ip": _non_negative_int,
    "auth_max_failures_per_ip": _non_negative_int,
    "auth_max_failures_per_login": _non_negative_int,
    "auth_failure_window": _positive_float,
    "transaction_timeout": _positive_float,
    "tls_handshake_timeout": _positive_float,
    "metrics_listen": _optional_endpoint,
    "notifier_metrics_listen": _optional_endpoint,
}
# Settings that hold secrets: never echoed back in an error message.
_SECRET = {"redis_url", "upstream_url", "notify_webhook_secret", "admin_token",
           "timeline_webhook_secret", "credentials_key"}
# route_<name>_url: one per route whose upstream is a setting (names as in routing.toml).
_ROUTE_URL = re.compile(r"^route_([a-z][a-z0-9_-]*)_url$")


def _parse(name: str, raw: object, source: str) -> object:
    text = str(raw).lower() if isinstance(raw, bool) else str(raw)
    try:
        return _PARSERS[name](text)
    except (ValueError, SettingsError) as exc:
        # A secret's own parser says what is wrong without repeating it (SafeValueError);
        # any other message about a secret might quote it.
        detail = str(exc) if name not in _SECRET or isinstance(exc, SafeValueError) \
            else "invalid value"
        raise SettingsError(f"{source}: {name}: {detail}") from None


def load_settings(environ: Mapping[str, str] | None = None,
                  config_file: Path | None = None) -> Settings:
    """Read settings once. Raises SettingsError naming the source and key of a bad value."""
    env = os.environ if environ is None else environ
    values: dict[str, object] = {}
    routes: dict[str, object] = {}

    path = config_file or (Path(env["RELAY_CONFIG"]) if env.get("RELAY_CONFIG") else None)
    if path is not None:
        try:
            document = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise SettingsError(f"{path}: cannot read: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"{path}: {exc}") from None
        for key, raw in document.items():
            route = _ROUTE_URL.match(key)
            if route:
                routes[route.group(1)] = _parse("upstream_url", raw, str(path))
                continue
            if key not in _PARSERS:
                raise SettingsError(f"{path}: {key}: unknown setting")
            if isinstance(raw, dict | list):
                raise SettingsError(f"{path}: {key}: expected a single value")
            values[key] = _parse(key, raw, str(path))

    for var, raw in env.items():
        if not var.startswith("RELAY_") or var == "RELAY_CONFIG":
            continue
        key = var.removeprefix("RELAY_").lower()
        route = _ROUTE_URL.match(key)
        if route:
            if raw:
                routes[route.group(1)] = _parse("upstream_url", raw, f"environment: {var}")
            continue
        if key not in _PARSERS:
            # Test-only variables live under RELAY_TEST_; anything else is a typo.
            if key.startswith("test_"):
                continue
            raise SettingsError(f"environment: {var}: unknown setting")
        if raw == "" and key not in {"allow_plaintext_auth", "metrics_listen",
                                     "notifier_metrics_listen"}:
            continue
        values[key] = _parse(key, raw, "environment")

    if "upstream_url" in values:
        values["upstream"] = values.pop("upstream_url")
    values["route_urls"] = routes
    try:
        settings = Settings(**values)  # type: ignore[arg-type]
    except TypeError as exc:  # pragma: no cover - _PARSERS and Settings disagree
        raise SettingsError(str(exc)) from None
    return _checked(settings)


def _checked(settings: Settings) -> Settings:
    if settings.allow_plaintext_auth and not settings.listen.is_loopback:
        raise SettingsError(
            f"allow_plaintext_auth: refused because listen {settings.listen} is not a loopback "
            "address; AUTH without TLS is only for development on 127.0.0.1 or ::1")
    if (settings.tls_cert is None) != (settings.tls_key is None):
        raise SettingsError("tls_cert, tls_key: set both or neither")
    if (settings.notify_webhook_url is None) != (settings.notify_webhook_secret is None):
        raise SettingsError("notify_webhook_url, notify_webhook_secret: set both or neither")
    if (settings.timeline_webhook_url is None) != (settings.timeline_webhook_secret is None):
        raise SettingsError("timeline_webhook_url, timeline_webhook_secret: set both or neither")
    if settings.proxy_protocol and not settings.trusted_proxies:
        raise SettingsError("proxy_protocol: needs trusted_proxies, the load balancers' "
                            "addresses or networks (every other peer is refused)")
    if settings.trusted_proxies and not settings.proxy_protocol:
        raise SettingsError("trusted_proxies: set, but proxy_protocol is off; turn it on or "
                            "remove trusted_proxies")
    if settings.proxy_protocol and settings.smtps_listen is not None:
        # asyncio's TLS listener handshakes before the protocol sees a byte, but the PROXY
        # header comes first, in clear: the two cannot share a listener.
        raise SettingsError("proxy_protocol: not supported with smtps_listen (the PROXY header "
                            "precedes the TLS handshake); offer STARTTLS on listen only")
    if settings.redis_url is not None:
        try:
            target = parse_redis_url(settings.redis_url)
        except RedisUrlError as exc:
            # The message names the problem, never the URL: it may hold a secret.
            raise SettingsError(f"redis_url: {exc}") from None
        if settings.redis_wait_replicas and target.kind == CLUSTER:
            raise SettingsError(
                "redis_wait_replicas: not supported with redis+cluster:// (redis-py cannot "
                "run WAIT on the connection that made the write); set min-replicas-to-write "
                "on the cluster's masters instead (README, Scaling out)")
    elif settings.redis_wait_replicas:
        raise SettingsError("redis_wait_replicas: the embedded development Redis has no "
                            "replicas; set RELAY_REDIS_URL too")
    return settings
