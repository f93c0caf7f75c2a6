"""One-click unsubscribe headers (RFC 8058) end to end: a real relay with the app's
``unsubscribe`` policy set in a copy of routing.toml, the capturing upstream, smtplib as the
client (in a thread, the relay being in the test's loop). Each policy, the signed URL the
relay adds, the one-recipient rule of "adds", DKIM signatures before and after, the metrics,
a reload, and check-config refusing a bad value."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import smtplib
import subprocess
import sys
from pathlib import Path

import dkim
import pytest
import redis.asyncio as aioredis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from structlog.testing import capture_logs

from relay.decisions.quota import QuotaStore
from relay.events.stream import TIMELINE_EMAIL_FAILED, EventLog
from relay.identity.accounts import AccountStore, User
from relay.identity.signed_links import LinkSigner
from relay.message.unsubscribe import read_unsubscribe_headers
from relay.process.wiring import RelayApp
from tests.conftest import PASSWORD, POLICIES, CapturingUpstream, RelayFactory, add_app, add_user
from tests.policy_files import policies_copy
from tests.scraping import scrape
from tests.serving import clean_env

SENDER = "agent@kw.test"
PERIOD = "2026-11"  # the conftest clock's month
LINK_SECRET = "a-test-link-secret-of-32-bytes!!"
PUBLIC_URL = "https://relay.kw.test"
ONE_CLICK = ("List-Unsubscribe: <https://kw.test/u/1>",
             "List-Unsubscribe-Post: List-Unsubscribe=One-Click")


# -- helpers ------------------------------------------------------------------------------------
def unsubscribe_policies(tmp_path: Path, **apps: str) -> Path:
    """A copy of the shipped policies with ``unsubscribe`` set for each app named."""
    directory = tmp_path / "policies"
    if not directory.exists():
        policies_copy(tmp_path)
    set_unsubscribe(directory, **apps)
    return directory


def set_unsubscribe(directory: Path, **apps: str) -> None:
    path = directory / "routing.toml"
    text = path.read_text(encoding="utf-8")
    for app, policy in apps.items():
        start = text.index(f"[apps.{app}]\n")
        end = text.index("\n\n", start)
        table = "\n".join(line for line in text[start:end].split("\n")
                          if not line.startswith("unsubscribe ="))
        text = text[:start] + table + f'\nunsubscribe = "{policy}"' + text[end:]
    staged = directory / ".routing.toml.new"
    staged.write_text(text, encoding="utf-8")
    staged.replace(path)


async def start(make_relay: RelayFactory, upstream: CapturingUpstream, accounts: AccountStore,
                policies: Path) -> tuple[RelayApp, User]:
    app: RelayApp = await make_relay(upstream=upstream, policies_dir=policies,
                                     link_secret=LINK_SECRET, public_url=PUBLIC_URL)
    user = await add_user(accounts)
    for name in ("campaigns", "smartplans", "command"):
        await add_app(accounts, name)
    return app, user


def compose(*extra: str, to: str = "client@example.test") -> bytes:
    # One Message-ID per distinct message: two different messages with one id would be one
    # resubmission to the relay (docs/resubmission.md), and the second would not be sent.
    digest = hashlib.sha256("\n".join((to, *extra)).encode()).hexdigest()[:12]
    lines = ["From: Agent <agent@kw.test>", f"To: {to}", "Subject: Spring listings",
             "Date: Sun, 15 Nov 2026 12:00:00 +0000", f"Message-ID: <spring-{digest}@kw.test>",
             *extra]
    return ("".join(f"{line}\r\n" for line in lines)
            + "\r\nNew homes this week.\r\n..a dotted line\r\n").encode()


def smtplib_send(port: int, login: str, recipients: list[str],
                 content: bytes) -> dict[str, tuple[int, bytes]]:
    """One transaction with smtplib: the refused recipients (smtplib raises when DATA or
    every recipient is refused)."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=20) as client:
        client.login(login, PASSWORD)
        return client.sendmail(SENDER, recipients, content)


async def send(app: RelayApp, content: bytes, recipients: list[str] | None = None,
               login: str = "campaigns") -> dict[str, tuple[int, bytes]]:
    return await asyncio.to_thread(smtplib_send, app.port, login,
                                   recipients or ["client@example.test"], content)


def after_received(content: bytes) -> bytes:
    """The forwarded bytes without the one Received: header the relay puts on top."""
    assert content.startswith(b"Received: from ")
    end = content.index(b"\r\n", content.index(b"\r\n\t", content.index(b" id ")) + 1)
    return content[end + 2:]


async def used(redis_client: aioredis.Redis, user: User) -> int:
    return (await QuotaStore(redis_client).usage(user.id, PERIOD)).used


def token_of(content: bytes) -> str:
    found = read_unsubscribe_headers(content).list_unsubscribe
    assert found is not None
    assert found.startswith(f"<{PUBLIC_URL}/unsubscribe/") and found.endswith(">")
    return found[len(f"<{PUBLIC_URL}/unsubscribe/"):-1]


# -- checks -------------------------------------------------------------------------------------
async def test_unsubscribe_checks_sends_logs_and_counts_a_message_lacking_post(
        make_relay: RelayFactory, upstream: CapturingUpstream, accounts: AccountStore,
        redis_client: aioredis.Redis, tmp_path: Path) -> None:
    """The shipped policy ("checks" for Campaigns): a message without List-Unsubscribe-Post
    is delivered unchanged and counted as a send, logged as unsubscribe.missing naming the
    header, and counted in relay_unsubscribe_missing_total; a complete one is not."""
    app, user = await start(make_relay, upstream, accounts, policies_copy(tmp_path))
    lacking = compose(ONE_CLICK[0])
    with capture_logs() as logs:
        assert await send(app, lacking) == {}
        assert await send(app, compose(*ONE_CLICK)) == {}
    assert [after_received(m.content) for m in upstream.messages] == \
        [lacking, compose(*ONE_CLICK)]
    missing = [e for e in logs if e["event"] == "unsubscribe.missing"]
    assert [(e["policy"], e["headers"], e["action"]) for e in missing] == \
        [("checks", ["List-Unsubscribe-Post"], "sent")]
    assert await used(redis_client, user) == 2
    metrics = await scrape(app.metrics_port)
    assert metrics.value("relay_unsubscribe_missing_total", policy="checks",
                         header="List-Unsubscribe-Post") == 1
    assert metrics.value("relay_unsubscribe_missing_total", policy="checks",
                         header="List-Unsubscribe") == 0


# -- refuses ------------------------------------------------------------------------------------
async def test_unsubscribe_refuses_at_end_of_data_naming_the_header(
        make_relay: RelayFactory, upstream: CapturingUpstream, accounts: AccountStore,
        redis_client: aioredis.Redis, tmp_path: Path) -> None:
    """Campaigns (decided at the end of DATA) under "refuses": a message lacking
    List-Unsubscribe gets 550 5.6.0 naming it; nothing was asked of the upstream, nothing is
    counted; a complete message goes through."""
    app, user = await start(make_relay, upstream, accounts,
                            unsubscribe_policies(tmp_path, campaigns="refuses"))
    with capture_logs() as logs, pytest.raises(smtplib.SMTPDataError) as refused:
        await send(app, compose(ONE_CLICK[1]))
    assert (refused.value.smtp_code, refused.value.smtp_error) == (
        550, b"5.6.0 One-click unsubscribe required (RFC 8058): message lacks "
             b"List-Unsubscribe (with an https URI)")
    assert upstream.messages == [] and upstream.handler.rcpt_seen == []
    assert await used(redis_client, user) == 0
    [line] = [e for e in logs if e["event"] == "unsubscribe.missing"]
    assert (line["action"], line["smtp_code"], line["headers"]) == \
        ("refused", 550, ["List-Unsubscribe"])
    [finished] = [e for e in logs if e["event"] == "delivery.finished"]
    assert (finished["outcome"], finished["smtp_code"]) == ("failed", 550)
    metrics = await scrape(app.metrics_port)
    assert metrics.value("relay_unsubscribe_missing_total", policy="refuses",
                         header="List-Unsubscribe") == 1

    assert await send(app, compose(*ONE_CLICK)) == {}
    assert len(upstream.messages) == 1
    assert await used(redis_client, user) == 1


async def test_unsubscribe_refuses_at_rcpt_app_gives_its_units_back(
        make_relay: RelayFactory, upstream: CapturingUpstream, accounts: AccountStore,
        redis_client: aioredis.Redis, tmp_path: Path) -> None:
    """An app decided at RCPT (units reserved and the recipients mirrored upstream before
    DATA) under "refuses": the refusal resets the upstream transaction and refunds every
    unit; the next message on the same connection goes through."""
    app, user = await start(make_relay, upstream, accounts,
                            unsubscribe_policies(tmp_path, command="refuses"))

    def two_messages() -> tuple[int, dict[str, tuple[int, bytes]]]:
        with smtplib.SMTP("127.0.0.1", app.port, local_hostname="client.test",
                          timeout=20) as client:
            client.login("command", PASSWORD)
            code = 0
            try:
                client.sendmail(SENDER, ["a@example.test", "b@example.test"], compose())
            except smtplib.SMTPDataError as exc:
                code = exc.smtp_code
            return code, client.sendmail(SENDER, ["c@example.test"], compose(*ONE_CLICK))

    code, refused = await asyncio.to_thread(two_messages)
    assert (code, refused) == (550, {})
    assert upstream.handler.rcpt_seen == ["a@example.test", "b@example.test", "c@example.test"]
    assert [m.rcpt_tos for m in upstream.messages] == [["c@example.test"]]
    assert await used(redis_client, user) == 1


async def test_unsubscribe_refuses_a_smartplan_writes_the_timeline(
        make_relay: RelayFactory, upstream: CapturingUpstream, accounts: AccountStore,
        redis_client: aioredis.Redis, tmp_path: Path) -> None:
    """A SmartPlan email refused for its headers is a permanent refusal of the whole
    message: the Contact Timeline gets timeline.email_failed (reason "refused")."""
    app, _ = await start(make_relay, upstream, accounts,
                         unsubscribe_policies(tmp_path, smartplans="refuses"))
    with pytest.raises(smtplib.SMTPDataError):
        await send(app, compose("X-KW-SmartPlan-Id: sp-1", "X-KW-Contact-Id: c-9"),
                   login="smartplans")
    failed = [e for _, e in await EventLog(redis_client).recent(100)
              if e.kind == TIMELINE_EMAIL_FAILED]
    assert [(e.data["reason"], e.data["smtp_code"], e.data["contact_id"]) for e in failed] == \
        [("refused", 550, "c-9")]


# -- adds ---------------------------------------------------------------------------------------
async def test_unsubscribe_adds_a_signed_url_for_the_recipient(
        make_relay: RelayFactory, upstream: CapturingUpstream, accounts: AccountStore,
        tmp_path: Path) -> None:
    """Under "adds", both headers go on top of the sender's (under Received:), the rest of
    the message unchanged; the URL's token verifies with the link secret and names the user
    and the recipient, lower-cased."""
    app, user = await start(make_relay, upstream, accounts,
                            unsubscribe_policies(tmp_path, campaigns="adds"))
    original = compose()
    assert await send(app, original, ["Client@Example.TEST"]) == {}
    [forwarded] = upstream.messages
    token = token_of(forwarded.content)
    assert after_received(forwarded.content) == (
        f"List-Unsubscribe: <{PUBLIC_URL}/unsubscribe/{token}>\r\n"
        "List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n").encode() + original
    assert LinkSigner(LINK_SECRET.encode()).verify("unsubscribe", token) == \
        {"u": user.id, "r": "client@example.test"}
    metrics = await scrape(app.metrics_port)
    assert metrics.value("relay_unsubscribe_added_total", result="added") == 1


async def test_unsubscribe_adds_one_recipient_per_transaction(
        make_relay: RelayFactory, upstream: CapturingUpstream, accounts: AccountStore,
        redis_client: aioredis.Redis, tmp_path: Path) -> None:
    """Under "adds" a second RCPT gets 452 4.5.3 (not counted); the client sends it in a new
    transaction, and each message carries its own recipient's URL."""
    app, user = await start(make_relay, upstream, accounts,
                            unsubscribe_policies(tmp_path, campaigns="adds"))
    refused = await send(app, compose(), ["first@example.test", "second@example.test"])
    assert refused == {"second@example.test": (
        452, b"4.5.3 Too many recipients: one per message for one-click unsubscribe links")}
    assert await send(app, compose(), ["second@example.test"]) == {}
    signer = LinkSigner(LINK_SECRET.encode())
    assert [(m.rcpt_tos, signer.verify("unsubscribe", token_of(m.content))["r"])
            for m in upstream.messages] == [(["first@example.test"], "first@example.test"),
                                            (["second@example.test"], "second@example.test")]
    assert await used(redis_client, user) == 2
    metrics = await scrape(app.metrics_port)
    assert metrics.value("relay_recipients_total", outcome="refused",
                         reason="OneRecipientPerMessageError") == 1


async def test_unsubscribe_adds_keeps_the_senders_own_header(
        make_relay: RelayFactory, upstream: CapturingUpstream, accounts: AccountStore,
        tmp_path: Path) -> None:
    """A message with its own List-Unsubscribe is forwarded unchanged (the lacking Post
    header is logged and counted, not added)."""
    app, _ = await start(make_relay, upstream, accounts,
                         unsubscribe_policies(tmp_path, campaigns="adds"))
    original = compose(ONE_CLICK[0])
    assert await send(app, original) == {}
    assert after_received(upstream.messages[0].content) == original
    metrics = await scrape(app.metrics_port)
    assert metrics.value("relay_unsubscribe_added_total", result="kept") == 1
    assert metrics.value("relay_unsubscribe_missing_total", policy="adds",
                         header="List-Unsubscribe-Post") == 1


# -- DKIM ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dkim_key() -> tuple[bytes, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)


def verifies(content: bytes, record: bytes) -> bool:
    def dns(name: bytes, timeout: int = 5) -> bytes:
        # Answers only our selector: the verification makes no DNS lookup.
        assert name == b"sel._domainkey.kw.test."
        return record
    return bool(dkim.verify(content, dnsfunc=dns))


SIGNED = [b"from", b"to", b"subject", b"date", b"message-id"]


@pytest.mark.parametrize("canonicalization", [(b"simple", b"simple"), (b"relaxed", b"relaxed")])
async def test_unsubscribe_adds_leaves_a_dkim_signature_valid(
        make_relay: RelayFactory, upstream: CapturingUpstream, accounts: AccountStore,
        tmp_path: Path, dkim_key: tuple[bytes, bytes],
        canonicalization: tuple[bytes, bytes]) -> None:
    """Headers a signature does not name (h=) are outside it: added on top, the signature
    still verifies; a changed signed header still breaks it (the check can fail)."""
    private, record = dkim_key
    app, _ = await start(make_relay, upstream, accounts,
                         unsubscribe_policies(tmp_path, campaigns="adds"))
    original = compose()
    signature = dkim.sign(original, b"sel", b"kw.test", private,
                          canonicalize=canonicalization, include_headers=SIGNED)
    assert await send(app, signature + original) == {}
    forwarded = upstream.messages[0].content
    assert read_unsubscribe_headers(forwarded).missing == ()
    assert verifies(forwarded, record)
    assert not verifies(forwarded.replace(b"Spring listings", b"Autumn listings"), record)


@pytest.mark.parametrize(("covered", "name"), [(b"list-unsubscribe", "List-Unsubscribe"),
                                             (b"list-unsubscribe-post", "List-Unsubscribe-Post")])
async def test_unsubscribe_adds_nothing_a_dkim_signature_signs_as_absent(
        make_relay: RelayFactory, upstream: CapturingUpstream, accounts: AccountStore,
        tmp_path: Path, dkim_key: tuple[bytes, bytes], covered: bytes, name: str) -> None:
    """A signature whose h= lists an unsubscribe header the message lacks (over-signed,
    RFC 6376 §5.4) would break if it were added: the message is forwarded as it is, still
    verifying, logged (unsubscribe.not_added) and counted."""
    private, record = dkim_key
    app, _ = await start(make_relay, upstream, accounts,
                         unsubscribe_policies(tmp_path, campaigns="adds"))
    original = compose()
    signed = dkim.sign(original, b"sel", b"kw.test", private,
                       include_headers=[*SIGNED, covered]) + original
    # What adding would have done: the signature breaks.
    added = (b"List-Unsubscribe: <https://x.test/u>\r\n"
             b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n")
    assert not verifies(added + signed, record)
    with capture_logs() as logs:
        assert await send(app, signed) == {}
    forwarded = upstream.messages[0].content
    assert after_received(forwarded) == signed
    assert verifies(forwarded, record)
    [line] = [e for e in logs if e["event"] == "unsubscribe.not_added"]
    assert line["headers"] == [name]
    metrics = await scrape(app.metrics_port)
    assert metrics.value("relay_unsubscribe_added_total", result="dkim_signed") == 1
    assert metrics.value("relay_unsubscribe_missing_total", policy="adds",
                         header="List-Unsubscribe") == 1


# -- reload and check-config --------------------------------------------------------------------
async def test_unsubscribe_policy_reload_applies_to_new_transactions(
        make_relay: RelayFactory, upstream: CapturingUpstream, accounts: AccountStore,
        tmp_path: Path) -> None:
    """A reload turning "checks" into "refuses" refuses the next incomplete message."""
    policies = policies_copy(tmp_path)
    app, _ = await start(make_relay, upstream, accounts, policies)
    assert await send(app, compose()) == {}
    set_unsubscribe(policies, campaigns="refuses")
    assert await app.reload_policies() is True
    with pytest.raises(smtplib.SMTPDataError) as refused:
        await send(app, compose())
    assert refused.value.smtp_code == 550
    assert len(upstream.messages) == 1


def check_config(tmp_path: Path, policies: Path,
                 **settings: str) -> subprocess.CompletedProcess[str]:
    env = clean_env(RELAY_POLICIES_DIR=str(policies), RELAY_STATE_DIR=str(tmp_path / "state"),
                    **settings)
    return subprocess.run([sys.executable, "-m", "relay", "check-config"], env=env,
                          capture_output=True, text=True, timeout=40, cwd=tmp_path)


def test_check_config_names_a_bad_unsubscribe_value(tmp_path: Path) -> None:
    """check-config exits 1 naming routing.toml, the line and apps.campaigns.unsubscribe."""
    policies = unsubscribe_policies(tmp_path, campaigns="sometimes")
    result = check_config(tmp_path, policies)
    assert result.returncode == 1, result
    line = next(number for number, text in enumerate(
        (policies / "routing.toml").read_text().splitlines(), 1)
        if text == 'unsubscribe = "sometimes"')
    assert (f'{policies / "routing.toml"}:{line}: apps.campaigns.unsubscribe: must be "off", '
            f'"checks", "refuses" or "adds"') in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("url", ["relay.kw.test", "https://relay.kw.test/?x=1",
                                 "https://relay.kw.test/a b"])
def test_check_config_names_a_bad_public_url(tmp_path: Path, url: str) -> None:
    result = check_config(tmp_path, POLICIES, RELAY_PUBLIC_URL=url)
    assert result.returncode == 1, result
    assert "environment: public_url: expected " in result.stderr
    assert "Traceback" not in result.stderr
