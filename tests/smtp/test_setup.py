"""relay/smtp/setup.py: the lean SMTP set-up leaves a connection exactly as aiosmtpd's own
``SMTP.__init__`` does, for every listener shape the relay builds, only without walking the
classes on every connection. An aiosmtpd release that changes its ``__init__`` fails here."""

from __future__ import annotations

import asyncio
import ssl
import types
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, _AuthMechAttr

from relay.process.wiring import RelayApp
from relay.smtp import connection
from relay.smtp.admission import ConnectionLimiter
from relay.smtp.listeners import make_factory
from relay.smtp.proxy import ProxyPolicy
from relay.smtp.tls import server_context

# Per connection by design: a random id and the logger bound to it.
_OWN = {"session_id", "session_log"}


def shape(value: Any, owner: object) -> Any:
    """A value in a form that compares across two objects: bound methods by function and
    by whether they are bound to their own object; fresh asyncio objects by type."""
    if isinstance(value, types.MethodType):
        return ("method", value.__func__, value.__self__ is owner or id(value.__self__))
    if isinstance(value, _AuthMechAttr):
        return ("auth", shape(value.method, owner), value.is_builtin)
    if isinstance(value, dict):
        return {k: shape(v, owner) for k, v in value.items()}
    if isinstance(value, (asyncio.StreamReader, asyncio.Future, types.FunctionType)) or \
            type(value).__name__ in {"ReferenceType", "Event"}:
        return type(value)
    return value


def built_by_aiosmtpd(factory: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    with monkeypatch.context() as patch:
        patch.setattr(connection, "init_smtp",
                      lambda self, handler, **kwargs: SMTP.__init__(self, handler, **kwargs))
        return factory()


@pytest.mark.parametrize("implicit_tls, plaintext_auth, proxied", [
    (False, False, False), (False, True, False), (True, False, False), (False, False, True)])
async def test_a_connection_is_set_up_as_aiosmtpd_would(
        relay: RelayApp, monkeypatch: pytest.MonkeyPatch, implicit_tls: bool,
        plaintext_auth: bool, proxied: bool, tls_files: tuple[Any, Any]) -> None:
    context: ssl.SSLContext = server_context(*tls_files)
    factory = make_factory(
        relay.handler, hostname="relay.test", data_size_limit=1000, idle_timeout=30,
        tls_context=context, allow_plaintext_auth=plaintext_auth, implicit_tls=implicit_tls,
        connections=ConnectionLimiter(total=10, per_client=5),
        proxy=ProxyPolicy(trusted=(), timeout=5) if proxied else None)
    theirs = built_by_aiosmtpd(factory, monkeypatch)
    for ours in (factory(), factory()):  # the second one from the cached tables
        assert set(vars(ours)) == set(vars(theirs))
        for name in set(vars(ours)) - _OWN:
            assert shape(getattr(ours, name), ours) == shape(getattr(theirs, name), theirs), \
                name
        assert ours._auth_methods.keys() == {"LOGIN", "PLAIN"}
        assert ours._smtp_methods["EHLO"].__self__ is ours


async def test_the_tables_are_per_handler(relay: RelayApp, make_relay: Any) -> None:
    other = await make_relay()
    made = [make_factory(app.handler, hostname="relay.test", data_size_limit=1000,
                         idle_timeout=30, tls_context=None, allow_plaintext_auth=True,
                         implicit_tls=False)() for app in (relay, other)]
    assert made[0]._handle_hooks["MAIL"].__self__ is relay.handler
    assert made[1]._handle_hooks["MAIL"].__self__ is other.handler
