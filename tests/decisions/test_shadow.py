"""relay/decisions/shadow.py as plain tables: what a candidate policy would have done with
one live decision's inputs and outcome (another route, a refusal, a notice), or None."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from relay.config.policies import Policies, load_policies
from relay.config.shadow import load_candidate
from relay.config.zones import zone
from relay.decisions.months import Period, period_at
from relay.decisions.quota import Reservation, ReserveStatus, Settlement
from relay.decisions.routing import choose_route
from relay.decisions.shadow import (
    Difference,
    notice_difference,
    refusal_difference,
    route_difference,
)
from relay.events import stream
from relay.identity.accounts import PendingChange, User
from tests.conftest import POLICIES
from tests.policy_files import shadow_notifications, shadow_plans, shadow_routing

LIVE = load_policies(POLICIES)
PERIOD: Period = period_at(datetime(2026, 11, 15, 12, tzinfo=UTC), zone("UTC"))
R, OVER = ReserveStatus.RESERVED, ReserveStatus.OVER_LIMIT
REFUSED = "refused 550 5.7.1"
BOTH = "(in_app, email)"


def user(plan: str = "free", limit: int | None = None, *,
         pending: PendingChange | None = None,
         preferences: dict[str, str] | None = None) -> User:
    return User("u-1", "agent@kw.test", plan, limit, "UTC", "active",
                frozenset({"agent@kw.test"}), "2026-11-01T00:00:00+00:00", pending,
                preferences or {})


def candidate(tmp_path: Path) -> Policies:
    """The live policies with the shadow files the test wrote under ``tmp_path``."""
    found = load_candidate(tmp_path / "shadow", LIVE)
    assert found is not None
    return found.policies


# -- route -----------------------------------------------------------------------------------
MAILCHIMP_FIRST = 'name = "trial"\napps = ["campaigns", "direct"]\nroute = "mailchimp"'
REFUSE_CAMPAIGNS = 'name = "trial"\napps = ["campaigns"]\nheader = ""\nrefuse = "no campaigns"'


@pytest.mark.parametrize(("rule", "app", "preference", "header", "expected"), [
    # The candidate moves campaigns and direct logins to MailChimp, and nothing else.
    (MAILCHIMP_FIRST, "campaigns", None, "", ("command (counted)",
                                              "mailchimp (not counted)")),
    (MAILCHIMP_FIRST, "direct", None, "", ("command (counted)", "mailchimp (not counted)")),
    (MAILCHIMP_FIRST, "campaigns", None, "mailchimp", None),  # both: mailchimp
    (MAILCHIMP_FIRST, "smartplans", None, "", None),
    (MAILCHIMP_FIRST, "command", None, "", None),
    # A refusal instead of a route, and a route instead of a refusal.
    (REFUSE_CAMPAIGNS, "campaigns", None, "", ("command (counted)", "refused (no campaigns)")),
    (REFUSE_CAMPAIGNS, "campaigns", None, "command", None),
    (MAILCHIMP_FIRST, "campaigns", None, "bogus",
     ("refused (X-KW-Route must be command or mailchimp)", "mailchimp (not counted)")),
    # A saved preference is the same input to both.
    (REFUSE_CAMPAIGNS, "campaigns", "mailchimp", "", ("mailchimp (not counted)",
                                                      "refused (no campaigns)")),
])
def test_route_difference_table(tmp_path: Path, rule: str, app: str, preference: str | None,
                                header: str, expected: tuple[str, str] | None) -> None:
    """choose_route with the candidate's routing, on the live decision's inputs."""
    shadow_routing(tmp_path / "shadow", f"[[rules]]\n{rule}")
    routing = candidate(tmp_path).routing
    live = choose_route(LIVE.routing, app=app, preference=preference, header=header)
    found = route_difference(live, routing, app=app, preference=preference, header=header)
    if expected is None:
        assert found is None
        return
    assert found is not None
    assert (found.kind, found.live, found.candidate) == ("route", *expected)
    assert found.detail["live_rule"] == live.rule
    assert found.detail["candidate_rule"] in ("trial", "campaigns-header-mailchimp")


def test_route_difference_none_for_the_same_routing() -> None:
    """The live routing as its own candidate never differs, whatever the inputs."""
    for app in ("smartplans", "campaigns", "command", "direct", "unknown-app"):
        for preference in (None, "mailchimp", "command"):
            for header in ("", "mailchimp", "command", "bogus"):
                live = choose_route(LIVE.routing, app=app, preference=preference,
                                    header=header)
                assert route_difference(live, LIVE.routing, app=app, preference=preference,
                                        header=header) is None


# -- refusal ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("status", "used", "units", "free", "expected", "used_before"), [
    # Live accepted the 5th send of a 5,000 limit; the candidate's 4 would have refused it.
    (R, 5, 1, 4, ("accepted", REFUSED), 4),
    (R, 4, 1, 4, None, 3),  # the 4th fits under 4
    (R, 10, 3, 9, ("accepted", REFUSED), 7),  # three at once, all or nothing
    (R, 9, 3, 9, None, 6),
    # Live refused at its limit; a candidate with room would have accepted.
    (OVER, 5000, 1, 6000, (REFUSED, "accepted"), 5000),
    (OVER, 5000, 1, 4000, None, 5000),  # both refuse, with the same reply
    (OVER, 4999, 2, 5001, (REFUSED, "accepted"), 4999),
])
def test_refusal_difference_table(tmp_path: Path, status: ReserveStatus, used: int,
                                  units: int, free: int, expected: tuple[str, str] | None,
                                  used_before: int) -> None:
    """The candidate limit judged against the count the live reservation returned."""
    shadow_plans(tmp_path / "shadow", free)
    live = Reservation(status, used, 5000)
    found = refusal_difference(live, units=units, user=user(), period=PERIOD, app="direct",
                               policies=LIVE, candidate=candidate(tmp_path))
    if expected is None:
        assert found is None
        return
    assert found is not None
    assert (found.kind, found.live, found.candidate) == ("refusal", *expected)
    assert found.detail["used"] == used_before
    assert (found.detail["live_limit"], found.detail["candidate_limit"]) == (5000, free)
    if expected[1] == REFUSED:
        assert found.detail["candidate_reply"] == (
            f"550 5.7.1 Monthly Command Email limit reached ({used_before} of {free} sends "
            "used); the limit resets on December 1, 2026")


def test_refusal_difference_another_reply(tmp_path: Path) -> None:
    """Both refuse, but the candidate's over-limit reply is a 452: a difference; for a
    timeline app (SmartPlans) the candidate's 4xx is made permanent, as live: none."""
    shadow_plans(tmp_path / "shadow", 5000, over_limit=(452, "4.5.3"))
    policies = candidate(tmp_path)
    live = Reservation(OVER, 5000, 5000)
    found = refusal_difference(live, units=1, user=user(), period=PERIOD, app="direct",
                               policies=LIVE, candidate=policies)
    assert found == Difference("refusal", REFUSED, "refused 452 4.5.3", {
        "plan": "free", "used": 5000, "units": 1, "live_limit": 5000, "candidate_limit": 5000,
        "candidate_reply": "452 4.5.3 Monthly Command Email limit reached (5000 of 5000 sends "
                           "used); the limit resets on December 1, 2026"})
    assert refusal_difference(live, units=1, user=user(), period=PERIOD, app="smartplans",
                              policies=LIVE, candidate=policies) is None
    # The same reply with other figures in it is the same policy.
    shadow_plans(tmp_path / "shadow", 4000)
    assert refusal_difference(live, units=1, user=user(), period=PERIOD, app="direct",
                              policies=LIVE, candidate=candidate(tmp_path)) is None


def test_refusal_difference_follows_the_terms_in_force(tmp_path: Path) -> None:
    """A custom limit ignores the plans; a pending downgrade that has come due is the plan
    compared; a plan the candidate lacks would have been refused with 451 4.3.5."""
    shadow_plans(tmp_path / "shadow", 4)
    policies = candidate(tmp_path)
    custom = user(limit=10)
    assert refusal_difference(Reservation(R, 5, 10), units=1, user=custom, period=PERIOD,
                              app="direct", policies=LIVE, candidate=policies) is None
    downgraded = user("plus", pending=PendingChange("free", None, "2026-11"))
    found = refusal_difference(Reservation(R, 5, 5000), units=1, user=downgraded,
                               period=PERIOD, app="direct", policies=LIVE, candidate=policies)
    assert found is not None and found.detail["plan"] == "free"
    without_pro = replace(policies, plans={k: v for k, v in policies.plans.items()
                                           if k != "pro"})
    found = refusal_difference(Reservation(R, 5, 25_000), units=1, user=user("pro"),
                               period=PERIOD, app="direct", policies=LIVE,
                               candidate=without_pro)
    assert found is not None
    assert (found.live, found.candidate) == ("accepted", "refused 451 4.3.5")
    assert found.detail["candidate_limit"] is None


@pytest.mark.parametrize("live", [
    Reservation(ReserveStatus.ALREADY_RESERVED, 5, 5000),  # a retry: its units are counted
    Reservation(ReserveStatus.USER_DISABLED, 0, 0),
    Reservation(ReserveStatus.USER_MISSING, 0, 0),
    Reservation(ReserveStatus.UNKNOWN_PLAN, 0, 0),
    Reservation(R, 5, 7000),  # a limit the live terms do not give: the user changed since
])
def test_refusal_difference_not_compared(tmp_path: Path, live: Reservation) -> None:
    """Outcomes no plan limit decides, or that the live terms cannot explain."""
    shadow_plans(tmp_path / "shadow", 4)
    assert refusal_difference(live, units=1, user=user(), period=PERIOD, app="direct",
                              policies=LIVE, candidate=candidate(tmp_path)) is None


# -- notice ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("percents", "free", "delivered", "units", "crossed", "expected"), [
    # The candidate notifies at 50 %: the 2,500th of 5,000 crosses it; live crossed nothing.
    ([50], 5000, 2500, 1, 0, ("none", f"50% {BOTH}")),
    ([50], 5000, 2499, 1, 0, None),
    ([50], 5000, 2501, 1, 0, None),  # crossed before this commit
    ([50, 80], 5000, 4001, 2, 80, None),  # both cross 80 %
    # A jump past several thresholds gives the highest, as commit.lua does.
    ([50, 60, 70], 5000, 3600, 1200, 0, ("none", f"70% {BOTH}")),
    # The candidate's lower limit makes the 40th of 50 the 80 % mark.
    ([80, 85, 90, 95], 50, 40, 1, 0, ("none", f"80% {BOTH}")),
    ([80, 85, 90, 95], 50, 50, 1, 0, ("none", f"100% {BOTH}")),
    # The live commit crossed 80 % but the candidate's thresholds skip it.
    ([90], 5000, 4000, 1, 80, (f"80% {BOTH}", "none")),
])
def test_notice_difference_table(tmp_path: Path, percents: list[int], free: int,
                                 delivered: int, units: int, crossed: int,
                                 expected: tuple[str, str] | None) -> None:
    """The candidate's thresholds and limit against the delivered count of a live commit."""
    shadow_notifications(tmp_path / "shadow", percents)
    shadow_plans(tmp_path / "shadow", free)
    live = Settlement(units, delivered, delivered, 5000, crossed)
    found = notice_difference(live, user=user(), period=PERIOD, policies=LIVE,
                              candidate=candidate(tmp_path))
    if expected is None:
        assert found is None
        return
    assert found is not None
    assert (found.kind, found.live, found.candidate) == ("notice", *expected)
    assert found.detail == {"delivered": delivered, "units": units, "live_limit": 5000,
                            "candidate_limit": free}


def test_notice_difference_same_thresholds_keep_the_live_answer() -> None:
    """Same limit and thresholds: the live commit's crossing is the candidate's, even where
    the count alone would say otherwise (the mark was set earlier this month)."""
    live = Settlement(1, 4000, 4000, 5000, 0)
    assert notice_difference(live, user=user(), period=PERIOD, policies=LIVE,
                             candidate=LIVE) is None


def test_notice_difference_channels_and_limit_reached() -> None:
    """The same threshold sent to other channels is a difference; so is a candidate that
    does not notify when the limit is reached."""
    no_email = replace(LIVE, notifications=replace(
        LIVE.notifications, email=replace(LIVE.notifications.email, enabled=False)))
    live = Settlement(1, 4000, 4000, 5000, 80)
    found = notice_difference(live, user=user(), period=PERIOD, policies=LIVE,
                              candidate=no_email)
    assert found is not None and (found.live, found.candidate) == (f"80% {BOTH}",
                                                                   "80% (in_app)")
    silent = replace(LIVE, notifications=replace(LIVE.notifications,
                                                 notify_limit_reached=False))
    found = notice_difference(Settlement(1, 5000, 5000, 5000, 100), user=user(),
                              period=PERIOD, policies=LIVE, candidate=silent)
    assert found is not None and (found.live, found.candidate) == (f"100% {BOTH}", "none")


@pytest.mark.parametrize("live", [
    Settlement(0, 4000, 4000, 5000, 0),  # a repeat commit made nothing final
    Settlement(1, 4000, 4000, 0, 0),  # the user or the plan is gone
    Settlement(1, 4000, 4000, 7000, 0),  # a limit the live terms do not give
])
def test_notice_difference_not_compared(tmp_path: Path, live: Settlement) -> None:
    shadow_notifications(tmp_path / "shadow", [50])
    assert notice_difference(live, user=user(), period=PERIOD, policies=LIVE,
                             candidate=candidate(tmp_path)) is None


def test_notice_kinds_are_the_event_kinds() -> None:
    """The notice's channels are looked up by the kinds the SMTP path publishes."""
    from relay.decisions import shadow

    assert (shadow._REACHED, shadow._THRESHOLD) == (stream.REACHED, stream.THRESHOLD)
