"""``configure_logging()``: structlog JSON lines for operators (STYLE §1 step 9, §7).

Called once from ``cli.py``. JSON lines on stdout in production (one object per line, ISO
UTC time, stable field names), a readable console format on a terminal. Logs never carry
passwords, AUTH payloads or message bodies; recipients appear only as domains and counts.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import orjson
import structlog
import structlog.tracebacks

# Tracebacks without frame locals: a local can hold an AUTH argument (base64 of a login and
# its password), a password or a key, and structlog's default dict traceback shows them all.
_TRACEBACKS = structlog.processors.ExceptionRenderer(
    structlog.tracebacks.ExceptionDictTransformer(show_locals=False))

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


def _dumps(value: Any, **kwargs: Any) -> bytes:
    """orjson, which refuses a str that is not valid UTF-8 (a lone surrogate, as aiosmtpd's
    surrogateescape decoding makes of a client's bad bytes). Such a line must still be
    written, not raise into the code that logged it: the bad characters are escaped."""
    try:
        return orjson.dumps(value, **kwargs)
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return orjson.dumps(_escaped(value), default=repr, **kwargs)


def _escaped(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {_escaped(k): _escaped(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_escaped(v) for v in value]
    return value


def configure_logging(fmt: str = "auto", level: str = "info", *, cache: bool = True,
                      stream: TextIO | None = None) -> None:
    """``fmt`` is json, console or auto (console on a TTY). ``cache=False`` in tests, where
    cached loggers would defeat ``structlog.testing.capture_logs``. ``stream`` defaults to
    stdout; admin commands pass stderr so their stdout carries only their result."""
    out = sys.stdout if stream is None else stream
    console = fmt == "console" or (fmt == "auto" and out.isatty())
    binary = getattr(out, "buffer", None)  # a real file; a StringIO has none
    renderer: structlog.typing.Processor
    logger_factory: structlog.typing.WrappedLogger
    if console:
        # plain_traceback: rich's and better_exceptions' formatters print frame locals.
        renderer = structlog.dev.ConsoleRenderer(
            exception_formatter=structlog.dev.plain_traceback)
        logger_factory = structlog.PrintLoggerFactory(out)
    elif binary is not None:
        # orjson renders a line several times faster than json.dumps (issue 5: bounded
        # logging cost); it writes bytes, so the line goes to the stream's buffer.
        renderer = structlog.processors.JSONRenderer(serializer=_dumps,
                                                     option=orjson.OPT_NON_STR_KEYS)
        logger_factory = structlog.BytesLoggerFactory(binary)
    else:
        renderer = structlog.processors.JSONRenderer()
        logger_factory = structlog.PrintLoggerFactory(out)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _TRACEBACKS if not console else structlog.dev.set_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=logger_factory,
        cache_logger_on_first_use=cache,
    )
    # aiosmtpd logs every command line (recipients, AUTH exchanges) to "mail.log" at INFO and
    # a deprecation notice at WARNING on every AUTH; the relay's own structured lines replace
    # it. Its errors still reach stderr.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    # Its PROXY parser warns on "mail.debug" for every bad header; server.py logs those as
    # proxy.refused, with the session's fields.
    logging.getLogger("mail.debug").setLevel(logging.ERROR)
