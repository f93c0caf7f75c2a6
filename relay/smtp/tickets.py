"""One TLS session-ticket key for every worker, so that a returning client resumes its session
whichever worker the kernel hands its next connection to.

OpenSSL makes a random ticket key per SSL_CTX: with N workers a ticket resumes only on the
worker that issued it (1/N of returning connections). The supervisor makes one random
80-byte key at start (``new_key``) and hands it to its workers in their environment
(``TICKET_KEY_VAR``, hex); each worker installs it on its server context (``share``).

Python's ssl module has no API for SSL_CTX_set_tlsext_ticket_keys, so this goes through
ctypes: the ``SSL_CTX *`` is the first field after PyObject_HEAD in CPython's PySSLContext,
and SSL_CTX_ctrl comes from the very libssl ``_ssl`` is linked against (looked up through
``_ssl``'s own handle, so never a second copy of the library). Because that reaches into
CPython's internals, ``share`` first proves the pointer is the context's (its options read
back through OpenSSL equal ``SSLContext.options``), then proves the whole thing works: two
fresh contexts given the key, a ticket issued by one must resume on the other (memory BIOs,
no sockets). Anything short of that logs ``tls.tickets_unshared`` with the reason and leaves
the context with its own key: resumption is an optimisation, never a reason to fail start-up.

The key lives only in memory (the supervisor's and its workers' environment, never on disk)
and changes on every start of the supervisor: tickets issued before a restart then fall back
to a full handshake. It is a secret (it decrypts every ticket, hence every resumed session's
keys): no log line, error or repr carries it.
"""

from __future__ import annotations

import ctypes
import os
import ssl
from collections.abc import Callable, MutableMapping

import structlog

log = structlog.get_logger()

TICKET_KEY_VAR = "COMMAND_RELAY_TLS_TICKET_KEY"
KEY_BYTES = 80  # OpenSSL: 16 bytes key name, 32 HMAC key, 32 AES key
_SSL_CTRL_SET_TLSEXT_TICKET_KEYS = 59


class TicketKeyError(Exception):
    """Why the shared key cannot be used here (the message never holds the key)."""


def new_key() -> bytes:
    return os.urandom(KEY_BYTES)


def export_key(key: bytes, env: MutableMapping[str, str]) -> None:
    env[TICKET_KEY_VAR] = key.hex()


def take_key(env: MutableMapping[str, str] | None = None) -> bytes | None:
    """The supervisor's key, removed from ``env`` (os.environ) so that nothing this process
    starts inherits it; None when there is none (a single-process relay)."""
    text = (os.environ if env is None else env).pop(TICKET_KEY_VAR, None)
    if not text:
        return None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        log.warning("tls.tickets_unshared", reason=f"{TICKET_KEY_VAR} is not {KEY_BYTES} "
                                                   "bytes of hex")
        return None
    return key


class _OpenSSL:
    """The two libssl functions needed, bound to the library ``_ssl`` uses."""

    def __init__(self) -> None:
        lib = ctypes.CDLL(ssl._ssl.__file__)  # type: ignore[attr-defined]
        try:
            self.ctrl = lib.SSL_CTX_ctrl
            self.get_options = lib.SSL_CTX_get_options
        except AttributeError as exc:
            raise TicketKeyError(f"libssl has no {exc}") from None
        self.ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
        self.ctrl.restype = ctypes.c_long
        self.get_options.argtypes = [ctypes.c_void_p]
        self.get_options.restype = ctypes.c_uint64


def _ssl_ctx(lib: _OpenSSL, context: ssl.SSLContext) -> int:
    """The SSL_CTX * of ``context``, checked against what the ssl module reports."""
    if type(context).__basicsize__ < object.__basicsize__ + ctypes.sizeof(ctypes.c_void_p):
        raise TicketKeyError("unexpected SSLContext layout")
    pointer = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value
    if not pointer:
        raise TicketKeyError("SSLContext holds no SSL_CTX")
    if lib.get_options(pointer) != int(context.options):
        raise TicketKeyError("SSLContext layout not recognised (options differ)")
    return pointer


def install(context: ssl.SSLContext, key: bytes, lib: _OpenSSL | None = None) -> None:
    """Give ``context`` the ticket key. Raises TicketKeyError."""
    if len(key) != KEY_BYTES:
        raise TicketKeyError(f"a ticket key is {KEY_BYTES} bytes")
    lib = lib or _OpenSSL()
    buffer = ctypes.create_string_buffer(key, KEY_BYTES)
    try:
        if lib.ctrl(_ssl_ctx(lib, context), _SSL_CTRL_SET_TLSEXT_TICKET_KEYS, KEY_BYTES,
                    buffer) != 1:
            raise TicketKeyError("SSL_CTX_ctrl refused the ticket keys")
    finally:
        ctypes.memset(buffer, 0, KEY_BYTES)


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext,
               session: ssl.SSLSession | None) -> ssl.SSLObject:
    """A handshake over memory BIOs; the client, once it has read the server's tickets."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, session=session)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for side in (client, server):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
            s_in.write(c_out.read())
            c_in.write(s_out.read())
    try:
        client.read(1)  # takes the NewSessionTicket messages
    except ssl.SSLWantReadError:
        pass
    return client


def resumes_across(first: ssl.SSLContext, second: ssl.SSLContext) -> bool:
    """Whether a TLS 1.3 session ``first`` issued resumes on ``second`` (the server's
    certificate is not checked: only the ticket matters here)."""
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    client_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    session = _handshake(first, client_ctx, None).session
    return session is not None and _handshake(second, client_ctx, session).session_reused


def self_check(make_context: Callable[[], ssl.SSLContext], key: bytes,
               lib: _OpenSSL | None = None) -> None:
    """Two fresh contexts given ``key``: a ticket from one must resume on the other.
    Raises TicketKeyError."""
    lib = lib or _OpenSSL()
    first, second = make_context(), make_context()
    install(first, key, lib)
    install(second, key, lib)
    try:
        ok = resumes_across(first, second)
    except (ssl.SSLError, OSError) as exc:
        raise TicketKeyError(f"self-check handshake failed: {type(exc).__name__}") from None
    if not ok:
        raise TicketKeyError("self-check: a ticket did not resume on a second context")


def share(context: ssl.SSLContext, key: bytes | None,
          make_context: Callable[[], ssl.SSLContext]) -> bool:
    """Install the workers' shared ``key`` on ``context`` once the self-check passed (fresh
    contexts from ``make_context``); True if installed. Never raises: a failure is logged
    once and the context keeps its own key."""
    if key is None:
        return False
    try:
        lib = _OpenSSL()
        self_check(make_context, key, lib)
        install(context, key, lib)
    except (TicketKeyError, OSError, ValueError, TypeError) as exc:
        log.warning("tls.tickets_unshared", reason=str(exc),
                    note="each worker resumes only the sessions it issued")
        return False
    log.info("tls.tickets_shared", num_tickets=context.num_tickets)
    return True
