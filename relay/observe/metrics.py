"""Prometheus metrics of the relay and of the notifier (STYLE §1 step 9, §7): every metric is
defined here and nowhere else.

Names follow the Prometheus conventions: the ``relay_`` prefix, ``_total`` on counters, base
units in the name (``_seconds``, ``_bytes``). Labels reuse the log field names (``outcome``,
``route``, ``reason``, ``event_kind``, ``channel``) and take their values from small fixed sets:
route and pool names from ``routing.toml``, exception class names, reply classes. Never a user,
a login or an address, so the number of series stays bounded whatever the traffic.

Each ``RelayApp`` (and each notifier) owns a ``CollectorRegistry`` of its own rather than the
library's global one, so several relays in one process (the tests) never share a counter.

The hot path never calls ``.labels()``: that call validates, converts and locks. The children
of known label values are created once at start-up (which also exports them as 0 from the
first scrape, so ``rate()`` and ``increase()`` see the first event), and any other value's
child is created on first use and kept (``Children``).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from importlib.metadata import PackageNotFoundError, version
from typing import Generic, Protocol, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from relay.config.policies import EVENT_KINDS
from relay.config.shadow import KINDS as SHADOW_KINDS

# ``<name>_created`` series (one per labelled child, giving its creation time) would double
# the series count for nothing an operator asks of this relay. Process-wide, like the flag.
disable_created_metrics()  # type: ignore[no-untyped-call]

# A child beyond this many per metric means a label value is not from a fixed set (a bug):
# such values share one "other" child instead of growing the series count without bound.
MAX_CHILDREN = 500
OVERFLOW = "other"

LISTENERS = ("starttls", "smtps")
AUTH_MECHANISMS = ("PLAIN", "LOGIN")
AUTH_RESULTS = ("succeeded", "failed", "unavailable", "malformed")
OUTCOMES = ("delivered", "deferred", "failed", "rejected", "abandoned", "duplicate")
RESERVE_RESULTS = ("reserved", "over_limit", "already_reserved", "user_disabled",
                   "user_missing", "unknown_plan", "error")
REDIS_STEPS = ("resolve_sender", "reserve", "commit", "refund", "tally", "publish", "claim",
               "conclude")
UPSTREAM_STEPS = ("connect", "mail", "rcpt", "data")
REPLY_CLASSES = ("2xx", "4xx", "5xx", "error")
NOTIFY_OUTCOMES = ("delivered", "dead_lettered")
# smtp/transaction.py's _log_unreconciled reasons: its own, and the abort reasons of the
# protocol (smtp/protocol.py).
UNRECONCILED_REASONS = ("upstream_no_reply", "commit_failed", "refund_failed", "reset",
                        "disconnect", "cancelled")
# relay/smtp/unsubscribe.py: the policies that look at the headers, the headers looked for,
# and what "adds" did (added; kept: the message had its own List-Unsubscribe; dkim_signed:
# an existing signature covers the absent headers, so none was added).
UNSUBSCRIBE_POLICIES = ("checks", "refuses", "adds")
UNSUBSCRIBE_HEADERS = ("List-Unsubscribe", "List-Unsubscribe-Post")
UNSUBSCRIBE_ADDED = ("added", "kept", "dkim_signed")

# Buckets in seconds (bytes for sizes), chosen around what each step costs on loopback and in
# production: Redis in well under a millisecond, an upstream command in milliseconds to
# seconds, a whole SMTP transaction up to the idle timeout.
REDIS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
UPSTREAM_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0)
TRANSACTION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                       60.0, 300.0)
NOTIFY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SIZE_BUCKETS = (1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0,
                16777216.0, 33554432.0)

M = TypeVar("M", Counter, Gauge, Histogram)


class Children(Generic[M]):
    """Label values -> the metric's child, created once and kept (see the module docstring)."""

    __slots__ = ("_children", "_metric")
    _metric: M
    _children: dict[tuple[str, ...], M]

    def __init__(self, metric: M, initial: Iterable[tuple[str, ...]] = ()) -> None:
        self._metric = metric
        self._children = {}
        for values in initial:
            self._add(values)

    def __call__(self, *values: str) -> M:
        try:
            return self._children[values]
        except KeyError:
            return self._add(values)

    def _add(self, values: tuple[str, ...]) -> M:
        if len(self._children) >= MAX_CHILDREN:
            values = (OVERFLOW,) * len(values)
            if values in self._children:
                return self._children[values]
        child = self._children[values] = self._metric.labels(*values)
        return child


def _product(*sets: Iterable[str]) -> list[tuple[str, ...]]:
    combos: list[tuple[str, ...]] = [()]
    for values in sets:
        combos = [(*combo, value) for combo in combos for value in values]
    return combos


def _registry() -> CollectorRegistry:
    """A registry of its own, with the process, platform and GC metrics every Python exporter
    has (``process_resident_memory_bytes``, ``process_cpu_seconds_total``…)."""
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    try:
        release = version("command-email-relay")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        release = "unknown"
    Info("relay_build", "The relay's version.", registry=registry).info({"version": release})
    return registry


class HealthGauges:
    """What /readyz found at the last probe or scrape (shared by the relay and the notifier)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.ready = Gauge("relay_ready", "1 when /readyz answers 200 (Redis reachable, upstream "
                           "reachable, not draining), else 0.", registry=registry)
        self.redis_up = Gauge("relay_redis_up", "1 when Redis answered PING at the last probe "
                              "or scrape, else 0.", registry=registry)
        self.draining = Gauge("relay_draining", "1 while the process drains before stopping.",
                              registry=registry)


# -- the relay ------------------------------------------------------------------------------
class PoolStats(Protocol):
    """What an upstream connection pool tells the scrape about itself."""

    pool: str
    size: int

    @property
    def busy(self) -> int: ...

    @property
    def idle(self) -> int: ...


class _PoolCollector:
    """Pool gauges read at scrape time from the live pools: nothing to keep up to date on the
    hot path, and per-user pools (one per user's credentials) add up under their route."""

    def __init__(self) -> None:
        self.pools: weakref.WeakSet[PoolStats] = weakref.WeakSet()

    def collect(self) -> Iterable[Metric]:
        connections = GaugeMetricFamily(
            "relay_upstream_pool_connections",
            "Upstream connections, by pool and state (busy: carrying a transaction; idle: "
            "kept open for the next one).", labels=["pool", "state"])
        size = GaugeMetricFamily("relay_upstream_pool_size",
                                 "Most upstream connections the pool may open.",
                                 labels=["pool"])
        count = GaugeMetricFamily("relay_upstream_pools",
                                  "Connection pools open (one per user's credentials on "
                                  "routes that log in as the user).", labels=["pool"])
        totals: dict[str, list[int]] = {}
        for stats in list(self.pools):
            entry = totals.setdefault(stats.pool, [0, 0, 0, 0])
            entry[0] += stats.busy
            entry[1] += stats.idle
            entry[2] += stats.size
            entry[3] += 1
        for pool, (busy, idle, most, pools) in sorted(totals.items()):
            connections.add_metric([pool, "busy"], busy)
            connections.add_metric([pool, "idle"], idle)
            size.add_metric([pool], most)
            count.add_metric([pool], pools)
        return [connections, size, count]


class UpstreamMetrics:
    """The children of one pool label (``default``, or a route with its own upstream)."""

    __slots__ = ("duration", "pool", "pool_timeouts", "replies", "track", "up")

    def __init__(self, pool: str, replies: Children[Counter], duration: Children[Histogram],
                 pool_timeouts: Children[Counter], track: Callable[[PoolStats], None],
                 up: Children[Gauge]) -> None:
        self.pool = pool
        self.pool_timeouts = pool_timeouts(pool)
        # relay_upstream_up{pool}: set by every connection attempt of the pool's upstreams
        # (a route's per-user pools share their route's label), not only by /readyz.
        self.up = up(pool)
        # step -> reply class -> child, and step -> child: plain dict lookups on the hot path.
        self.replies = {step: {cls: replies(pool, step, cls) for cls in REPLY_CLASSES}
                        for step in UPSTREAM_STEPS}
        self.duration = {step: duration(pool, step) for step in UPSTREAM_STEPS}
        self.track = track


class RelayMetrics:
    """Every metric of the SMTP relay, in one registry."""

    def __init__(self, *, routes: Iterable[str] = ("command",),
                 pools: Iterable[str] = ("default",),
                 failovers: Iterable[tuple[str, str]] = ()) -> None:
        self.registry = r = _registry()
        routes = [*routes, "none"]
        self.health = HealthGauges(r)
        self.upstream_up = Children(Gauge(
            "relay_upstream_up", "1 when the last connection to the upstream succeeded, else 0 "
            "(retried in the background at most every few seconds while down).", ["pool"],
            registry=r))

        self.connections = Children(Counter(
            "relay_connections_total", "SMTP connections accepted, by listener.", ["listener"],
            registry=r), [(name,) for name in LISTENERS])
        self.connections_open = Children(Gauge(
            "relay_connections_open", "SMTP connections open now, by listener.", ["listener"],
            registry=r), [(name,) for name in LISTENERS])
        self.auth = Children(Counter(
            "relay_auth_attempts_total", "AUTH attempts by mechanism and result (succeeded, "
            "failed: bad credentials, unavailable: Redis down, malformed: bad SASL).",
            ["mechanism", "result"], registry=r), _product(AUTH_MECHANISMS, AUTH_RESULTS))
        self.senders = Children(Counter(
            "relay_mail_from_total", "MAIL FROM decisions: accepted, or refused with the "
            "reason (the log's reason field).", ["outcome", "reason"], registry=r),
            [("accepted", "none")])
        self.recipients = Children(Counter(
            "relay_recipients_total", "RCPT decisions: accepted, or refused with the reason "
            "(the exception class, as in the log's rcpt.refused reason field).",
            ["outcome", "reason"], registry=r),
            [("accepted", "none"), ("refused", "QuotaExceededError"),
             ("refused", "UpstreamPermanentError"), ("refused", "UpstreamTemporaryError"),
             ("refused", "UpstreamUnavailableError"), ("refused", "StoreUnavailableError")])
        self.messages = Children(Counter(
            "relay_messages_total", "Transactions by outcome (delivered, deferred, failed, "
            "rejected, abandoned, duplicate) and route (none: no route was chosen).",
            ["outcome", "route"], registry=r), _product(OUTCOMES, routes))
        self.transaction_seconds = Children(Histogram(
            "relay_transaction_duration_seconds", "Time from MAIL FROM to the transaction's "
            "outcome, by outcome.", ["outcome"], buckets=TRANSACTION_BUCKETS, registry=r),
            [(o,) for o in OUTCOMES])
        self.message_bytes = Histogram(
            "relay_message_size_bytes", "Size of the messages received (DATA), whatever "
            "their outcome.",
            buckets=SIZE_BUCKETS, registry=r)
        self.session_exceptions = Counter(
            "relay_session_exceptions_total", "Unexpected errors in an SMTP session (bugs, "
            "answered 451 4.3.0; the traceback is in the log).", registry=r)

        self.reservations = Children(Counter(
            "relay_quota_reservations_total", "Units (recipients) asked of reserve.lua, by "
            "result (error: Redis failed).", ["result"], registry=r),
            [(result,) for result in RESERVE_RESULTS])
        self.units_committed = Counter(
            "relay_quota_units_committed_total", "Units made final after the upstream's 250 "
            "(commit.lua).", registry=r)
        self.units_refunded = Counter(
            "relay_quota_units_refunded_total", "Units given back (refund.lua): recipients "
            "refused upstream, failed messages, RSET and disconnects; and by commit.lua, a "
            "transaction's units that were not delivered.", registry=r)
        self.settlements_pending = Gauge(
            "relay_quota_settlements_pending", "Commits and refunds that met Redis away and "
            "wait to be written again (relay/decisions/settle.py).", registry=r)
        self.unreconciled = Children(Counter(
            "relay_quota_unreconciled_total", "Transactions whose count may be high (the log's "
            "quota.unreconciled), by reason.", ["reason"], registry=r),
            [(reason,) for reason in UNRECONCILED_REASONS])
        self.claims = Children(Counter(
            "relay_dedup_recipients_total", "Recipients of messages with a Message-ID, by what "
            "the end of DATA decided (docs/resubmission.md): claimed, resent (the earlier "
            "outcome was unknown), duplicate (not sent again), in_progress (another "
            "transaction is sending it: 451).", ["result"], registry=r),
            [(result,) for result in ("claimed", "resent", "duplicate", "in_progress")])
        self.redis_seconds = Children(Histogram(
            "relay_redis_duration_seconds", "Time of one Redis step on the SMTP path.",
            ["step"], buckets=REDIS_BUCKETS, registry=r), [(s,) for s in REDIS_STEPS])
        self.redis_errors = Children(Counter(
            "relay_redis_errors_total", "Redis steps on the SMTP path that failed (the client "
            "got a 4xx).", ["step"], registry=r), [(s,) for s in REDIS_STEPS])
        self.events = Children(Counter(
            "relay_events_published_total", "Events appended to the stream from the SMTP path, "
            "by kind and result (failed: logged as event.publish_failed).",
            ["event_kind", "result"], registry=r),
            _product(sorted(EVENT_KINDS), ("published", "failed")))
        # The shadow trial (relay/decisions/shadow_trial.py, docs/shadow.md).
        self.shadow_enabled = Gauge("relay_shadow_enabled", "1 while candidate policies are "
                                    "trialled in shadow, else 0 (off, or a bad file).",
                                    registry=r)
        self.shadow_differences = Children(Counter(
            "relay_shadow_differences_total", "Decisions the candidate policies would have made "
            "otherwise (shadow.differs), by kind.", ["kind"], registry=r),
            [(kind,) for kind in SHADOW_KINDS])
        self.shadow_uncounted = Counter(
            "relay_shadow_uncounted_total", "Differences logged but left out of the Redis counts "
            "of `shadow report` (queue full, Redis unreachable).", registry=r)
        self.shadow_errors = Counter(
            "relay_shadow_errors_total", "Shadow evaluations that failed (a bug, traceback in "
            "shadow.failed); live mail is unaffected.", registry=r)

        self.unsubscribe_missing = Children(Counter(
            "relay_unsubscribe_missing_total", "Messages of an app with an unsubscribe policy "
            "that lacked a one-click unsubscribe header (RFC 8058), by policy (checks: sent; "
            "refuses: refused; adds: sent without it) and header.", ["policy", "header"],
            registry=r), _product(UNSUBSCRIBE_POLICIES, UNSUBSCRIBE_HEADERS))
        self.unsubscribe_added = Children(Counter(
            "relay_unsubscribe_added_total", "Messages of an app with unsubscribe = \"adds\", "
            "by result (added; kept: the message had its own List-Unsubscribe; dkim_signed: "
            "an existing DKIM signature covers the absent headers, none added).", ["result"],
            registry=r), [(result,) for result in UNSUBSCRIBE_ADDED])

        self.failovers = Children(Counter(
            "relay_route_failovers_total", "Transactions sent through a route's failover "
            "because its upstream could not be reached.", ["route", "failover"], registry=r),
            failovers)
        self._upstream_replies = Children(Counter(
            "relay_upstream_replies_total", "Upstream answers by pool, step (connect, mail, "
            "rcpt, data) and class (2xx, 4xx, 5xx; error: no reply: refused connection, TLS, "
            "timeout, lost connection).", ["pool", "step", "class"], registry=r))
        self._upstream_seconds = Children(Histogram(
            "relay_upstream_duration_seconds", "Time of one upstream step (connect; mail "
            "includes waiting for a pooled connection).", ["pool", "step"],
            buckets=UPSTREAM_BUCKETS, registry=r))
        self._pool_timeouts = Children(Counter(
            "relay_upstream_pool_timeouts_total", "Transactions refused (451 4.4.5) because every "
            "connection of the pool stayed busy for the upstream timeout.", ["pool"],
            registry=r))
        self._pools = _PoolCollector()
        r.register(self._pools)
        self._upstreams: dict[str, UpstreamMetrics] = {}
        for pool in pools:
            self.upstream(pool)
            self.upstream_up(pool)

    def upstream(self, pool: str) -> UpstreamMetrics:
        """The children for one pool label, made once."""
        found = self._upstreams.get(pool)
        if found is None:
            found = self._upstreams[pool] = UpstreamMetrics(
                pool, self._upstream_replies, self._upstream_seconds, self._pool_timeouts,
                self._pools.pools.add, self.upstream_up)
        return found


_detached: RelayMetrics | None = None


def detached() -> RelayMetrics:
    """Metrics nobody scrapes, for parts built outside a ``RelayApp`` (admin commands, unit
    tests), so instrumented code never needs an ``if metrics`` test."""
    global _detached
    if _detached is None:
        _detached = RelayMetrics()
    return _detached


# -- the notifier ---------------------------------------------------------------------------
class NotifierMetrics:
    """Every metric of ``command-relay notifier``, in one registry."""

    def __init__(self, channels: Iterable[str] = ("in_app", "timeline", "email")) -> None:
        self.registry = r = _registry()
        channels = list(channels)
        self.health = HealthGauges(r)
        self.notifications = Children(Counter(
            "relay_notifications_total", "Events done with on a channel, by outcome (delivered, "
            "dead_lettered: given up and moved to the dead-letter stream).",
            ["channel", "event_kind", "outcome"], registry=r),
            _product(channels, sorted(EVENT_KINDS), NOTIFY_OUTCOMES))
        self.retries = Children(Counter(
            "relay_notification_retries_total", "Delivery attempts that failed and will be "
            "retried, by channel.", ["channel"], registry=r), [(c,) for c in channels])
        self.delivery_seconds = Children(Histogram(
            "relay_notification_duration_seconds", "Time of one delivery attempt, by channel.",
            ["channel"], buckets=NOTIFY_BUCKETS, registry=r), [(c,) for c in channels])
        self.reclaimed = Counter(
            "relay_notifier_reclaimed_total", "Stream entries taken over from a notifier that "
            "stopped answering.", registry=r)
        self.redis_errors = Counter(
            "relay_notifier_redis_errors_total", "Times the notifier could not reach Redis.",
            registry=r)
        self.in_flight = Gauge(
            "relay_notifier_in_flight", "Events this notifier is delivering now.", registry=r)
        # Read from Redis at each scrape (the streams are shared by every notifier: aggregate
        # them with max(), not sum()).
        self.stream_length = Gauge(
            "relay_events_stream_length", "Entries in the event stream relay:events.", registry=r)
        self.pending = Gauge(
            "relay_events_pending", "Events read by a notifier and not yet acknowledged "
            "(consumer group notifiers).", registry=r)
        self.dead_letters = Gauge(
            "relay_events_dead_letters", "Entries in the dead-letter stream relay:events:dead "
            "(see `command-relay events dead`).", registry=r)


# -- the worker supervisor ------------------------------------------------------------------
class SupervisorMetrics:
    """What the supervisor of ``serve --workers N`` adds to its workers' series (relay/
    aggregate.py). ``worker`` is the slot, "1".."N", as on the workers' own series."""

    def __init__(self, workers: int) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        slots = [(str(index),) for index in range(1, workers + 1)]
        self.configured = Gauge(
            "relay_workers_configured", "Worker processes this serve runs (--workers N).",
            registry=r)
        self.configured.set(workers)
        self.alive = Gauge(
            "relay_workers_alive", "Worker processes running now (serving or starting).",
            registry=r)
        self.worker_up = Children(Gauge(
            "relay_worker_up", "1 when the worker's own metrics were part of this scrape, else "
            "0 (not serving, or it did not answer in time).", ["worker"], registry=r), slots)
        self.restarts = Children(Counter(
            "relay_worker_restarts_total", "Workers that died unexpectedly and were restarted "
            "(worker.died).", ["worker"], registry=r), slots)
        self.scrape_errors = Children(Counter(
            "relay_worker_scrape_errors_total", "Scrapes that left a serving worker out because "
            "it did not answer in time or answered badly.", ["worker"], registry=r), slots)
