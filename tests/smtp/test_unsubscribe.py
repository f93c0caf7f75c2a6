"""relay/smtp/unsubscribe.py as plain calls: the signed per-recipient URL, the one-recipient
rule of "adds", and what each policy does with a message's headers (logs, metrics, the
refusal, the added bytes). End to end over SMTP: tests/flows/test_unsubscribe_headers.py."""

from __future__ import annotations

import pytest
import structlog
from structlog.testing import capture_logs

from relay.config.routing import UnsubscribePolicy
from relay.errors import OneRecipientPerMessageError, UnsubscribeHeadersMissingError
from relay.identity.signed_links import LinkInvalidError, LinkSigner
from relay.message.unsubscribe import read_unsubscribe_headers
from relay.message.wire import WireMessage
from relay.observe.metrics import RelayMetrics
from relay.smtp.unsubscribe import UnsubscribeLinks, check_recipient, unsubscribe_fields

SECRET = b"a-test-link-secret-of-32-bytes!!"
LINKS = UnsubscribeLinks("https://relay.kw.test/", lambda: SECRET)
ONE_CLICK = ("List-Unsubscribe: <https://kw.test/u/1>",
             "List-Unsubscribe-Post: List-Unsubscribe=One-Click")


def wire(*lines: str) -> WireMessage:
    text = "".join(f"{line}\r\n" for line in ["From: agent@kw.test", *lines]) + "\r\nHi\r\n"
    return WireMessage([text.encode()])


def run(policy: UnsubscribePolicy, message: WireMessage,
        metrics: RelayMetrics) -> tuple[bytes, list[dict[str, object]]]:
    with capture_logs() as logs:
        added = unsubscribe_fields(policy, message, user_id="u42",
                                   recipients=["Client@Example.TEST"], links=LINKS,
                                   metrics=metrics, log=structlog.get_logger())
    return added, logs


def missing_count(metrics: RelayMetrics, policy: str, header: str) -> float | None:
    return metrics.registry.get_sample_value("relay_unsubscribe_missing_total",
                                             {"policy": policy, "header": header})


def added_count(metrics: RelayMetrics, result: str) -> float | None:
    return metrics.registry.get_sample_value("relay_unsubscribe_added_total",
                                             {"result": result})


def test_unsubscribe_links_url_token_names_user_and_normalised_recipient() -> None:
    """The URL is <public_url>/unsubscribe/<token>; the token verifies for the purpose
    "unsubscribe" only, carrying the user and the recipient A-Z lower-cased."""
    url = LINKS.url("u42", "Client@Example.TEST")
    base, _, token = url.rpartition("/")
    assert base == "https://relay.kw.test/unsubscribe"
    signer = LinkSigner(SECRET)
    assert signer.verify("unsubscribe", token) == {"u": "u42", "r": "client@example.test"}
    with pytest.raises(LinkInvalidError):
        signer.verify("usage", token)


def test_check_recipient_one_per_message_under_adds_only() -> None:
    """A second recipient is refused with 452 4.5.3 under "adds"; any other policy takes
    as many as max_recipients allows."""
    check_recipient(UnsubscribePolicy.ADDS, 0)
    with pytest.raises(OneRecipientPerMessageError) as refused:
        check_recipient(UnsubscribePolicy.ADDS, 1)
    assert refused.value.reply == \
        "452 4.5.3 Too many recipients: one per message for one-click unsubscribe links"
    for policy in (UnsubscribePolicy.OFF, UnsubscribePolicy.CHECKS, UnsubscribePolicy.REFUSES):
        check_recipient(policy, 5)


def test_unsubscribe_fields_off_looks_at_nothing() -> None:
    metrics = RelayMetrics()
    added, logs = run(UnsubscribePolicy.OFF, wire(), metrics)
    assert (added, logs) == (b"", [])
    assert missing_count(metrics, "checks", "List-Unsubscribe") == 0


def test_unsubscribe_fields_checks_logs_and_counts_what_is_missing() -> None:
    """A message without the Post header is sent as is, logged with the header it lacks and
    counted under that header only."""
    metrics = RelayMetrics()
    added, logs = run(UnsubscribePolicy.CHECKS, wire(ONE_CLICK[0]), metrics)
    assert added == b""
    assert [(e["event"], e["headers"], e["action"], e["log_level"]) for e in logs] == [
        ("unsubscribe.missing", ["List-Unsubscribe-Post"], "sent", "info")]
    assert missing_count(metrics, "checks", "List-Unsubscribe-Post") == 1
    assert missing_count(metrics, "checks", "List-Unsubscribe") == 0


def test_unsubscribe_fields_checks_a_complete_message_quietly() -> None:
    metrics = RelayMetrics()
    assert run(UnsubscribePolicy.CHECKS, wire(*ONE_CLICK), metrics) == (b"", [])


def test_unsubscribe_fields_refuses_names_every_missing_header() -> None:
    metrics = RelayMetrics()
    with pytest.raises(UnsubscribeHeadersMissingError) as refused:
        run(UnsubscribePolicy.REFUSES, wire(), metrics)
    assert refused.value.reply == (
        "550 5.6.0 One-click unsubscribe required (RFC 8058): message lacks List-Unsubscribe "
        "(with an https URI) and List-Unsubscribe-Post: List-Unsubscribe=One-Click")
    assert missing_count(metrics, "refuses", "List-Unsubscribe") == 1
    assert missing_count(metrics, "refuses", "List-Unsubscribe-Post") == 1


def test_unsubscribe_fields_adds_both_with_the_recipients_url() -> None:
    metrics = RelayMetrics()
    added, _ = run(UnsubscribePolicy.ADDS, wire(), metrics)
    assert added == (f"List-Unsubscribe: <{LINKS.url('u42', 'client@example.test')}>\r\n"
                     "List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n").encode()
    assert added_count(metrics, "added") == 1


def test_unsubscribe_fields_adds_keeps_the_senders_own_list_unsubscribe() -> None:
    """The sender's List-Unsubscribe stays alone: no second one, and no Post header that
    would send a one-click POST to a URL the relay cannot vouch for; the lack is counted."""
    metrics = RelayMetrics()
    added, logs = run(UnsubscribePolicy.ADDS, wire(ONE_CLICK[0]), metrics)
    assert added == b""
    assert added_count(metrics, "kept") == 1
    assert missing_count(metrics, "adds", "List-Unsubscribe-Post") == 1
    assert [e["event"] for e in logs] == ["unsubscribe.missing"]


def test_unsubscribe_fields_adds_only_list_unsubscribe_next_to_the_senders_post() -> None:
    metrics = RelayMetrics()
    added, logs = run(UnsubscribePolicy.ADDS, wire(ONE_CLICK[1]), metrics)
    assert added.startswith(b"List-Unsubscribe: <https://relay.kw.test/unsubscribe/")
    assert added.count(b"\r\n") == 1
    found = read_unsubscribe_headers(added + wire(ONE_CLICK[1]).content())
    assert found.missing == ()
    assert [e["event"] for e in logs] == ["unsubscribe.added"]


@pytest.mark.parametrize("h", ["from:to:list-unsubscribe", "from:List-Unsubscribe-Post"])
def test_unsubscribe_fields_adds_nothing_a_dkim_signature_covers(h: str) -> None:
    """A DKIM-Signature whose h= lists either header (signed as absent) means nothing is
    added: the message goes as is, logged at warning and counted."""
    metrics = RelayMetrics()
    added, logs = run(UnsubscribePolicy.ADDS,
                      wire(f"DKIM-Signature: v=1; d=kw.test; s=sel; h={h}; b=x"), metrics)
    assert added == b""
    assert added_count(metrics, "dkim_signed") == 1
    assert added_count(metrics, "added") == 0
    [warning] = [e for e in logs if e["event"] == "unsubscribe.not_added"]
    assert (warning["reason"], warning["log_level"]) == ("dkim_signed", "warning")
    assert missing_count(metrics, "adds", "List-Unsubscribe") == 1
