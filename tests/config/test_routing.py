"""relay/config/routing.py as plain tables: the shipped policies/routing.toml as loaded (its
routes, apps and rules), and the validation of routing.toml (errors naming file, line and
key). The decision over these rules is in tests/decisions/test_routing.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.config.routing import AppPolicy, Routing, UnsubscribePolicy, load_routing
from relay.config.sources import PolicyError, TomlSource
from tests.conftest import POLICIES

SHIPPED_TEXT = (POLICIES / "routing.toml").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def routing() -> Routing:
    return load_routing(TomlSource(POLICIES / "routing.toml"))


# -- the shipped policy -------------------------------------------------------------------------
def test_choose_route_shipped_routes_counted_and_credentials(routing: Routing) -> None:
    """command is counted on the default upstream's credentials; mailchimp is uncounted, on
    a setting, with the user's own credentials; neither fails over."""
    command, mailchimp = routing.routes["command"], routing.routes["mailchimp"]
    assert (command.counted, command.upstream, command.credentials, command.failover) == \
        (True, "default", "upstream", None)
    assert (mailchimp.counted, mailchimp.upstream, mailchimp.credentials,
            mailchimp.failover) == (False, "setting", "user", None)
    assert mailchimp.pass_headers == ("x-mc-",)


def test_routing_stripped_prefixes_per_route(routing: Routing) -> None:
    """X-MC-* is stripped on the command route and passed on the mailchimp route."""
    assert routing.stripped_prefixes(routing.routes["command"]) == ("x-mc-",)
    assert routing.stripped_prefixes(routing.routes["mailchimp"]) == ()


@pytest.mark.parametrize(("app", "decided_at_data"), [
    ("smartplans", True), ("campaigns", True), ("command", False), ("direct", False),
    ("newsletters", False),
])
def test_routing_app_decided_at_data(routing: Routing, app: str, decided_at_data: bool) -> None:
    """Timeline and route-header apps are decided at the end of DATA; the others at RCPT
    (an unlisted app like a direct login)."""
    assert routing.app(app).decided_at_data is decided_at_data


@pytest.mark.parametrize(("timeline", "route_header", "expected"), [
    (False, False, False), (True, False, True), (False, True, True), (True, True, True),
])
def test_app_policy_decided_at_data_when_timeline_or_route_header(
        timeline: bool, route_header: bool, expected: bool) -> None:
    """Either flag makes an app wait for its headers."""
    assert AppPolicy("x", timeline, route_header).decided_at_data is expected


@pytest.mark.parametrize(("app", "policy"), [
    ("campaigns", UnsubscribePolicy.CHECKS), ("smartplans", UnsubscribePolicy.OFF),
    ("command", UnsubscribePolicy.OFF), ("newsletters", UnsubscribePolicy.OFF),
])
def test_routing_app_unsubscribe_policy(routing: Routing, app: str,
                                        policy: UnsubscribePolicy) -> None:
    """The shipped Campaigns app checks its one-click unsubscribe headers; an app without
    the optional key (or not listed) is "off"."""
    assert routing.app(app).unsubscribe is policy


@pytest.mark.parametrize("value", ["off", "checks", "refuses", "adds"])
def test_load_routing_unsubscribe_values(tmp_path: Path, value: str) -> None:
    text = edited('unsubscribe = "checks"\n', f'unsubscribe = "{value}"\n')
    routing = load_routing(TomlSource(write_routing(tmp_path, text)))
    assert routing.app("campaigns").unsubscribe is UnsubscribePolicy(value)


# -- load_routing errors -----------------------------------------------------------------------
def write_routing(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "routing.toml"
    path.write_text(text, encoding="utf-8")
    return path


def edited(old: str, new: str) -> str:
    assert SHIPPED_TEXT.count(old) >= 1, old
    return SHIPPED_TEXT.replace(old, new, 1)


def nth_line(text: str, marker: str, occurrence: int = 0) -> int:
    """1-based line number of the ``occurrence``-th (0-based) line that is ``marker``
    (stripped) or, failing an exact match, contains it."""
    lines = text.splitlines()
    exact = [i for i, line in enumerate(lines, 1) if line.strip() == marker]
    found = exact or [i for i, line in enumerate(lines, 1) if marker in line]
    return found[occurrence]


RULE_HEADER = "[[rules]]"

# (old, new, marker of the line the error must name, occurrence of the marker, key, reason)
ROUTING_ERRORS = [
    pytest.param('counted = false\n', 'counted = false\ncolour = "blue"\n',
                 'colour = "blue"', 0, "routes.mailchimp.colour", "unknown key",
                 id="route-unknown-key"),
    pytest.param('pass_headers = ["X-MC-"]\nfailover = ""\n', 'pass_headers = ["X-MC-"]\n',
                 "[routes.mailchimp]", 0, "routes.mailchimp", "missing key 'failover'",
                 id="route-missing-key"),
    pytest.param("counted = true\n", 'counted = "yes"\n', 'counted = "yes"', 0,
                 "routes.command.counted", "expected bool, got str", id="route-wrong-type"),
    pytest.param('upstream = "setting"\n', 'upstream = "smtp://mc.test"\n',
                 'upstream = "smtp://mc.test"', 0, "routes.mailchimp.upstream",
                 'must be "default" or "setting"', id="route-bad-upstream"),
    pytest.param('credentials = "user"\n', 'credentials = "mine"\n', 'credentials = "mine"', 0,
                 "routes.mailchimp.credentials", 'must be "upstream" or "user"',
                 id="route-bad-credentials"),
    pytest.param('pass_headers = []\n', 'pass_headers = [""]\n', 'pass_headers = [""]', 0,
                 "routes.command.pass_headers", "must be a list of header prefixes",
                 id="route-bad-pass-headers"),
    pytest.param('failover = ""\n', 'failover = "backup"\n', 'failover = "backup"', 0,
                 "routes.command.failover", "must name another route, got 'backup'",
                 id="route-unknown-failover"),
    pytest.param('failover = ""\n', 'failover = "command"\n', 'failover = "command"', 0,
                 "routes.command.failover", "must name another route, got 'command'",
                 id="route-self-failover"),
    pytest.param('failover = ""\n', 'failover = "mailchimp"\n', 'failover = "mailchimp"', 0,
                 "routes.command.failover", "must name a route that is counted the same way",
                 id="route-failover-changes-counting"),
    pytest.param('upstream = "setting"\n', 'upstream = "default"\n', 'upstream = "default"', 1,
                 "routes.mailchimp.upstream", 'exactly one route must have upstream = "default"',
                 id="two-default-routes"),
    pytest.param('timeline = true\n', 'timeline = 1\n', "timeline = 1", 0,
                 "apps.smartplans.timeline", "expected bool, got int", id="app-wrong-type"),
    pytest.param('route_header = true\n', 'route_header = true\nrefuse = "x"\n', 'refuse = "x"',
                 0, "apps.campaigns.refuse", "unknown key", id="app-unknown-key"),
    pytest.param('unsubscribe = "checks"\n', 'unsubscribe = "always"\n',
                 'unsubscribe = "always"', 0, "apps.campaigns.unsubscribe",
                 'must be "off", "checks", "refuses" or "adds"', id="app-bad-unsubscribe"),
    pytest.param('unsubscribe = "checks"\n', 'unsubscribe = true\n', "unsubscribe = true", 0,
                 "apps.campaigns.unsubscribe", "expected str, got bool",
                 id="app-unsubscribe-wrong-type"),
    pytest.param('header = "command"\nroute = "command"\n',
                 'header = "command"\nroute = "command"\nrefuse = "no"\n', RULE_HEADER, 2,
                 "rules[2]", "give exactly one of route or refuse", id="rule-route-and-refuse"),
    pytest.param('preference = "mailchimp"\nroute = "mailchimp"\n', 'preference = "mailchimp"\n',
                 RULE_HEADER, 4, "rules[4]", "give exactly one of route or refuse",
                 id="rule-neither-route-nor-refuse"),
    pytest.param('header = "mailchimp"\nroute = "mailchimp"\n',
                 'header = "mailchimp"\nroute = "sendgrid"\n', 'route = "sendgrid"', 0,
                 "rules[1].route", "no route named 'sendgrid'", id="rule-unknown-route"),
    pytest.param('apps = ["smartplans"]\n', 'apps = ["smartplan"]\n', 'apps = ["smartplan"]', 0,
                 "rules[0].apps", "no app named 'smartplan' under [apps]",
                 id="rule-unknown-app"),
    pytest.param('preference = "mailchimp"\n', 'preference = "mandrill"\n',
                 'preference = "mandrill"', 0, "rules[4].preference",
                 "no route named 'mandrill'", id="rule-unknown-preference"),
    pytest.param('header = "command"\n', 'header = "sendgrid"\n', 'header = "sendgrid"', 0,
                 "rules[2].header", 'must be a route name, "" (absent) or "*" (any)',
                 id="rule-unknown-header"),
    pytest.param('name = "campaigns-header-unknown"\n',
                 'name = "campaigns-header-unknown"\npriority = 1\n', "priority = 1", 0,
                 "rules[3].priority", "unknown key", id="rule-unknown-key"),
    pytest.param('name = "campaigns-header-unknown"\n', '', RULE_HEADER, 3, "rules[3]",
                 "missing key 'name'", id="rule-missing-name"),
    pytest.param('apps = ["campaigns"]\nheader = "command"\n',
                 'apps = "campaigns"\nheader = "command"\n', 'apps = "campaigns"', 0,
                 "rules[2].apps", "expected list, got str", id="rule-apps-not-a-list"),
    pytest.param('apps = ["campaigns"]\nheader = "*"\n', 'apps = [["campaigns"]]\nheader = "*"\n',
                 'apps = [["campaigns"]]', 0, "rules[3].apps", "must be a list of app names",
                 id="rule-apps-not-names"),
    pytest.param('[[rules]]\nname = "everything-else-command"\nroute = "command"\n', '',
                 RULE_HEADER, 4, "rules[4]", "no catch-all rule", id="no-catch-all"),
    pytest.param('name = "everything-else-command"\n',
                 'name = "everything-else-command"\napps = ["direct"]\n', RULE_HEADER, 5,
                 "rules[5]", "no catch-all rule", id="last-rule-has-a-condition"),
    pytest.param("[apps.smartplans]\n", "[extras]\n[apps.smartplans]\n", "[extras]", 0,
                 "extras", "unknown section", id="unknown-section"),
]


@pytest.mark.parametrize(("old", "new", "marker", "occurrence", "key", "reason"), ROUTING_ERRORS)
def test_load_routing_error_names_file_line_and_key(tmp_path: Path, old: str, new: str,
                                                    marker: str, occurrence: int, key: str,
                                                    reason: str) -> None:
    """Every invalid routing.toml is refused with file:line: key: reason, the line being the
    bad key's, or the header of the table (the right [[rules]] one) it belongs to."""
    text = edited(old, new)
    path = write_routing(tmp_path, text)
    with pytest.raises(PolicyError) as caught:
        load_routing(TomlSource(path))
    expected = f"{path}:{nth_line(text, marker, occurrence)}: {key}: "
    assert str(caught.value).startswith(expected), (str(caught.value), expected)
    assert reason in str(caught.value)


def test_load_routing_missing_section_names_the_file(tmp_path: Path) -> None:
    """A file without [[rules]] is refused naming the file and the section."""
    text = SHIPPED_TEXT[:SHIPPED_TEXT.index("[[rules]]")]
    path = write_routing(tmp_path, text)
    with pytest.raises(PolicyError, match=r"missing section \[rules\]") as caught:
        load_routing(TomlSource(path))
    assert str(caught.value).startswith(f"{path}: ")


def test_load_routing_shipped_file_loads(routing: Routing) -> None:
    """The shipped routing.toml loads: two routes, four apps, six rules in file order, the
    last a catch-all."""
    assert list(routing.routes) == ["command", "mailchimp"]
    assert list(routing.apps) == ["smartplans", "campaigns", "command", "direct"]
    assert [r.name for r in routing.rules] == [
        "smartplans-always-command", "campaigns-header-mailchimp", "campaigns-header-command",
        "campaigns-header-unknown", "campaigns-preference-mailchimp", "everything-else-command"]
    last = routing.rules[-1]
    assert (last.apps, last.header, last.preference, last.route) == (None, None, None, "command")


def test_load_routing_failover_to_another_route(tmp_path: Path) -> None:
    """failover naming another route counted the same way is kept on the route."""
    text = edited('failover = ""\n', 'failover = "secondary"\n').replace(
        "[routes.mailchimp]", '[routes.secondary]\ncounted = true\nupstream = "setting"\n'
        'credentials = "upstream"\npass_headers = []\nfailover = ""\n\n[routes.mailchimp]')
    path = write_routing(tmp_path, text)
    assert load_routing(TomlSource(path)).routes["command"].failover == "secondary"


def test_load_routing_per_route_pool_and_timeout(tmp_path: Path) -> None:
    """pool_size and timeout_seconds are optional per route; when given they are kept."""
    text = edited('failover = ""\n', 'failover = ""\npool_size = 7\ntimeout_seconds = 12\n')
    route = load_routing(TomlSource(write_routing(tmp_path, text))).routes["command"]
    assert (route.pool_size, route.timeout) == (7, 12.0)


@pytest.mark.parametrize(("extra", "reason"), [
    ("pool_size = 0", "routes.command.pool_size: must be greater than 0"),
    ("timeout_seconds = -1", "routes.command.timeout_seconds: must be greater than 0"),
    ('pool_size = "2"', "routes.command.pool_size: expected int, got str"),
])
def test_load_routing_bad_pool_or_timeout_is_refused(tmp_path: Path, extra: str,
                                                     reason: str) -> None:
    """A non-positive or mistyped per-route limit is a PolicyError naming the key."""
    path = write_routing(tmp_path, edited('failover = ""\n', f'failover = ""\n{extra}\n'))
    with pytest.raises(PolicyError, match=reason):
        load_routing(TomlSource(path))
