"""What the provider webhooks share (docs/suppression.md#provider-webhooks): reading a
bounded body, the events of a verified delivery as ``ProviderEvent``, and ``Intake``, which
turns them into suppression entries exactly once.

Replays. Each event the relay acts on is claimed by its identity (``keys.webhook_event``,
``SET NX`` with a TTL of ``REPLAY_WINDOW``) before its entry is written: an event already
claimed (a replayed delivery, or a provider's retry of one whose answer was lost) creates
nothing, is counted ``replayed`` and the delivery is still answered 200, so that a provider
stops retrying it. A delivery that fails half-way (Redis gone) gives its claims back and is
answered 503, so the provider's retry applies it. Events older than the window are not
applied at all (``stale``) when the delivery carries no signed time (Mandrill's does not):
past it, their claim may have expired. A delivery with a signed time (the Command upstream's)
is refused outside a few minutes instead, well within the claims' lifetime.

The scope: hard bounces, complaints and rejects are global (the address is bad, or
complained, for the whole brokerage); an unsubscribe belongs to the user who sent the message,
named by the event (a user id) or found from its sender address (the sender index). An
unsubscribe whose user cannot be found makes no entry (``unattributed``, logged): the
provider has recorded it on its own list too.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import structlog
from aiohttp import web

from relay.decisions.months import Clock
from relay.decisions.suppression import Suppression, SuppressionReason, SuppressionStore
from relay.errors import StoreUnavailableError
from relay.identity.accounts import AccountStore
from relay.observe.metrics import RelayMetrics
from relay.store import keys
from relay.store.client import RedisClient, store_errors

log = structlog.get_logger()

# How long an applied event's claim is kept, and the age past which an event is not applied.
REPLAY_WINDOW = 30 * 24 * 3600
# The longest recipient or sender address taken from a provider (RFC 5321 §4.5.3.1: 64 + 255).
MAX_ADDRESS = 320


class BodyTooLargeError(Exception):
    """The request body is over the route's limit (413)."""


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole body, refused past ``limit`` bytes without reading the rest."""
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLargeError()
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise BodyTooLargeError()
        chunks.append(chunk)
    return b"".join(chunks)


def recipient_domain(address: str) -> str:
    """What the logs say of a recipient (STYLE §7): its domain, never the address."""
    return address.rpartition("@")[2].lower()[:255]


def plausible_address(value: object) -> str | None:
    """``value`` if it looks like an address (text with one @ inside, no blanks), else
    None: a provider's payload is checked, never trusted to be well formed."""
    if not isinstance(value, str) or not 3 <= len(value) <= MAX_ADDRESS:
        return None
    local, at, domain = value.rpartition("@")
    if not at or not local or not domain or any(c.isspace() for c in value):
        return None
    return value


@dataclass(frozen=True, slots=True)
class ProviderEvent:
    """One event of a verified delivery that makes an entry."""

    identity: str  # what the replay claim is made of (digested)
    reason: SuppressionReason
    recipient: str
    # Unsubscribes: the user named by the event, or None to find them from ``sender``.
    user_id: str | None = None
    sender: str | None = None
    at: int = 0  # the event's time, Unix seconds

    @property
    def is_global(self) -> bool:
        return self.reason is not SuppressionReason.UNSUBSCRIBE


@dataclass(slots=True)
class Tally:
    """What became of a delivery's events (the answer, the log line and the metrics)."""

    received: int = 0
    recorded: int = 0
    replayed: int = 0
    ignored: int = 0
    stale: int = 0
    unattributed: int = 0
    created: dict[str, int] = field(default_factory=dict)

    def fields(self) -> dict[str, int]:
        return {"received": self.received, "recorded": self.recorded,
                "replayed": self.replayed, "ignored": self.ignored, "stale": self.stale,
                "unattributed": self.unattributed}

    @property
    def outcome(self) -> str:
        """``replayed`` when the delivery brought nothing new but replays, else ``accepted``."""
        return "replayed" if self.replayed and not self.recorded else "accepted"


class Intake:
    """Applies verified deliveries to the suppression list, each event once."""

    def __init__(self, redis: RedisClient, store: SuppressionStore, accounts: AccountStore,
                 metrics: RelayMetrics, clock: Clock) -> None:
        self._redis = redis
        self._store = store
        self._accounts = accounts
        self._metrics = metrics
        self._clock = clock

    def now(self) -> int:
        return int(self._clock.now().timestamp())

    async def _user_for(self, event: ProviderEvent, found: dict[tuple[str, str], str | None]
                        ) -> str | None:
        """The id of the user an unsubscribe belongs to: the one the event names, if that
        user exists, else the owner of its sender address; None if neither is known."""
        for kind, ref in (("id", event.user_id), ("sender", event.sender)):
            if not ref:
                continue
            if (kind, ref) not in found:
                user = (await self._accounts.get_user(ref) if kind == "id"
                        else await self._accounts.find_user(ref))
                found[kind, ref] = user.id if user is not None else None
            if found[kind, ref] is not None:
                return found[kind, ref]
        return None

    async def answer(self, provider: str, events: Iterable[ProviderEvent], tally: Tally,
                     request: web.Request, *, dated: bool = False) -> web.Response:
        """Apply a verified delivery and answer it: 200 with the tally, or 503 (the
        provider retries) when Redis fails."""
        try:
            await self.apply(provider, events, tally, dated=dated)
        except StoreUnavailableError:
            return answer(self._metrics, provider, "unavailable", 503,
                          {"error": "try again later"}, peer=request.remote)
        return accepted(self._metrics, provider, tally, peer=request.remote)

    async def apply(self, provider: str, events: Iterable[ProviderEvent], tally: Tally, *,
                    dated: bool = False) -> None:
        """Claim and write the entries of ``events`` into ``tally``. ``dated``: the
        delivery itself carries no signed time (Mandrill), so an event older than
        ``REPLAY_WINDOW`` is not applied. Raises StoreUnavailableError (the claims made are
        given back when Redis allows)."""
        now = self.now()
        found: dict[tuple[str, str], str | None] = {}
        entries: list[tuple[str, Suppression]] = []
        for event in events:
            if dated and event.at < now - REPLAY_WINDOW:
                tally.stale += 1
                continue
            user_id = None if event.is_global else await self._user_for(event, found)
            if not event.is_global and user_id is None:
                tally.unattributed += 1
                log.warning("webhook.unattributed", provider=provider,
                            recipient_domain=recipient_domain(event.recipient),
                            note="an unsubscribe whose user is not known: no entry made")
                continue
            claim = hashlib.sha256(event.identity.encode("utf-8", "surrogateescape"))
            at = min(event.at, now) if event.at > 0 else now
            entries.append((claim.hexdigest(), Suppression(
                event.recipient, user_id, event.reason, provider, at)))
        if not entries:
            return
        with store_errors():
            async with self._redis.pipeline(transaction=False) as pipe:
                for digest, _ in entries:
                    pipe.set(keys.webhook_event(provider, digest), now, nx=True,
                             ex=REPLAY_WINDOW)
                claims = await pipe.execute()
        fresh = [(d, e) for (d, e), claimed in zip(entries, claims, strict=True) if claimed]
        tally.replayed += len(entries) - len(fresh)
        try:
            # In the events' time order, so that the latest event of an address wins (a
            # complaint after a bounce is a complaint), in runs of one reason: each run is one
            # round trip and says how many of its addresses were new.
            ordered = sorted((e for _, e in fresh), key=lambda e: e.at)
            for reason, run in itertools.groupby(ordered, key=lambda e: e.reason):
                created = await self._store.add_many(run)
                tally.created[reason.value] = tally.created.get(reason.value, 0) + created
        except StoreUnavailableError:
            try:
                with store_errors():
                    async with self._redis.pipeline(transaction=False) as pipe:
                        for digest, _ in fresh:
                            pipe.delete(keys.webhook_event(provider, digest))
                        await pipe.execute()
            except StoreUnavailableError:
                log.error("webhook.claims_kept", provider=provider, events=len(fresh),
                          note="Redis failed mid-delivery; these events count as applied "
                               "until their claim expires")
            raise
        tally.recorded += len(fresh)
        for _, entry in fresh:
            log.info("suppression.recorded", source=provider, reason=entry.reason.value,
                     scope=entry.scope, recipient_domain=recipient_domain(entry.address))
        for made, count in tally.created.items():
            self._metrics.suppressions_created(made, provider).inc(count)


# Refusals worth a warning: somebody without the key, or a capture replayed late.
_WARN = frozenset({"forged", "stale", "unconfigured"})


def answer(metrics: RelayMetrics, provider: str, outcome: str, status: int,
           body: Mapping[str, object], **fields: object) -> web.Response:
    """The JSON answer of a delivery, logged as ``webhook.<outcome>`` and counted."""
    metrics.webhook_deliveries(provider, outcome).inc()
    emit = log.warning if outcome in _WARN else log.info
    emit(f"webhook.{outcome}", provider=provider, status=status, **fields)
    return web.json_response(dict(body), status=status)


def accepted(metrics: RelayMetrics, provider: str, tally: Tally, **fields: object
             ) -> web.Response:
    """The answer (200) of a verified delivery, with what became of its events."""
    for result, count in tally.fields().items():
        if result != "received" and count:
            metrics.webhook_events(provider, result).inc(count)
    return answer(metrics, provider, tally.outcome, 200, tally.fields(),
                  **tally.fields(), **fields)


class Unconfigured:
    """The 503 of an endpoint whose key is not set, said in the log once per process."""

    def __init__(self, provider: str, setting: str) -> None:
        self._provider = provider
        self._setting = setting
        self._said = False

    def __call__(self, metrics: RelayMetrics, request: web.Request) -> web.Response:
        metrics.webhook_deliveries(self._provider, "unconfigured").inc()
        if not self._said:
            self._said = True
            log.warning("webhook.unconfigured", provider=self._provider, peer=request.remote,
                        note=f"set {self._setting} to accept these deliveries; they are "
                             f"answered 503 meanwhile (said once)")
        return web.json_response({"error": "this endpoint is not configured"}, status=503)
