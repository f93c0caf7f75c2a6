"""What a transaction needs from the running relay, passed in one object."""

from __future__ import annotations

from dataclasses import dataclass, field

from relay.config.policies import Policies
from relay.config.routing import Route
from relay.decisions.months import Clock, SystemClock
from relay.decisions.quota import QuotaStore
from relay.decisions.settle import LateSettlements
from relay.decisions.shadow_trial import OFF, ShadowTrial
from relay.delivery.routes import RouteUpstreams
from relay.delivery.upstream import UpstreamSession
from relay.events import stream as events
from relay.observe.metrics import RelayMetrics, detached
from relay.smtp.resubmission import Resubmissions
from relay.smtp.unsubscribe import UnsubscribeLinks, detached_links


@dataclass(frozen=True, slots=True)
class Services:
    """What a transaction works with; one per relay, shared by every transaction."""

    quota: QuotaStore
    events: events.EventLog
    routes: RouteUpstreams
    policies: Policies
    max_recipients: int
    metrics: RelayMetrics = field(default_factory=detached)
    # Where a commit or refund that met Redis away goes to be written later; None (tests of
    # the transaction alone) logs it as unreconciled at once.
    settlements: LateSettlements | None = None
    # The relay's clock (tests set it): "now" for the forecast in a threshold notice.
    clock: Clock = field(default_factory=SystemClock)
    # The signed one-click unsubscribe URLs of apps with unsubscribe = "adds".
    links: UnsubscribeLinks = field(default_factory=detached_links)
    # Idempotent resubmission (RELAY_DEDUP_WINDOW); off unless the relay wires it.
    resubmissions: Resubmissions = field(default_factory=Resubmissions.off)
    # Candidate policies evaluated beside ``policies`` (docs/shadow.md); off by default.
    shadow: ShadowTrial = OFF


@dataclass(frozen=True, slots=True)
class Opened:
    """An upstream transaction opened on a route (at MAIL FROM or at the end of DATA)."""

    route: Route
    session: UpstreamSession
    upstream: str

