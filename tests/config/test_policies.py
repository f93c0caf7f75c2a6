"""relay.policies: policies/plans.toml into a frozen Policies, with errors naming file,
line and key."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from relay.config.policies import (
    NOTIFICATIONS_FILE,
    PLANS_FILE,
    Passwords,
    Plan,
    PolicyError,
    load_policies,
)
from tests.conftest import POLICIES

SHIPPED = POLICIES

BASE = """\
# A small but complete plans file.
[defaults]
plan = "free"

[plans.free]
title = "Free"
monthly_limit = 5000

[plans.pro]
title = "Pro"
monthly_limit = 25000

[over_limit]
code = 550
status = "5.7.1"
text = "Limit reached ({used} of {limit}); resets on {resets_on}"
"""


def write_plans(tmp_path: Path, text: str) -> Path:
    (tmp_path / PLANS_FILE).write_text(text, encoding="utf-8")
    shutil.copy(POLICIES / NOTIFICATIONS_FILE, tmp_path / NOTIFICATIONS_FILE)
    shutil.copy(POLICIES / "routing.toml", tmp_path / "routing.toml")
    return tmp_path / PLANS_FILE


def variant(old: str, new: str) -> str:
    assert old in BASE, old
    return BASE.replace(old, new, 1)


def line_of(text: str, marker: str) -> int:
    """1-based number of the first line of ``text`` containing ``marker``."""
    return next(i for i, line in enumerate(text.splitlines(), 1) if marker in line)


# -- the shipped file --------------------------------------------------------------------------
def test_load_policies_shipped_files_load() -> None:
    """The shipped policies/ loads: free is 5000 a month, the default plan, 550 5.7.1."""
    policies = load_policies(SHIPPED)
    assert policies.plans["free"] == Plan("free", "Free", 5000)
    assert policies.default_plan == "free"
    assert policies.over_limit.code == 550
    assert policies.over_limit.status == "5.7.1"
    rendered = policies.over_limit.text.format(used=5000, limit=5000,
                                               resets_on="December 1, 2026")
    assert "5000" in rendered and "December 1, 2026" in rendered


def test_load_policies_shipped_plans_are_all_positive() -> None:
    """Every shipped plan has a positive limit and a title."""
    policies = load_policies(SHIPPED)
    assert {"free", "plus", "pro", "team"} <= set(policies.plans)
    for name, plan in policies.plans.items():
        assert plan.name == name and plan.title and plan.monthly_limit > 0


def test_policies_plan_limits_flat_pairs() -> None:
    """plan_limits() is the flat [name, limit, name, limit, …] list the quota script takes."""
    assert load_policies(SHIPPED).plan_limits() == [
        "free", 5000, "plus", 10000, "pro", 25000, "team", 50000]


def test_policies_plan_limits_follow_the_file(tmp_path: Path) -> None:
    """plan_limits() reflects the loaded file, in file order."""
    write_plans(tmp_path, variant("monthly_limit = 25000", "monthly_limit = 7"))
    assert load_policies(tmp_path).plan_limits() == ["free", 5000, "pro", 7]


def test_policies_are_read_only() -> None:
    """The loaded plans cannot be changed in place (a reload builds a new Policies)."""
    policies = load_policies(SHIPPED)
    with pytest.raises(TypeError):
        policies.plans["free"] = Plan("free", "Free", 1)  # type: ignore[index]


# -- errors name the file, a line and the key --------------------------------------------------
CASES = [
    # (id, old, new, marker of the line at fault, words the message must contain)
    ("unknown key", 'title = "Pro"', 'title = "Pro"\ncolour = "blue"', "colour",
     ["plans.pro.colour", "unknown key"]),
    ("missing key", 'title = "Pro"\n', "", "[plans.pro]", ["plans.pro", "title"]),
    ("limit is a bool", "monthly_limit = 5000", "monthly_limit = true", "monthly_limit = true",
     ["plans.free.monthly_limit", "int", "bool"]),
    ("limit is a string", "monthly_limit = 5000", 'monthly_limit = "5000"',
     'monthly_limit = "5000"', ["plans.free.monthly_limit", "int", "str"]),
    ("limit is a float", "monthly_limit = 5000", "monthly_limit = 5000.0",
     "monthly_limit = 5000.0", ["plans.free.monthly_limit", "float"]),
    ("title is a number", 'title = "Free"', "title = 1", "title = 1", ["plans.free.title"]),
    ("limit is zero", "monthly_limit = 25000", "monthly_limit = 0", "monthly_limit = 0",
     ["plans.pro.monthly_limit", "greater than 0"]),
    ("limit is negative", "monthly_limit = 25000", "monthly_limit = -10",
     "monthly_limit = -10", ["plans.pro.monthly_limit"]),
    ("default plan undefined", 'plan = "free"', 'plan = "gold"', 'plan = "gold"',
     ["defaults.plan", "gold"]),
    ("default plan missing", 'plan = "free"\n', "", "[defaults]", ["defaults", "plan"]),
    ("status class differs", 'status = "5.7.1"', 'status = "4.7.1"', 'status = "4.7.1"',
     ["over_limit.status"]),
    ("status malformed", 'status = "5.7.1"', 'status = "5.7"', 'status = "5.7"',
     ["over_limit.status"]),
    ("code 2xx", "code = 550", "code = 250", "code = 250", ["over_limit.code"]),
    ("code 6xx", "code = 550", "code = 600", "code = 600", ["over_limit.code"]),
    ("code is text", "code = 550", 'code = "550"', 'code = "550"', ["over_limit.code"]),
    ("code is a bool", "code = 550", "code = true", "code = true", ["over_limit.code"]),
    ("unknown placeholder", "({used} of {limit})", "({used} of {quota})", "text =",
     ["over_limit.text", "quota"]),
    ("positional placeholder", "({used} of {limit})", "({used} of {0})", "text =",
     ["over_limit.text"]),
    ("unclosed placeholder", "({used} of {limit})", "({used} of {limit)", "text =",
     ["over_limit.text"]),
    ("attribute placeholder", "({used} of {limit})", "({used} of {limit.nope})", "text =",
     ["over_limit.text"]),
    ("index placeholder", "({used} of {limit})", "({used} of {limit[0]})", "text =",
     ["over_limit.text"]),
    ("bad format spec", "({used} of {limit})", "({used} of {limit:%Y})", "text =",
     ["over_limit.text"]),
    ("multi-line text", 'text = "Limit reached', 'text = "Limit\\r\\nreached', "text =",
     ["over_limit.text", "one line"]),
    ("unknown section", "[over_limit]", "[extras]\nx = 1\n\n[over_limit]", "[extras]",
     ["extras", "unknown section"]),
    ("bad plan name", "[plans.pro]", "[plans.Pro]", "[plans.Pro]", ["plans.Pro"]),
]


@pytest.mark.parametrize(("old", "new", "marker", "words"),
                         [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_load_policies_error_names_file_line_and_key(tmp_path: Path, old: str, new: str,
                                                     marker: str, words: list[str]) -> None:
    """Each invalid variant is a PolicyError naming the file, the line at fault and the key."""
    text = variant(old, new)
    path = write_plans(tmp_path, text)
    with pytest.raises(PolicyError) as info:
        load_policies(tmp_path)
    message = str(info.value)
    assert message.startswith(f"{path}:{line_of(text, marker)}: "), message
    for word in words:
        assert word in message, (word, message)


def test_load_policies_invalid_toml_names_file_and_line(tmp_path: Path) -> None:
    """A TOML syntax error is a PolicyError naming the file and the line."""
    text = variant("monthly_limit = 25000", "monthly_limit = 25000 25000")
    path = write_plans(tmp_path, text)
    with pytest.raises(PolicyError) as info:
        load_policies(tmp_path)
    assert str(path) in str(info.value)
    assert f"line {line_of(text, '25000 25000')}," in str(info.value)


def test_load_policies_missing_section_names_file_and_section(tmp_path: Path) -> None:
    """A file without [over_limit] is refused, naming the file and the section."""
    text = BASE[:BASE.index("[over_limit]")]
    path = write_plans(tmp_path, text)
    with pytest.raises(PolicyError) as info:
        load_policies(tmp_path)
    assert str(path) in str(info.value) and "over_limit" in str(info.value)


def test_load_policies_no_plans_is_refused(tmp_path: Path) -> None:
    """A [plans] table with no plan in it is refused."""
    start, end = BASE.index("[plans.free]"), BASE.index("[over_limit]")
    text = BASE[:start] + "[plans]\n\n" + BASE[end:]
    path = write_plans(tmp_path, text)
    with pytest.raises(PolicyError) as info:
        load_policies(tmp_path)
    assert str(path) in str(info.value) and "plans" in str(info.value)


def test_load_policies_missing_file_is_named(tmp_path: Path) -> None:
    """A policies directory without plans.toml is a PolicyError naming the file."""
    with pytest.raises(PolicyError) as info:
        load_policies(tmp_path)
    assert str(tmp_path / PLANS_FILE) in str(info.value)


def test_load_policies_accepts_a_4xx_over_limit_reply(tmp_path: Path) -> None:
    """A temporary over-limit reply (452 4.5.3) is allowed when code and status agree."""
    write_plans(tmp_path, variant('code = 550\nstatus = "5.7.1"', 'code = 452\nstatus = "4.5.3"'))
    policies = load_policies(tmp_path)
    assert (policies.over_limit.code, policies.over_limit.status) == (452, "4.5.3")


# -- [passwords] -----------------------------------------------------------------------------
def test_load_policies_password_lengths_default_to_12_and_24(tmp_path: Path) -> None:
    """Without [passwords] (or with some of its keys) the minimum lengths are 12 for users
    and 24 for apps; the shipped file states those same values."""
    assert load_policies(SHIPPED).passwords == Passwords(12, 24)
    write_plans(tmp_path, BASE)
    assert load_policies(tmp_path).passwords == Passwords(12, 24)
    write_plans(tmp_path, BASE + "\n[passwords]\nuser_min_length = 16\n")
    assert load_policies(tmp_path).passwords == Passwords(16, 24)


@pytest.mark.parametrize(("section", "key", "reason"), [
    ("[passwords]\nuser_min_length = 0\n", "passwords.user_min_length",
     "must be between 1 and 1024"),
    ("[passwords]\napp_min_length = \"long\"\n", "passwords.app_min_length", "expected"),
    ("[passwords]\nuser_min_lenght = 12\n", "passwords.user_min_lenght", "unknown key"),
])
def test_load_policies_bad_password_lengths_name_the_key(tmp_path: Path, section: str,
                                                         key: str, reason: str) -> None:
    """A bad [passwords] value stops loading, naming the file, the key and why."""
    write_plans(tmp_path, BASE + "\n" + section)
    with pytest.raises(PolicyError) as info:
        load_policies(tmp_path)
    assert f"{key}: {reason}" in str(info.value)
    assert str(tmp_path / PLANS_FILE) in str(info.value)


def test_load_policies_refuses_a_monthly_limit_lua_cannot_count_exactly(tmp_path: Path) -> None:
    """A plan's monthly_limit over 2**53 / 100 stops loading, naming the key and the bound;
    the bound itself loads."""
    write_plans(tmp_path, variant("monthly_limit = 5000", f"monthly_limit = {2**53 // 100}"))
    assert load_policies(tmp_path).plans["free"].monthly_limit == 2**53 // 100
    write_plans(tmp_path, variant("monthly_limit = 5000", "monthly_limit = 776287861482925568"))
    with pytest.raises(PolicyError) as info:
        load_policies(tmp_path)
    assert "plans.free.monthly_limit: must be at most 90071992547409" in str(info.value)
