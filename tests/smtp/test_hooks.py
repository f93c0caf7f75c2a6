"""relay.handler: aiosmtpd finds hooks by name, so the handler must expose exactly ours."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from aiosmtpd.smtp import SMTP as AiosmtpdSMTP
from cryptography.fernet import Fernet

from relay.config.policies import load_policies
from relay.config.settings import Settings
from relay.decisions.months import SystemClock
from relay.decisions.quota import QuotaStore
from relay.decisions.suppression import SuppressionStore
from relay.delivery.capture import CaptureUpstream
from relay.delivery.credentials import CredentialStore
from relay.events.stream import EventLog
from relay.identity.accounts import AccountStore
from relay.observe.metrics import detached
from relay.process.wiring import make_routes
from relay.smtp.hooks import RelayHandler, hook_names
from relay.smtp.listeners import make_factory
from relay.smtp.screening import RecipientScreen
from relay.smtp.services import Services
from tests.conftest import POLICIES

EXPECTED = {"handle_MAIL", "handle_RCPT", "handle_DATA", "handle_exception", "handle_PROXY",
            "auth_PLAIN", "auth_LOGIN"}
# Parameters after ``self``, in the order aiosmtpd passes them.
SIGNATURES = {
    "handle_MAIL": ["server", "session", "envelope", "address", "mail_options"],
    "handle_RCPT": ["server", "session", "envelope", "address", "rcpt_options"],
    "handle_DATA": ["server", "session", "envelope"],
    "handle_exception": ["error"],
    "handle_PROXY": ["server", "session", "envelope", "proxy_data"],
    "auth_PLAIN": ["server", "args"],
    "auth_LOGIN": ["server", "args"],
}


def make_handler(redis_client: aioredis.Redis, tmp_path: Path) -> RelayHandler:
    settings = Settings(state_dir=tmp_path, policies_dir=POLICIES)
    policies = load_policies(POLICIES)
    credentials = CredentialStore(redis_client, Fernet.generate_key())
    routes = make_routes(settings, policies, CaptureUpstream(tmp_path / "capture"), credentials)
    quota = QuotaStore(redis_client)
    screen = RecipientScreen(SuppressionStore(redis_client), quota, detached())
    services = Services(quota=quota, events=EventLog(redis_client), routes=routes,
                        policies=policies, max_recipients=10, screen=screen)
    return RelayHandler(accounts=AccountStore(redis_client), services=services,
                        clock=SystemClock(), hostname="relay.test", default_tz="UTC")


def test_handler_hook_names_exact() -> None:
    """hook_names() is exactly the five handle_ hooks and two AUTH mechanisms we implement."""
    assert hook_names() == EXPECTED


def test_handler_hooks_are_coroutine_functions() -> None:
    """Every hook is an async def (aiosmtpd awaits them)."""
    for name in EXPECTED:
        assert inspect.iscoroutinefunction(getattr(RelayHandler, name)), name


def test_handler_hook_signatures_match_aiosmtpd() -> None:
    """Each hook takes the arguments aiosmtpd passes, in aiosmtpd's order."""
    for name, params in SIGNATURES.items():
        method: Callable[..., Any] = getattr(RelayHandler, name)
        assert list(inspect.signature(method).parameters)[1:] == params, name


async def test_handler_hooks_found_by_aiosmtpd(redis_client: aioredis.Redis,
                                               tmp_path: Path) -> None:
    """An aiosmtpd SMTP built as production builds it resolves our handle_ hooks and our
    (not its built-in) PLAIN and LOGIN mechanisms."""
    handler = make_handler(redis_client, tmp_path)
    factory = make_factory(handler, hostname="relay.test", data_size_limit=1024,
                           idle_timeout=5, tls_context=None, allow_plaintext_auth=True,
                           implicit_tls=False)
    smtp = factory()
    assert isinstance(smtp, AiosmtpdSMTP)
    # aiosmtpd strips "handle_" and calls hooks by command name (MAIL, RCPT, DATA).
    hooks = smtp._handle_hooks
    assert set(hooks) == {"MAIL", "RCPT", "DATA", "exception", "PROXY"}
    for command, hook in hooks.items():
        assert hook.__self__ is handler, command
        assert hook.__func__ is getattr(RelayHandler, f"handle_{command}"), command
    auth = smtp._auth_methods
    for mechanism in ("PLAIN", "LOGIN"):
        assert not auth[mechanism].is_builtin, mechanism
        assert auth[mechanism].method.__self__ is handler, mechanism
        assert auth[mechanism].method.__func__ is getattr(RelayHandler, f"auth_{mechanism}")
