"""The shared TLS ticket key (relay/smtp/tickets.py): real contexts, real handshakes over
memory BIOs, real libssl through ctypes."""

from __future__ import annotations

import functools
import ssl
from collections.abc import Callable

import pytest
import structlog.testing

from relay.smtp import tickets
from relay.smtp.tls import ensure_dev_certificate, server_context
from tests.secretscan import SCANNER, register

Maker = Callable[[], ssl.SSLContext]


@pytest.fixture(scope="module")
def make(tmp_path_factory: pytest.TempPathFactory) -> Maker:
    cert, key = ensure_dev_certificate(tmp_path_factory.mktemp("tls"), "relay.test")
    return functools.partial(server_context, cert, key)


@pytest.fixture
def key() -> bytes:
    value = tickets.new_key()
    register(value.hex(), "a test's ticket key")
    return value


def test_a_shared_key_resumes_across_contexts_and_only_then(make: Maker, key: bytes) -> None:
    first, second, other = make(), make(), make()
    assert not tickets.resumes_across(first, second)  # OpenSSL's own key per context
    tickets.install(first, key)
    tickets.install(second, key)
    tickets.install(other, tickets.new_key())
    assert tickets.resumes_across(first, second)
    assert tickets.resumes_across(second, first)
    assert not tickets.resumes_across(first, other)
    assert first.num_tickets == 1


def test_share_installs_after_its_self_check(make: Maker, key: bytes) -> None:
    context = make()
    with structlog.testing.capture_logs() as logs:
        assert tickets.share(context, key, make)
    assert [e["event"] for e in logs] == ["tls.tickets_shared"]
    peer = make()
    tickets.install(peer, key)
    assert tickets.resumes_across(peer, context)


def test_share_without_a_key_leaves_the_context_alone(make: Maker) -> None:
    with structlog.testing.capture_logs() as logs:
        assert not tickets.share(make(), None, make)
    assert logs == []


@pytest.mark.parametrize(("broken", "reason"), [
    # A context that issues no ticket: nothing can resume, the self-check must say so.
    ("no_tickets", "did not resume on a second context"),
    # One the self-check's TLS 1.3 client cannot even talk to.
    ("tls12_only", "self-check handshake failed"),
])
def test_a_failed_self_check_warns_once_and_carries_on(make: Maker, key: bytes, broken: str,
                                                       reason: str) -> None:
    def make_broken() -> ssl.SSLContext:
        context = make()
        if broken == "no_tickets":
            context.num_tickets = 0
        else:
            context.maximum_version = ssl.TLSVersion.TLSv1_2
        return context

    context = make()
    with structlog.testing.capture_logs() as logs:
        assert not tickets.share(context, key, make_broken)
    [warning] = logs
    assert warning["event"] == "tls.tickets_unshared" and warning["log_level"] == "warning"
    assert reason in warning["reason"]
    # The context kept its own key: a ticket from a context given the key does not resume.
    peer = make()
    tickets.install(peer, key)
    assert not tickets.resumes_across(peer, context)
    assert SCANNER.scan_text(repr(logs), "warning") == []


def test_install_refuses_a_key_of_the_wrong_length_without_echoing_it(make: Maker) -> None:
    bad = tickets.new_key()[:40]
    with pytest.raises(tickets.TicketKeyError) as caught:
        tickets.install(make(), bad)
    assert bad.hex() not in str(caught.value) and repr(bad) not in str(caught.value)


def test_take_key_reads_and_removes_the_variable(key: bytes) -> None:
    env: dict[str, str] = {}
    tickets.export_key(key, env)
    assert tickets.take_key(env) == key
    assert env == {}
    assert tickets.take_key(env) is None


@pytest.mark.parametrize("text", ["zz" * 80, "ab" * 40])
def test_take_key_refuses_a_malformed_variable_without_echoing_it(text: str) -> None:
    env = {tickets.TICKET_KEY_VAR: text}
    with structlog.testing.capture_logs() as logs:
        assert tickets.take_key(env) is None
    [warning] = logs
    assert warning["event"] == "tls.tickets_unshared"
    assert text not in repr(warning) and env == {}


def test_the_key_is_covered_by_the_secret_scanner(key: bytes) -> None:
    env = {tickets.TICKET_KEY_VAR: tickets.new_key().hex()}
    SCANNER.register_env(env)
    line = f'{{"event": "oops", "key": "{env[tickets.TICKET_KEY_VAR]}"}}'
    assert len(SCANNER.scan_text(line, "a made-up log line")) == 1
