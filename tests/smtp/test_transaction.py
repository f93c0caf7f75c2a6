"""relay/smtp/transaction.py on its own: one Transaction against a real redis-server (the
quota and the event stream), real routes and a real capturing upstream, without an SMTP
client in front. At RCPT each recipient is reserved and mirrored upstream in step; at the
end of DATA (the apps that wait for their headers) everything is decided at once; the
upstream's 250 commits, any refusal or abort refunds, and once the final dot handed the
message over the delivery owns the outcome."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis.asyncio as aioredis
import structlog
from cryptography.fernet import Fernet
from structlog.testing import capture_logs

from relay.config.endpoints import UpstreamTarget
from relay.config.policies import Policies, load_policies
from relay.config.zones import zone
from relay.decisions.months import period_at
from relay.decisions.quota import QuotaStore
from relay.decisions.suppression import SuppressionStore
from relay.delivery.credentials import CredentialStore
from relay.delivery.pool import SmtpUpstream
from relay.delivery.routes import RouteUpstreams
from relay.errors import (
    QuotaExceededError,
    RelayError,
    SmtpUtf8RequiredError,
    TooManyRecipientsError,
)
from relay.events.stream import REJECTED, TIMELINE_EMAIL_FAILED, EventLog
from relay.identity.accounts import AccountStore, AppPrincipal, Principal, User, UserPrincipal
from relay.message.wire import WireMessage, stuff
from relay.observe.metrics import detached
from relay.smtp.record import State
from relay.smtp.screening import RecipientScreen
from relay.smtp.services import Opened, Services
from relay.smtp.transaction import Transaction
from tests.conftest import POLICIES, CapturingUpstream, MutableClock, add_user, message

TRACE = b"Received: from client.test by relay.test; test\r\n"


@dataclass
class Kit:
    """What a transaction works with, built as the running relay builds it, and a way to
    open one."""

    services: Services
    quota: QuotaStore
    events: EventLog
    upstream: CapturingUpstream
    clock: MutableClock

    async def transaction(self, user: User, principal: Principal | None = None, *,
                          smtputf8: bool = False) -> Transaction:
        """A transaction as the MAIL FROM hook opens it: at RCPT on the command route (the
        upstream's MAIL FROM accepted), or to be decided at the end of DATA."""
        principal = principal or UserPrincipal(user.email, user.id)
        policies = self.services.policies
        opened = None
        if not policies.routing.app(principal.app).decided_at_data:
            opened = Opened(*await self.services.routes.begin(
                policies.routing.routes["command"], user, user.email, [], smtputf8=smtputf8))
        return Transaction(
            txn_id=secrets.token_hex(8), principal=principal, user=user, sender=user.email,
            mail_options=[], smtputf8=smtputf8,
            period=period_at(self.clock.now(), zone(user.tz)), opened=opened,
            services=self.services, log=structlog.get_logger())

    async def used(self, user: User) -> tuple[int, int]:
        """(used, delivered) of the user's month."""
        usage = await self.quota.usage(user.id, period_at(self.clock.now(), zone(user.tz)).label)
        return usage.used, usage.delivered

    async def published(self, kind: str) -> list[dict[str, Any]]:
        return [dict(e.data) for _, e in await self.events.recent(100) if e.kind == kind]


def services_for(redis: aioredis.Redis, policies: Policies, pool: SmtpUpstream, *,
                 max_recipients: int = 10) -> Services:
    routes = RouteUpstreams(policies.routing, default=pool, targets={},
                            credentials=CredentialStore(redis, Fernet.generate_key()),
                            pool_size=2, timeout=5, hostname="relay.test", tls_verify=False)
    quota = QuotaStore(redis)
    return Services(quota=quota, events=EventLog(redis), routes=routes, policies=policies,
                    max_recipients=max_recipients,
                    screen=RecipientScreen(SuppressionStore(redis), quota, detached()))


@pytest.fixture
async def kit(redis_client: aioredis.Redis, upstream: CapturingUpstream,
                clock: MutableClock) -> AsyncIterator[Kit]:
    pool = SmtpUpstream(UpstreamTarget("127.0.0.1", upstream.port, "none"), size=2,
                        timeout=5, local_hostname="relay.test")
    services = services_for(redis_client, load_policies(POLICIES), pool, max_recipients=2)
    yield Kit(services, services.quota, services.events, upstream, clock)
    await services.routes.close()


def wire(*headers: str) -> WireMessage:
    return WireMessage([stuff(b"".join(h.encode() + b"\r\n" for h in headers) + message())])


def finished(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == "delivery.finished"]


# -- at RCPT -------------------------------------------------------------------------------
async def test_recipients_are_reserved_in_step_and_committed_on_the_upstreams_250(
        kit: Kit, accounts: AccountStore) -> None:
    user = await add_user(accounts)
    txn = await kit.transaction(user)
    await txn.add_recipient("a@example.test", [])
    await txn.add_recipient("b@example.test", [])
    assert await kit.used(user) == (2, 0)  # reserved: counted, not yet final
    assert kit.upstream.handler.rcpt_seen == ["a@example.test", "b@example.test"]
    with capture_logs() as logs:
        reply = await txn.deliver(wire(), TRACE)
    assert "queued as UP123" in reply
    [sent] = kit.upstream.messages
    assert sent.rcpt_tos == ["a@example.test", "b@example.test"]
    assert sent.content.startswith(TRACE)
    assert await kit.used(user) == (2, 2)
    assert txn.state is State.DONE
    [line] = finished(logs)
    assert (line["outcome"], line["rcpt_accepted"], line["used"]) == ("delivered", 2, 2)


async def test_a_recipient_over_the_limit_is_refused_never_asked_upstream_and_published(
        kit: Kit, accounts: AccountStore) -> None:
    user = await add_user(accounts, limit=1)
    txn = await kit.transaction(user)
    await txn.add_recipient("a@example.test", [])
    with pytest.raises(QuotaExceededError) as refused:
        await txn.add_recipient("b@example.test", [])
    assert refused.value.code == 550 and "(1 of 1 sends used)" in refused.value.reply
    assert kit.upstream.handler.rcpt_seen == ["a@example.test"]
    assert (txn.accepted, txn.refused) == (["a@example.test"], 1)
    [rejected] = await kit.published(REJECTED)
    assert (rejected["recipient"], rejected["smtp_code"]) == ("b@example.test", 550)
    await txn.deliver(wire(), TRACE)
    assert [m.rcpt_tos for m in kit.upstream.messages] == [["a@example.test"]]
    assert await kit.used(user) == (1, 1)


async def test_a_recipient_the_upstream_refuses_is_given_back(kit: Kit,
                                                              accounts: AccountStore) -> None:
    kit.upstream.behaviour.rcpt_replies["b@example.test"] = "550 5.1.1 No such user"
    user = await add_user(accounts)
    txn = await kit.transaction(user)
    await txn.add_recipient("a@example.test", [])
    with pytest.raises(RelayError) as refused:
        await txn.add_recipient("b@example.test", [])
    assert (refused.value.code, refused.value.status) == (550, "5.1.1")
    assert await kit.used(user) == (1, 0)


async def test_too_many_recipients_and_an_unannounced_utf8_address_are_refused(
        kit: Kit, accounts: AccountStore) -> None:
    """Past max_recipients (2 here): 452; a non-ASCII address without SMTPUTF8: refused
    before anything is reserved or asked upstream."""
    user = await add_user(accounts)
    txn = await kit.transaction(user)
    with pytest.raises(SmtpUtf8RequiredError):
        await txn.add_recipient("jos\u00e9@example.test", [])
    await txn.add_recipient("a@example.test", [])
    await txn.add_recipient("b@example.test", [])
    with pytest.raises(TooManyRecipientsError) as too_many:
        await txn.add_recipient("c@example.test", [])
    assert too_many.value.code == 452
    assert kit.upstream.handler.rcpt_seen == ["a@example.test", "b@example.test"]
    assert await kit.used(user) == (2, 0)


async def test_the_upstream_refusing_data_gives_back_the_whole_message(
        kit: Kit, accounts: AccountStore) -> None:
    kit.upstream.behaviour.data_reply = "554 5.7.1 Message rejected"
    user = await add_user(accounts)
    txn = await kit.transaction(user)
    await txn.add_recipient("a@example.test", [])
    await txn.add_recipient("b@example.test", [])
    with capture_logs() as logs, pytest.raises(RelayError) as refused:
        await txn.deliver(wire(), TRACE)
    assert refused.value.code == 554 and refused.value.permanent
    assert await kit.used(user) == (0, 0)
    assert [e["outcome"] for e in finished(logs)] == ["failed"]


async def test_abort_gives_back_every_open_unit_once(kit: Kit,
                                                     accounts: AccountStore) -> None:
    """RSET, a new EHLO or a disconnect: the reservations are refunded and the transaction
    ends in one line; a second abort does nothing."""
    user = await add_user(accounts)
    txn = await kit.transaction(user)
    await txn.add_recipient("a@example.test", [])
    await txn.add_recipient("b@example.test", [])
    with capture_logs() as logs:
        await txn.abort("reset")
        await txn.abort("disconnect")
    assert await kit.used(user) == (0, 0)
    [line] = finished(logs)
    assert (line["outcome"], line["reason"], line["rcpt_accepted"]) == ("abandoned", "reset", 2)
    assert kit.upstream.messages == []


# -- after the final dot -------------------------------------------------------------------
async def test_after_the_final_dot_an_abort_cannot_cut_the_delivery(
        kit: Kit, accounts: AccountStore) -> None:
    """The client leaving while the upstream answers DATA changes nothing: the delivery
    finishes and commits on the upstream's real reply."""
    gate = kit.upstream.behaviour.data_gate = asyncio.Event()
    user = await add_user(accounts)
    txn = await kit.transaction(user)
    await txn.add_recipient("a@example.test", [])
    delivery = asyncio.create_task(txn.deliver(wire(), TRACE))
    await kit.upstream.handler.data_started.wait()
    await txn.abort("disconnect")
    assert txn.state is State.SENDING
    gate.set()
    assert "queued as UP123" in await delivery
    assert len(kit.upstream.messages) == 1
    assert await kit.used(user) == (1, 1)


async def test_a_cancelled_delivery_leaves_its_units_counted(kit: Kit,
                                                             accounts: AccountStore) -> None:
    """The relay stopping while the upstream answers DATA: the upstream may have the message,
    so the units stay counted (high, never low) and the line says to reconcile."""
    gate = kit.upstream.behaviour.data_gate = asyncio.Event()
    user = await add_user(accounts)
    txn = await kit.transaction(user)
    await txn.add_recipient("a@example.test", [])
    delivery = asyncio.create_task(txn.deliver(wire(), TRACE))
    await kit.upstream.handler.data_started.wait()
    with capture_logs() as logs:
        delivery.cancel()
        with pytest.raises(asyncio.CancelledError):
            await delivery
    gate.set()
    assert await kit.used(user) == (1, 0)
    [unreconciled] = [e for e in logs if e["event"] == "quota.unreconciled"]
    assert unreconciled["reason"] == "cancelled"
    assert [e["outcome"] for e in finished(logs)] == ["deferred"]
    assert txn.state is State.DONE


# -- at the end of DATA --------------------------------------------------------------------
async def test_deciding_at_data_reserves_every_recipient_once_the_headers_are_read(
        kit: Kit, accounts: AccountStore) -> None:
    """campaigns waits for X-KW-Route: nothing is reserved or asked upstream at RCPT; at the
    end of DATA the route is chosen, both units reserved, the recipients mirrored, the
    message sent without its X-KW-* headers and committed."""
    user = await add_user(accounts)
    txn = await kit.transaction(user, AppPrincipal("campaigns"))
    assert txn.deferred and txn.route is None
    await txn.add_recipient("a@example.test", [])
    await txn.add_recipient("b@example.test", [])
    assert await kit.used(user) == (0, 0)
    assert kit.upstream.handler.connections == 0
    await txn.deliver(wire("X-KW-Route: command", "X-KW-Campaign-Id: cmp-7"), TRACE)
    [sent] = kit.upstream.messages
    assert sent.rcpt_tos == ["a@example.test", "b@example.test"]
    assert b"X-KW-" not in sent.content
    assert txn.route is not None and txn.route.name == "command"
    assert await kit.used(user) == (2, 2)


async def test_deciding_at_data_over_the_limit_refuses_the_whole_message_for_the_timeline(
        kit: Kit, accounts: AccountStore) -> None:
    """smartplans over the limit at the end of DATA: refused whole (550, permanent, so the
    plan moves on), the upstream never contacted, nothing counted, and each recipient
    written as rejected and as a failed Contact Timeline email with its SmartPlan ids."""
    user = await add_user(accounts, limit=1)
    txn = await kit.transaction(user, AppPrincipal("smartplans"))
    await txn.add_recipient("a@example.test", [])
    await txn.add_recipient("b@example.test", [])
    with pytest.raises(QuotaExceededError) as refused:
        await txn.deliver(wire("X-KW-SmartPlan-Id: sp-1", "X-KW-SmartPlan-Step: 2"), TRACE)
    assert refused.value.code == 550
    assert kit.upstream.handler.connections == 0
    assert await kit.used(user) == (0, 0)
    assert [e["recipient"] for e in await kit.published(REJECTED)] == [
        "a@example.test", "b@example.test"]
    timeline = await kit.published(TIMELINE_EMAIL_FAILED)
    assert [(e["recipient"], e["reason"], e["smartplan_id"], e["smartplan_step"])
            for e in timeline] == [("a@example.test", "quota", "sp-1", 2),
                                   ("b@example.test", "quota", "sp-1", 2)]
