"""Recipients screened against the suppression list before they cost a unit (STYLE §1 step 5;
docs/suppression.md). The transaction calls it; the lists are relay/decisions/suppression.py.

Where each recipient is checked, and what it costs in Redis round trips:

* at RCPT on a counted route: the global list with one HGET (``before_reserve``), then the
  user's own list inside reserve.lua, with the reservation (one script, the user's slot), so
  a RCPT costs one round trip more than without the list;
* at RCPT on an uncounted route (no reservation): both lists in one pipelined round trip
  (``at_rcpt``);
* at the end of DATA: every recipient, both lists, in one pipelined round trip
  (``drop``), before the reservation: a suppressed recipient leaves the message, the rest
  is sent.

A hit is refused with ``RecipientSuppressedError`` (550 5.7.1, naming the reason), never
counted against the quota; it is counted in ``relay_recipients_suppressed_total`` and in the
month's usage (``suppressed``): by reserve.lua for the user's list, here for the rest.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import structlog

from relay.decisions.quota import QuotaStore
from relay.decisions.suppression import Suppression, SuppressionStore
from relay.errors import RecipientSuppressedError, StoreUnavailableError
from relay.identity.accounts import normalize_address
from relay.observe.metrics import RelayMetrics

Log = structlog.typing.FilteringBoundLogger


def refusal(entry: Suppression) -> RecipientSuppressedError:
    return RecipientSuppressedError(entry.reason.value, "global" if entry.user_id is None
                                    else "user")


class RecipientScreen:
    """One per relay, shared by every transaction."""

    def __init__(self, store: SuppressionStore, quota: QuotaStore,
                 metrics: RelayMetrics) -> None:
        self._store = store
        self._quota = quota
        self._metrics = metrics
        self._seconds = metrics.redis_seconds("suppression")
        self._errors = metrics.redis_errors("suppression")

    async def before_reserve(self, user_id: str, period: str, address: str, log: Log) -> str:
        """A counted route's RCPT: raise the refusal if ``address`` is on the global list;
        else its normalised form, for reserve.lua to look up on the user's own list.
        Raises StoreUnavailableError (fail closed, as the reservation does)."""
        started = time.perf_counter()
        try:
            entry = await self._store.check_global(address)
        except StoreUnavailableError:
            self._errors.inc()
            raise
        self._seconds.observe(time.perf_counter() - started)
        if entry is not None:
            await self._refused(user_id, period, [entry], log)
            raise refusal(entry)
        return normalize_address(address)

    async def at_rcpt(self, user_id: str, period: str, address: str, log: Log) -> None:
        """An uncounted route's RCPT: raise the refusal if ``address`` is on either list."""
        found = await self.screen(user_id, period, [address], log)
        if found:
            raise found[address]

    async def screen(self, user_id: str, period: str, addresses: Iterable[str],
                     log: Log) -> dict[str, RecipientSuppressedError]:
        """The refusal of each of ``addresses`` (as given) that is on either list, counted.
        Raises StoreUnavailableError."""
        wanted = list(addresses)
        started = time.perf_counter()
        try:
            entries = await self._store.check_many(wanted, user_id=user_id)
        except StoreUnavailableError:
            self._errors.inc()
            raise
        self._seconds.observe(time.perf_counter() - started)
        hits = {address: entries[normalize_address(address)] for address in wanted
                if normalize_address(address) in entries}
        if hits:
            await self._refused(user_id, period, list(hits.values()), log)
        return {address: refusal(entry) for address, entry in hits.items()}

    async def drop(self, user_id: str, period: str, recipients: list[str],
                   log: Log) -> tuple[list[str], dict[str, RecipientSuppressedError]]:
        """The end of DATA: ``recipients`` without the suppressed ones, and the refusal of
        each one dropped, logged as ``rcpt.refused`` and counted as at RCPT."""
        dropped = await self.screen(user_id, period, recipients, log)
        for address, refused in dropped.items():
            refused.log_refusal(log, "rcpt.refused",
                                self._metrics.recipients("refused", refused.reason),
                                rcpt_domain=address.rpartition("@")[2].lower(),
                                reason=refused.reason, deferred=True)
        return [a for a in recipients if a not in dropped], dropped

    async def _refused(self, user_id: str, period: str, entries: list[Suppression],
                       log: Log) -> None:
        """Count hits found here (reserve.lua counts its own) in the metric and the usage.
        The usage count is a report: Redis failing now does not change the refusal."""
        for entry in entries:
            self._metrics.suppressed(entry.reason.value, refusal(entry).scope).inc()
        try:
            await self._quota.count_suppressed(user_id, period, [e.reason for e in entries])
        except StoreUnavailableError:
            log.warning("suppression.count_failed", recipients=len(entries))
