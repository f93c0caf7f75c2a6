"""The root of the refusals: ``RelayError`` and its two classes (4xx ``TemporaryError``, 5xx
``PermanentError``), with the one method that counts and logs a refusal, and the local
failures any stage may raise (Redis unreachable, a bug)."""

from __future__ import annotations

from typing import Any, Literal, Protocol

import structlog

# The levels a refusal is logged at: expected client or upstream behaviour, never an error
# (an error line would page someone for a client's mistake).
RefusalLevel = Literal["debug", "info", "warning"]


class RefusalCounter(Protocol):
    """What ``log_refusal`` needs of a metric: a Prometheus counter (or one of its labelled
    children) fits. A protocol, so that the errors need not import the metrics."""

    def inc(self) -> None: ...


class RelayError(Exception):
    """A refusal with its SMTP reply. Subclasses set the defaults; instances may refine text."""

    code: int = 451
    status: str = "4.3.0"
    text: str = "Temporary local problem, try again later"

    def __init__(self, text: str | None = None, *, code: int | None = None,
                 status: str | None = None) -> None:
        if text is not None:
            self.text = text
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        super().__init__(self.reply)

    @property
    def reply(self) -> str:
        return f"{self.code} {self.status} {self.text}"

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    @property
    def reason(self) -> str:
        """The name logs and metric labels give this refusal: its class's name."""
        return type(self).__name__

    def log_refusal(self, log: structlog.typing.FilteringBoundLogger, event: str,
                    counter: RefusalCounter | None = None, *, level: RefusalLevel = "info",
                    **fields: Any) -> None:
        """Record this refusal: count ``counter`` (when given), then log ``event`` at
        ``level`` with ``fields`` and ``smtp_code``, the code the client hears. Every log
        line that names a refusal's code is written here, so none can disagree with the
        reply."""
        if counter is not None:
            counter.inc()
        getattr(log, level)(event, **fields, smtp_code=self.code)


class TemporaryError(RelayError):
    """4xx: RFC 5321 §4.2.5, the client keeps the message and tries again later."""


class PermanentError(RelayError):
    """5xx: the client must not retry the same transaction unchanged."""

    code = 550
    status = "5.0.0"
    text = "Rejected"


class StoreUnavailableError(TemporaryError):
    code = 451
    status = "4.3.0"
    text = "Quota store unavailable, try again later"


class InternalError(TemporaryError):
    code = 451
    status = "4.3.0"
    text = "Internal error, try again later"
