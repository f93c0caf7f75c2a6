"""Where the shared Redis is: one server, a Sentinel-managed master, or a Redis Cluster
(STYLE §5). ``RELAY_REDIS_URL`` names it; this module reads the URL into a ``RedisTarget``
that ``store.connect_redis`` turns into redis-py's own client for that topology.

Forms (``rediss…`` for TLS everywhere; ``user:password@`` is optional, as in ``redis://``)::

    redis://[[user]:password@]host[:port][/db]      one server (redis-py's own URL syntax,
    rediss://…   unix:///path/redis.sock?db=0        including its query parameters)
    redis+sentinel://[[user]:password@]host[:port][,host[:port]…]/service[/db][?options]
    redis+cluster://[[user]:password@]host[:port][,host[:port]…][?options]

The hosts of a Sentinel URL are the sentinels (default port 26379); the service is the
name the sentinels monitor (``sentinel monitor <service> …``), and the user and password
are the master's. The hosts of a Cluster URL are any reachable nodes (default port 6379),
used only to discover the others. Options (query parameters): ``sentinel_username`` and
``sentinel_password`` (Sentinel only: the sentinels' own AUTH), and with ``rediss+…``
``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``, ``ssl_cert_reqs`` (required, optional,
none) and ``ssl_check_hostname`` (true/false). Anything else is refused by name.

Error messages never repeat the URL: it may hold a password.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from urllib.parse import parse_qsl, unquote, urlsplit

SERVER = "server"
SENTINEL = "sentinel"
CLUSTER = "cluster"

_SCHEMES = {
    "redis": (SERVER, False), "rediss": (SERVER, True), "unix": (SERVER, False),
    "redis+sentinel": (SENTINEL, False), "rediss+sentinel": (SENTINEL, True),
    "redis+cluster": (CLUSTER, False), "rediss+cluster": (CLUSTER, True),
}
_DEFAULT_PORT = {SENTINEL: 26379, CLUSTER: 6379}
_TLS_OPTIONS = {"ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs",
                "ssl_check_hostname"}
_SENTINEL_OPTIONS = {"sentinel_username", "sentinel_password"}
_HOST = re.compile(r"^[A-Za-z0-9._-]+$")
_SERVICE = re.compile(r"^[A-Za-z0-9._-]+$")


class RedisUrlError(ValueError):
    """``RELAY_REDIS_URL`` cannot be used; the message says why without echoing the URL."""


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """A parsed ``RELAY_REDIS_URL``. For ``server`` only ``url`` and ``tls`` matter: redis-py
    parses that form itself."""

    kind: str  # SERVER, SENTINEL or CLUSTER
    url: str = field(repr=False)
    tls: bool = False
    nodes: tuple[tuple[str, int], ...] = ()
    service: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)
    # ssl_* keyword arguments for redis-py (rediss+… only), already typed.
    tls_options: Mapping[str, object] = field(default_factory=dict)


def parse_redis_url(url: str) -> RedisTarget:
    """Read ``url`` (see the module docstring). Raises RedisUrlError."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise RedisUrlError("not a URL: expected scheme://…")
    scheme = scheme.lower()
    if scheme not in _SCHEMES:
        raise RedisUrlError(f"scheme must be one of {', '.join(_SCHEMES)}, got {scheme!r}")
    kind, tls = _SCHEMES[scheme]
    if kind == SERVER:
        try:
            urlsplit(url)
        except ValueError:
            raise RedisUrlError("not a valid URL") from None
        # redis-py's from_url reads this form (and its query parameters) itself.
        return RedisTarget(SERVER, url, tls=tls)

    rest, _, query = rest.partition("?")
    if "#" in query or "#" in rest:
        raise RedisUrlError("a fragment (#…) has no meaning in a Redis URL")
    netloc, _, path = rest.partition("/")
    userinfo, at, hostlist = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) or None
        if not colon:
            # redis://secret@host is read by redis-py as a user name, which surprises
            # everyone: ask for the explicit form.
            raise RedisUrlError("credentials must be written user:password@ or :password@")
    nodes = tuple(_node(item, position, _DEFAULT_PORT[kind])
                  for position, item in enumerate(hostlist.split(","), start=1))

    service: str | None = None
    db = 0
    segments = [unquote(s) for s in path.split("/")] if path else []
    if kind == SENTINEL:
        if not segments or not segments[0]:
            raise RedisUrlError("a Sentinel URL needs the monitored service name as its path: "
                                "redis+sentinel://host:26379,host:26379/mymaster")
        service = segments[0]
        if not _SERVICE.match(service):
            raise RedisUrlError("the Sentinel service name may hold only letters, digits, "
                                "'.', '_' and '-'")
        db = _db(segments[1:])
    elif segments and any(segments):
        if _db(segments) != 0:
            raise RedisUrlError("Redis Cluster has only database 0; drop the /db from the URL")

    options = _options(query, kind, tls)
    sentinel_username = options.pop("sentinel_username", None)
    sentinel_password = options.pop("sentinel_password", None)
    return RedisTarget(kind, url, tls=tls, nodes=nodes, service=service, db=db,
                       username=username, password=password,
                       sentinel_username=_str_or_none(sentinel_username),
                       sentinel_password=_str_or_none(sentinel_password),
                       tls_options=MappingProxyType(options))


def _node(item: str, position: int, default_port: int) -> tuple[str, int]:
    # Errors say which entry, not what it holds: a mistyped URL can put a secret here.
    where = f"host {position} of the host list (host:port,host:port)"
    item = item.strip()
    if not item:
        raise RedisUrlError(f"{where} is empty")
    if item.startswith("["):
        host, bracket, port_text = item[1:].partition("]")
        if not bracket or not host or (port_text and not port_text.startswith(":")):
            raise RedisUrlError(f"{where}: expected [IPv6 address]:port")
        port_text = port_text[1:]
    else:
        host, _, port_text = item.partition(":")
        if not _HOST.match(host):
            raise RedisUrlError(f"{where}: not a host name or IPv4 address")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise RedisUrlError(f"{where}: the port must be a number from 1 to 65535")
    return host, int(port_text)


def _db(segments: list[str]) -> int:
    segments = [s for s in segments if s]
    if not segments:
        return 0
    if len(segments) > 1 or not segments[0].isdigit():
        raise RedisUrlError("the database must be a number (…/service/0)")
    return int(segments[0])


def _options(query: str, kind: str, tls: bool) -> dict[str, object]:
    known = _TLS_OPTIONS | (_SENTINEL_OPTIONS if kind == SENTINEL else set())
    options: dict[str, object] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name not in known:
            raise RedisUrlError(f"unknown option {name!r} for a {kind} URL; known: "
                                + ", ".join(sorted(known)))
        if name in _TLS_OPTIONS and not tls:
            raise RedisUrlError(f"option {name!r} needs TLS: use rediss+{kind}://")
        if name == "ssl_cert_reqs":
            if value not in {"required", "optional", "none"}:
                raise RedisUrlError("ssl_cert_reqs must be required, optional or none")
        elif name == "ssl_check_hostname":
            if value.lower() not in {"true", "false", "1", "0"}:
                raise RedisUrlError("ssl_check_hostname must be true or false")
            options[name] = value.lower() in {"true", "1"}
            continue
        options[name] = value
    return options


def _str_or_none(value: object) -> str | None:
    return str(value) if value else None
