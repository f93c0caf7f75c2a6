"""``configure_logging()``: structlog JSON lines for operators (STYLE §1 step 9, §7).

Called once from ``relay/cli/``. JSON lines on stdout in production (one object per line, ISO
UTC time, stable field names), a readable console format on a terminal, and for the admin
commands one readable line per warning (``line``). Logs never carry passwords, AUTH payloads
or message bodies; recipients appear only as domains and counts.

The libraries' own loggers (aiohttp's ``aiohttp.server`` and ``aiohttp.access``, asyncio,
redis-py, aiosmtpd's ``mail.log``) go through the same pipeline, by structlog's
``ProcessorFormatter`` on the root logger: a JSON log stays one JSON object per line, with
``level``, ``timestamp`` and ``logger``, whoever wrote the line.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import orjson
import structlog
import structlog.tracebacks
from aiohttp.http_exceptions import HttpProcessingError

# Tracebacks without frame locals: a local can hold an AUTH argument (base64 of a login and
# its password), a password or a key, and structlog's default dict traceback shows them all.
# The same transformer renders the tracebacks of the libraries' records.
_TRACEBACKS = structlog.processors.ExceptionRenderer(
    structlog.tracebacks.ExceptionDictTransformer(show_locals=False))

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}
FORMATS = ("auto", "json", "console", "line")
PROG = "command-relay"


def _orjson_text(obj: Any, **kw: Any) -> str:
    # The stdlib handler writes text, so the libraries' lines are rendered to str.
    return orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS, **kw).decode()


def _one_line(_logger: Any, method: str, event: structlog.typing.EventDict) -> str:
    """``command-relay: warning: dev.embedded_redis: <note> (key=value, …)``: what an admin
    command prints on stderr next to its human output. An exception shows as its type and
    message, never a traceback."""
    event.pop("timestamp", None)
    level = event.pop("level", method)
    name = str(event.pop("event", ""))
    note = event.pop("note", None)
    exc_info = event.pop("exc_info", None)
    event.pop("exception", None)
    if exc_info is True:
        exc_info = sys.exc_info()
    if isinstance(exc_info, BaseException):
        event["error"] = f"{type(exc_info).__name__}: {exc_info}"
    elif isinstance(exc_info, tuple) and exc_info[1] is not None:
        event["error"] = f"{type(exc_info[1]).__name__}: {exc_info[1]}"
    fields = ", ".join(f"{key}={value}" for key, value in event.items()
                       if not key.startswith("_"))
    text = f"{PROG}: {level}: {name}" + (f": {note}" if note else "") \
        + (f" ({fields})" if fields else "")
    return " ".join(text.split())  # one line, whatever a value holds


class _ClientErrorsAreWarnings(logging.Filter):
    """aiohttp logs a malformed HTTP request (a client's mistake, answered 400) at ERROR with
    a traceback; like every other client misbehaviour it is a warning without one."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if record.name == "aiohttp.server" and isinstance(exc, HttpProcessingError):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            # The first line only: the rest quotes the client's bytes back.
            reason = str(exc.message).splitlines()[0] if exc.message else ""
            record.msg = f"{record.getMessage()}: {exc.code} {type(exc).__name__}: {reason}"
            record.args = ()
            record.exc_info = record.exc_text = None
        return True


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
    """``fmt`` is json, console, auto (console on a TTY) or line (one readable line per
    record, for the admin commands). ``cache=False`` in tests, where cached loggers would
    defeat ``structlog.testing.capture_logs``. ``stream`` defaults to stdout; admin commands
    pass stderr so their stdout carries only their result."""
    out = sys.stdout if stream is None else stream
    console = fmt == "console" or (fmt == "auto" and out.isatty())
    binary = getattr(out, "buffer", None)  # a real file; a StringIO has none
    renderer: structlog.typing.Processor
    foreign: structlog.typing.Processor
    logger_factory: structlog.typing.WrappedLogger
    if fmt == "line":
        renderer = foreign = _one_line
        logger_factory = structlog.PrintLoggerFactory(out)
    elif console:
        # plain_traceback: rich's and better_exceptions' formatters print frame locals.
        renderer = foreign = structlog.dev.ConsoleRenderer(
            exception_formatter=structlog.dev.plain_traceback)
        logger_factory = structlog.PrintLoggerFactory(out)
    elif binary is not None:
        # orjson renders a line several times faster than json.dumps (bounded
        # logging cost); it writes bytes, so the line goes to the stream's buffer.
        renderer = structlog.processors.JSONRenderer(serializer=_dumps,
                                                     option=orjson.OPT_NON_STR_KEYS)
        foreign = structlog.processors.JSONRenderer(serializer=_orjson_text)
        logger_factory = structlog.BytesLoggerFactory(binary)
    else:
        renderer = foreign = structlog.processors.JSONRenderer()
        logger_factory = structlog.PrintLoggerFactory(out)
    exceptions = _TRACEBACKS if not console and fmt != "line" else structlog.dev.set_exc_info
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            exceptions,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=logger_factory,
        cache_logger_on_first_use=cache,
    )
    _route_library_logs(out, foreign, exceptions if exceptions is _TRACEBACKS else None,
                        max(_LEVELS[level], logging.WARNING))


def _route_library_logs(out: TextIO, renderer: structlog.typing.Processor,
                        exceptions: structlog.typing.Processor | None, level: int) -> None:
    """Send every stdlib logger through structlog's processors to ``out``: one handler on
    the root logger, replacing the one a previous call installed (tests configure often)."""
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            *([exceptions] if exceptions is not None else []),
        ],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    handler.addFilter(_ClientErrorsAreWarnings())
    handler.set_name("command-relay")
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "command-relay"]:
        root.removeHandler(old)
    root.addHandler(handler)
    # The libraries' chatter below warning (per-request debug lines) stays off.
    root.setLevel(level)
    # aiosmtpd logs every command line (recipients, AUTH exchanges) to "mail.log" at INFO and
    # a deprecation notice at WARNING on every AUTH; the relay's own structured lines replace
    # it. Its errors still reach the log.
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    # Its PROXY parser warns on "mail.debug" for every bad header; smtp/admission.py logs those as
    # proxy.refused, with the session's fields.
    logging.getLogger("mail.debug").setLevel(logging.ERROR)
