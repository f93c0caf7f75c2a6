"""aiosmtpd's ``SMTP.__init__`` without its per-connection class walks.

aiosmtpd builds three dispatch tables in every ``SMTP()``: the AUTH mechanisms
(``inspect.getmembers`` of the protocol and of the handler), the handler's hooks and the
protocol's ``smtp_*`` commands (``dir`` of each). They depend only on the protocol's class and
the handler, yet cost about 0.3 ms of CPU per connection (two thirds of building the
connection object), paid again by every client that connects for one message.

``init_smtp`` does what ``SMTP.__init__`` does (aiosmtpd 1.4.6) with the walks done once per
(class, handler) and only the binding to the new instance repeated. It sets exactly the
attributes aiosmtpd's own ``__init__`` sets, to the same values:
``tests/smtp/test_setup.py`` builds one object each way and compares them, so an aiosmtpd
release that changes its ``__init__`` fails that test instead of misbehaving here.
"""

from __future__ import annotations

import asyncio
import inspect
import ssl
import types
from collections.abc import Callable, Iterable
from typing import Any

from aiosmtpd.smtp import SMTP, _AuthMechAttr, login_always_fail

# (protocol class, id of the handler) -> the tables with plain functions, unbound.
_Tables = tuple[
    list[tuple[str, Callable[..., Any], bool]],  # AUTH: name, function, on the protocol?
    dict[str, Callable[..., Any]],  # handler hooks (bound to the handler: shared)
    list[tuple[str, Callable[..., Any]]],  # smtp_* commands: name, function
    str | None,  # the EHLO hook's form
]
_CACHE: dict[tuple[type, int], tuple[Any, _Tables]] = {}


def _tables(protocol: SMTP, handler: Any) -> _Tables:
    key = (type(protocol), id(handler))
    cached = _CACHE.get(key)
    # The handler is kept in the entry so that its id cannot be reused by another object.
    if cached is not None and cached[0] is handler:
        return cached[1]
    cls = type(protocol)
    auth: list[tuple[str, Callable[..., Any], bool]] = []
    for owner in (protocol, handler):
        for name, member in inspect.getmembers(owner):
            if not name.startswith("auth_"):
                continue
            mech = getattr(member, "__auth_mechanism_name__",
                           name.replace("auth_", "").replace("__", "-"))
            if owner is protocol:
                # Bound per instance later: keep the class's function.
                auth.append((mech, getattr(cls, name), True))
            else:
                auth.append((mech, member, False))
    hooks = {m.replace("handle_", ""): getattr(handler, m) for m in dir(handler)
             if m.startswith("handle_")}
    ehlo = hooks.get("EHLO")
    ehlo_form = None
    if ehlo is not None:
        params = len(inspect.signature(ehlo).parameters)
        if params not in (4, 5):
            raise RuntimeError("Unsupported EHLO Hook")
        ehlo_form = "old" if params == 4 else "new"
    commands = [(m.replace("smtp_", ""), getattr(cls, m)) for m in dir(cls)
                if m.startswith("smtp_")]
    tables: _Tables = (auth, hooks, commands, ehlo_form)
    _CACHE[key] = (handler, tables)
    return tables


def init_smtp(self: SMTP, handler: Any, *, data_size_limit: int | None, enable_SMTPUTF8: bool,
              decode_data: bool, hostname: str, ident: str, tls_context: ssl.SSLContext | None,
              timeout: float, auth_required: bool, auth_require_tls: bool,
              command_call_limit: int | dict[str, int] | None,
              proxy_protocol_timeout: float | None = None,
              auth_exclude_mechanism: Iterable[str] | None = None,
              loop: asyncio.AbstractEventLoop | None = None) -> None:
    """``SMTP.__init__(self, handler, ...)`` for the arguments the relay passes (an explicit
    hostname: never ``socket.getfqdn()``; no authenticator or auth callback: AUTH is the
    handler's; no ``require_starttls``)."""
    self.__ident__ = ident
    self.loop = loop if loop else asyncio.get_event_loop()
    asyncio.StreamReaderProtocol.__init__(
        self, asyncio.StreamReader(loop=self.loop, limit=self.line_length_limit),
        client_connected_cb=self._cb_client_connected, loop=self.loop)
    self.event_handler = handler
    self.data_size_limit = data_size_limit
    self.enable_SMTPUTF8 = enable_SMTPUTF8
    self._decode_data = decode_data
    self.command_size_limits.clear()
    self.hostname = hostname
    self.tls_context = tls_context
    # As aiosmtpd has it: ``tls_context and require_starttls``, with require_starttls off.
    self.require_starttls = None if tls_context is None else False
    self._timeout_duration = timeout
    self._timeout_handle = None
    self._tls_handshake_okay = True
    self._tls_protocol = None
    self._original_transport = None
    self.session = None
    self.envelope = None
    self.transport = None
    self._handler_coroutine = None
    self._auth_require_tls = auth_require_tls
    if proxy_protocol_timeout is not None and proxy_protocol_timeout <= 0:
        raise ValueError("proxy_protocol_timeout must be > 0")
    self._proxy_timeout = proxy_protocol_timeout
    self._auth_callback = login_always_fail
    self._authenticator = None
    self._auth_required = auth_required
    auth, hooks, commands, ehlo_form = _tables(self, handler)
    self._auth_methods = {
        mech: _AuthMechAttr(types.MethodType(func, self) if on_protocol else func,
                            on_protocol)
        for mech, func, on_protocol in auth}
    for mech in auth_exclude_mechanism or ():
        self._auth_methods.pop(mech, None)
    self._handle_hooks = dict(hooks)
    self._ehlo_hook_ver = ehlo_form
    self._smtp_methods = {name: types.MethodType(func, self) for name, func in commands}
    if command_call_limit is None:
        self._enforce_call_limit = False
    else:
        self._enforce_call_limit = True
        if isinstance(command_call_limit, int):
            self._call_limit_base = {}
            self._call_limit_default = command_call_limit
        else:
            self._call_limit_base = command_call_limit
            self._call_limit_default = command_call_limit.get("*", 20)
