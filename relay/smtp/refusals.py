"""The canonical ``delivery.finished`` line of a transaction refused at MAIL FROM (STYLE §1
step 9, §7).

A transaction that reached MAIL FROM ends in exactly one ``delivery.finished`` line, whatever
its outcome: ``Transaction._finish`` writes it once the transaction exists; this writes it
when the MAIL FROM itself is refused (sender not allowed 553/550, upstream unreachable 451
4.4.1 or its pool busy 451 4.4.5, plan or route not configured 451 4.3.5, Redis down 451
4.3.0), before there is a ``Transaction``. Same fields, same counters, so one jq recipe over
``delivery.finished`` sees an upstream outage too.
"""

from __future__ import annotations

import time

import structlog

from relay.errors import RelayError
from relay.observe.metrics import RelayMetrics


def finish_refused_mail(log: structlog.typing.FilteringBoundLogger, metrics: RelayMetrics,
                        refusal: RelayError, *, started: float) -> None:
    """Log ``delivery.finished`` for a MAIL FROM refused with ``refusal``: outcome
    ``rejected`` for a 5xx (the client must not retry), ``deferred`` for a 4xx.
    ``started`` is the ``time.monotonic()`` of the MAIL FROM; ``log`` carries whatever is
    known by then (txn_id, and user_id, plan, period once the sender was resolved)."""
    outcome = "rejected" if refusal.permanent else "deferred"
    seconds = time.monotonic() - started
    metrics.transaction_seconds(outcome).observe(seconds)
    refusal.log_refusal(log, "delivery.finished", metrics.messages(outcome, "none"),
                        outcome=outcome, size=None, rcpt_accepted=0, rcpt_refused=0, used=0,
                        limit=0, upstream=None, duration_ms=round(seconds * 1000, 1),
                        reason=refusal.reason)
