"""Idempotent resubmission: which recipients of a message were already sent, by (user,
Message-ID, recipient) (docs/resubmission.md; STYLE §1 step 6, §6).

A message's recipients live in one hash per user and Message-ID (``keys.dedup``, in the
user's slot), for ``RELAY_DEDUP_WINDOW`` seconds after the last attempt. At the end of DATA,
before the upstream is sent the message, ``claim`` (claim.lua) decides for every recipient
at once, atomically across any number of relays: send it (first time, or again after an
unknown outcome), leave it (the upstream accepted it already: a duplicate), or wait (another
transaction is sending it now). Once the outcome is known the claims are concluded
(conclude.lua), or, on a counted route, made ``accepted`` by commit.lua in the same step as
the units (``ClaimSettlement``), which also gives back the units of earlier attempts whose
outcome was unknown: a recipient sent again is counted once.

Redis errors surface as StoreUnavailableError (fail closed: the message waits, a 451).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Literal

from relay.errors import StoreUnavailableError
from relay.observe.metrics import RelayMetrics, detached
from relay.store import hot, keys
from relay.store.client import RedisClient, store_errors
from relay.store.scripts import lua_source

Outcome = Literal["accepted", "released", "unknown"]


class ClaimStatus(IntEnum):
    CLAIMED = 0     # first submission: this transaction sends it
    RESEND = 1      # the earlier outcome is unknown: sent again, counted once
    DUPLICATE = 2   # the upstream accepted it already: not sent, not counted
    BUSY = 3        # another transaction is sending it now


@dataclass(frozen=True, slots=True)
class EarlierUnit:
    """The unit of an earlier attempt whose outcome is unknown (it may still be open)."""

    txn_id: str
    rcpt_no: int
    period: str


@dataclass(frozen=True, slots=True)
class RecipientClaim:
    status: ClaimStatus
    # DUPLICATE: the transaction the upstream accepted it from; BUSY: the one sending it.
    other: str = ""
    earlier: tuple[EarlierUnit, ...] = ()


@dataclass(frozen=True, slots=True)
class ClaimSettlement:
    """What commit.lua does for the claims of a delivered message: mark them accepted, and
    give back the earlier attempts' units (``QuotaStore.commit``'s ``claims``)."""

    user_id: str
    digest: str
    txn_id: str
    window: int
    earlier: tuple[EarlierUnit, ...] = ()

    def keys_and_argument(self) -> tuple[list[str], str]:
        """KEYS[4..] and ARGV[5] of commit.lua."""
        groups: dict[tuple[str, str], list[int]] = {}
        for unit in self.earlier:
            groups.setdefault((unit.period, unit.txn_id), []).append(unit.rcpt_no)
        script_keys = [keys.dedup(self.user_id, self.digest)]
        words = [self.txn_id, str(self.window)]
        for (period, txn_id), numbers in groups.items():
            script_keys += [keys.usage(self.user_id, period),
                            keys.reservations(self.user_id, txn_id)]
            words.append(",".join(str(n) for n in sorted(set(numbers))))
        return script_keys, " ".join(words)


def digest(message_id: bytes) -> str:
    """The key part for a Message-ID: SHA-256, hex (any bytes make a short, safe key)."""
    return hashlib.sha256(message_id).hexdigest()


def _earlier(detail: str) -> tuple[EarlierUnit, ...]:
    words = detail.split()
    return tuple(EarlierUnit(words[i], int(words[i + 1]), words[i + 2])
                 for i in range(0, len(words) - 2, 3))


class DedupStore:
    def __init__(self, redis: RedisClient, metrics: RelayMetrics | None = None) -> None:
        self._claim = hot.register_script(redis,
            lua_source("relay.decisions", "claim.lua", prologues=["claims.lua"]))
        self._conclude = hot.register_script(redis,
            lua_source("relay.decisions", "conclude.lua", prologues=["claims.lua"]))
        m = metrics or detached()
        self._seconds = {step: m.redis_seconds(step) for step in ("claim", "conclude")}
        self._errors = {step: m.redis_errors(step) for step in self._seconds}

    async def claim(self, user_id: str, message: str, txn_id: str, period: str,
                    recipients: Sequence[tuple[str, int]], *, now_ms: int, holds_ms: int,
                    window: int) -> list[RecipientClaim]:
        """Claim ``recipients`` (normalised address, unit number; each address once) of
        message ``message`` (its digest) for ``txn_id`` until ``holds_ms``; one result per
        recipient, in order. If any is BUSY, nothing was claimed. Calling it again before
        the message is sent renews the claims. Raises StoreUnavailableError (the claims
        may have been made all the same: ``conclude`` "released" undoes them)."""
        args: list[str | int] = [txn_id, period, now_ms, holds_ms, window]
        for address, number in recipients:
            args += [address, number]
        started = time.perf_counter()
        try:
            with store_errors():
                raw = await self._claim(keys=[keys.dedup(user_id, message)], args=args)
        except StoreUnavailableError:
            self._errors["claim"].inc()
            raise
        self._seconds["claim"].observe(time.perf_counter() - started)
        found = []
        for status, detail in zip(raw[::2], raw[1::2], strict=True):
            kind, text = ClaimStatus(int(status)), str(detail)
            if kind is ClaimStatus.RESEND:
                found.append(RecipientClaim(kind, earlier=_earlier(text)))
            else:
                found.append(RecipientClaim(kind, other=text))
        return found

    async def conclude(self, user_id: str, message: str, txn_id: str, outcome: Outcome,
                       window: int) -> int:
        """End ``txn_id``'s claims on ``message``: accepted, released (back to what they
        were) or unknown. Idempotent. Returns how many were concluded. Raises
        StoreUnavailableError."""
        started = time.perf_counter()
        try:
            with store_errors():
                concluded = await self._conclude(keys=[keys.dedup(user_id, message)],
                                                 args=[txn_id, outcome, window])
        except StoreUnavailableError:
            self._errors["conclude"].inc()
            raise
        self._seconds["conclude"].observe(time.perf_counter() - started)
        return int(concluded)
