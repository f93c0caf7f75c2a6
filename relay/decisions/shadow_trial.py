"""Policies trialled in shadow, on the SMTP path (docs/shadow.md): the hooks the live
decisions call, which evaluate the candidate policies beside them, log ``shadow.differs``,
count the difference in metrics and queue it for the Redis counts. Nothing is enforced.

Every hook is synchronous (no await, so no Redis round trip and nothing that can wait) and
swallows its own failures: an evaluation that raises is a bug, logged as ``shadow.failed``
and counted, and the live decision goes on as if there were no shadow. A trial is built
with the live policies it is compared with and is replaced with them on a reload; a bad
shadow file gives the trial that is off (``OFF``) and a ``shadow.invalid`` line.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC
from pathlib import Path

import structlog

from relay.config.policies import Policies, PolicyError
from relay.config.shadow import Candidate, load_candidate
from relay.decisions.months import Clock, Period
from relay.decisions.quota import Reservation, Settlement
from relay.decisions.routing import Decision
from relay.decisions.shadow import (
    Difference,
    notice_difference,
    refusal_difference,
    route_difference,
)
from relay.decisions.shadow_counts import Counted, ShadowCounts
from relay.identity.accounts import User
from relay.observe.metrics import RelayMetrics

log = structlog.get_logger()
Log = structlog.typing.FilteringBoundLogger
# What an example in the Redis counts keeps of the live decision's log context.
_EXAMPLE_FIELDS = ("txn_id", "user_id", "plan", "period", "sender_domain")


@dataclass(frozen=True, slots=True)
class Recorder:
    """Where a difference goes: the log, the metrics, the Redis counts."""

    metrics: RelayMetrics
    counts: ShadowCounts
    clock: Clock

    def record(self, difference: Difference, *, app: str, log: Log) -> None:
        self.metrics.shadow_differences(difference.kind).inc()
        log.info("shadow.differs", kind=difference.kind, live=difference.live,
                 candidate=difference.candidate, app=app, **difference.detail)
        context = structlog.get_context(log)
        now = self.clock.now().astimezone(UTC)
        example = {"at": now.isoformat(timespec="seconds"), "kind": difference.kind,
                   "app": app, "live": difference.live, "candidate": difference.candidate,
                   **{k: context[k] for k in _EXAMPLE_FIELDS if k in context},
                   **difference.detail}
        self.counts.add(Counted(now.date().isoformat(), difference.kind, app, example))


class ShadowTrial:
    """The candidate beside ``live``; with no candidate, every hook returns at once."""

    def __init__(self, live: Policies | None = None, candidate: Candidate | None = None,
                 recorder: Recorder | None = None) -> None:
        self.candidate = candidate
        # (live, candidate): what each comparison takes; None: the trial is off.
        self.policies: tuple[Policies, Policies] | None = None
        if live is not None and candidate is not None and recorder is not None:
            self.policies = (live, candidate.policies)
        self._recorder = recorder

    @property
    def enabled(self) -> bool:
        return self.policies is not None

    def route(self, live: Decision, *, user: User, app: str, header: str, log: Log) -> None:
        """The route decision ``live`` for (app, the user's saved preference, header)."""
        if self.policies is None:
            return
        try:
            found = route_difference(live, self.policies[1].routing, app=app,
                                     preference=user.preferences.get(app), header=header)
            if found is not None:
                self.record(found, app, log)
        except Exception:
            self.failed("route", log)

    def watch(self, *, user: User, period: Period, app: str, log: Log) -> Watch:
        """The hooks of one transaction (the user, month and app it was opened with)."""
        if self.policies is None:
            return _OFF_WATCH
        return Watch(self, user, period, app, log)

    def record(self, found: Difference, app: str, log: Log) -> None:
        assert self._recorder is not None
        self._recorder.record(found, app=app, log=log)

    def failed(self, step: str, log: Log) -> None:
        if self._recorder is not None:
            self._recorder.metrics.shadow_errors.inc()
        log.exception("shadow.failed", step=step, note="a bug in the shadow trial; live "
                      "mail is unaffected")


class Watch:
    """A transaction's shadow: its route at the end of DATA, its reservations and its
    commit, compared as they happen."""

    __slots__ = ("_app", "_log", "_period", "_trial", "_user")

    def __init__(self, trial: ShadowTrial, user: User, period: Period, app: str,
                 log: Log) -> None:
        self._trial, self._user, self._period, self._app, self._log = \
            trial, user, period, app, log

    def route(self, live: Decision, *, header: str) -> None:
        """The route decided at the end of DATA, with the message's X-KW-Route value."""
        self._trial.route(live, user=self._user, app=self._app, header=header, log=self._log)

    def reserved(self, live: Reservation, rcpt_nos: int | list[int]) -> None:
        """The reservation of one recipient (or of a list of them, all or nothing)."""
        trial = self._trial
        if trial.policies is None:
            return
        try:
            found = refusal_difference(
                live, units=1 if isinstance(rcpt_nos, int) else len(rcpt_nos),
                user=self._user, period=self._period, app=self._app,
                policies=trial.policies[0], candidate=trial.policies[1])
            if found is not None:
                trial.record(found, self._app, self._log)
        except Exception:
            trial.failed("refusal", self._log)

    def committed(self, live: Settlement) -> None:
        """The commit of the delivered recipients (on time, or late once Redis is back)."""
        trial = self._trial
        if trial.policies is None:
            return
        try:
            found = notice_difference(live, user=self._user, period=self._period,
                                      policies=trial.policies[0], candidate=trial.policies[1])
            if found is not None:
                trial.record(found, self._app, self._log)
        except Exception:
            trial.failed("notice", self._log)


class _OffWatch(Watch):
    """The watch of a transaction with no trial: nothing to compare."""

    __slots__ = ()

    def __init__(self) -> None:
        pass

    def route(self, live: Decision, *, header: str) -> None:
        return

    def reserved(self, live: Reservation, rcpt_nos: int | list[int]) -> None:
        return

    def committed(self, live: Settlement) -> None:
        return


OFF = ShadowTrial()
_OFF_WATCH = _OffWatch()


def open_trial(directory: Path | None, live: Policies, recorder: Recorder) -> ShadowTrial:
    """The trial of the shadow folder over ``live``: ``OFF`` when no folder is set, when it
    holds no policy file, or when a file is bad (logged as ``shadow.invalid``; live mail is
    never affected). Reads files: call it off the event loop once serving."""
    if directory is None:
        recorder.metrics.shadow_enabled.set(0)
        return OFF
    try:
        candidate = load_candidate(directory, live)
    except PolicyError as exc:
        recorder.metrics.shadow_enabled.set(0)
        log.error("shadow.invalid", directory=str(directory), error=str(exc),
                  note="the shadow trial is off until the file is fixed (then SIGHUP); "
                       "live mail is not affected")
        return OFF
    except OSError as exc:  # a folder that cannot be read
        recorder.metrics.shadow_enabled.set(0)
        log.error("shadow.invalid", directory=str(directory), error=str(exc),
                  note="the shadow trial is off; live mail is not affected")
        return OFF
    if candidate is None:
        recorder.metrics.shadow_enabled.set(0)
        log.info("shadow.off", directory=str(directory), reason="no policy file in the folder")
        return OFF
    recorder.metrics.shadow_enabled.set(1)
    log.info("shadow.enabled", directory=str(directory), files=list(candidate.files))
    return ShadowTrial(live, candidate, recorder)
