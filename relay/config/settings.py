"""Settings: where things are and the secrets, read once into a frozen ``Settings`` (STYLE §5).

Sources, later ones winning: built-in defaults, an optional TOML file (``RELAY_CONFIG`` or
``--config``; keys are the variable names without ``RELAY_``, lower case), then ``RELAY_*``
environment variables. Unknown keys and bad values stop start-up with the source, the key
and the reason. What the business wants (plans, replies) lives in ``policies/`` instead.
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from relay.config.endpoints import (
    Endpoint,
    UpstreamTarget,
    parse_endpoint,
    parse_optional_endpoint,
    parse_upstream_url,
)
from relay.config.parsers import (
    IPNetwork,
    SafeValueError,
    SettingsError,
    mask_url,
    parse_bool,
    parse_choice,
    parse_fernet_key,
    parse_hostname,
    parse_http_url,
    parse_networks,
    parse_non_negative_float,
    parse_non_negative_int,
    parse_positive_float,
    parse_positive_int,
    parse_secret,
    parse_time_zone,
    parse_workers,
)
from relay.store.urls import CLUSTER, RedisUrlError, parse_redis_url


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
    # PROXY protocol from trusted load balancers, and the client protections (relay/smtp/proxy.py,
    # relay/identity/throttle.py). Limits of 0 are off.
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
        return f"Settings(redis_url={mask_url(self.redis_url)!r}, {shown})"

    @property
    def capture_dir(self) -> Path:
        """Where the development default delivers mail when no upstream is configured."""
        return self.state_dir / "capture"


# name -> parser from text. Every key a TOML file or the environment may set.
_PARSERS: dict[str, Any] = {
    "listen": parse_endpoint,
    "smtps_listen": parse_endpoint,
    "redis_url": str,
    "upstream_url": parse_upstream_url,
    "state_dir": Path,
    "policies_dir": Path,
    "allow_plaintext_auth": parse_bool,
    "tls_cert": Path,
    "tls_key": Path,
    "hostname": parse_hostname,
    "default_tz": parse_time_zone,
    "max_message_size": parse_positive_int,
    "max_recipients": parse_positive_int,
    "idle_timeout": parse_positive_float,
    "upstream_pool_size": parse_positive_int,
    "upstream_timeout": parse_positive_float,
    "upstream_tls_verify": parse_bool,
    "upstream_ca_file": Path,
    "redis_timeout": parse_positive_float,
    "redis_wait_replicas": parse_non_negative_int,
    "log_format": parse_choice("auto", "json", "console"),
    "log_level": parse_choice("debug", "info", "warning", "error"),
    "notify_webhook_url": parse_http_url,
    "notify_webhook_secret": parse_secret,
    "admin_listen": parse_endpoint,
    "admin_token": parse_secret,
    "timeline_webhook_url": parse_http_url,
    "timeline_webhook_secret": parse_secret,
    "credentials_key": parse_fernet_key,
    "drain_timeout": parse_non_negative_float,
    "workers": parse_workers,
    "event_loop": parse_choice("auto", "asyncio", "uvloop"),
    "proxy_protocol": parse_bool,
    "trusted_proxies": parse_networks,
    "proxy_protocol_timeout": parse_positive_float,
    "max_connections": parse_non_negative_int,
    "max_connections_per_ip": parse_non_negative_int,
    "auth_max_failures_per_ip": parse_non_negative_int,
    "auth_max_failures_per_login": parse_non_negative_int,
    "auth_failure_window": parse_positive_float,
    "transaction_timeout": parse_positive_float,
    "tls_handshake_timeout": parse_positive_float,
    "metrics_listen": parse_optional_endpoint,
    "notifier_metrics_listen": parse_optional_endpoint,
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
