"""relay/decisions/routing.py as a plain table: choose_route over the shipped
policies/routing.toml, for every app, saved preference and X-KW-Route header."""

from __future__ import annotations

import pytest

from relay.config.routing import Routing, load_routing
from relay.config.sources import TomlSource
from relay.decisions.routing import choose_route
from tests.conftest import POLICIES

REFUSAL = "X-KW-Route must be command or mailchimp"


@pytest.fixture(scope="module")
def routing() -> Routing:
    return load_routing(TomlSource(POLICIES / "routing.toml"))


# -- choose_route over the shipped policy ------------------------------------------------------
@pytest.mark.parametrize(("app", "preference", "header", "rule", "route"), [
    # SmartPlans always go through Command Email: neither header nor preference moves them.
    ("smartplans", None, "", "smartplans-always-command", "command"),
    ("smartplans", None, "mailchimp", "smartplans-always-command", "command"),
    ("smartplans", "mailchimp", "mailchimp", "smartplans-always-command", "command"),
    # Campaigns: the header first (case and spaces do not matter), then the preference.
    ("campaigns", None, "mailchimp", "campaigns-header-mailchimp", "mailchimp"),
    ("campaigns", None, " MailChimp ", "campaigns-header-mailchimp", "mailchimp"),
    ("campaigns", None, "command", "campaigns-header-command", "command"),
    ("campaigns", "mailchimp", "command", "campaigns-header-command", "command"),
    ("campaigns", "command", "mailchimp", "campaigns-header-mailchimp", "mailchimp"),
    ("campaigns", "mailchimp", "", "campaigns-preference-mailchimp", "mailchimp"),
    ("campaigns", "command", "", "everything-else-command", "command"),
    ("campaigns", None, "", "everything-else-command", "command"),
    # Direct logins and the command app may not choose: the header is treated as absent, and
    # a saved campaigns-like preference does not apply to them.
    ("direct", None, "mailchimp", "everything-else-command", "command"),
    ("direct", "mailchimp", "mailchimp", "everything-else-command", "command"),
    ("command", None, "mailchimp", "everything-else-command", "command"),
    ("command", "mailchimp", "sendgrid", "everything-else-command", "command"),
    # An app routing.toml does not list falls through to the catch-all.
    ("newsletters", None, "mailchimp", "everything-else-command", "command"),
    ("newsletters", "mailchimp", "", "everything-else-command", "command"),
])
def test_choose_route_shipped_rules(routing: Routing, app: str, preference: str | None,
                                    header: str, rule: str, route: str) -> None:
    """Each (app, preference, X-KW-Route) picks the rule and route routing.toml states."""
    decision = choose_route(routing, app=app, preference=preference, header=header)
    assert (decision.rule, decision.route.name if decision.route else None,
            decision.refusal) == (rule, route, None)


@pytest.mark.parametrize("header", ["sendgrid", "MAILCHIMP2", "x"])
@pytest.mark.parametrize("preference", [None, "mailchimp"])
def test_choose_route_campaigns_unknown_header_is_refused(routing: Routing, header: str,
                                                          preference: str | None) -> None:
    """Campaigns naming a route that is not offered are refused with the policy's text,
    whatever the saved preference."""
    decision = choose_route(routing, app="campaigns", preference=preference, header=header)
    assert decision.rule == "campaigns-header-unknown"
    assert decision.route is None
    assert decision.refusal == REFUSAL
