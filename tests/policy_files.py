"""Copies of the shipped policies/ edited for one test: a plan's limit changed (as an
operator would before a SIGHUP), or a route added."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.conftest import POLICIES

# A counted route on an upstream of its own (``route_urls={"secondary": ...}``), for failover
# and reload tests; appended to a copy of routing.toml.
SECONDARY_ROUTE = """
[routes.secondary]
counted = true
upstream = "setting"
credentials = "upstream"
pass_headers = []
failover = ""
"""


def policies_copy(tmp_path: Path) -> Path:
    """The shipped policies, copied to ``tmp_path/policies``."""
    target = tmp_path / "policies"
    shutil.copytree(POLICIES, target)
    return target


def policies_with_limit(tmp_path: Path, limit: int) -> Path:
    """``tmp_path/policies`` (copied once), with the free plan's monthly limit set."""
    directory = tmp_path / "policies"
    if not directory.exists():
        policies_copy(tmp_path)
    set_free_limit(directory, limit)
    return directory


def set_free_limit(directory: Path, limit: int) -> None:
    path = directory / "plans.toml"
    text = path.read_text(encoding="utf-8")
    start = text.index("[plans.free]")
    key = text.index("monthly_limit = ", start)
    end = text.index("\n", key)
    # Write a new file and rename it over the old: a reload never sees half a file.
    staged = directory / ".plans.toml.new"
    staged.write_text(text[:key] + f"monthly_limit = {limit}" + text[end:], encoding="utf-8")
    staged.replace(path)


# -- candidate files for the shadow trial (docs/shadow.md) ----------------------------------
def shadow_routing(directory: Path, rule: str) -> Path:
    """``directory/routing.toml``: the shipped routing with ``rule`` (one ``[[rules]]``
    table) checked before every shipped rule."""
    directory.mkdir(parents=True, exist_ok=True)
    text = (POLICIES / "routing.toml").read_text(encoding="utf-8")
    first = text.index("[[rules]]")
    path = directory / "routing.toml"
    path.write_text(text[:first] + rule.strip() + "\n\n" + text[first:], encoding="utf-8")
    return path


def shadow_plans(directory: Path, free_limit: int,
                 over_limit: tuple[int, str] | None = None) -> Path:
    """``directory/plans.toml``: the shipped plans with the free plan's limit changed (and
    the ``[over_limit]`` code and status)."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(POLICIES / "plans.toml", directory / "plans.toml")
    set_free_limit(directory, free_limit)
    path = directory / "plans.toml"
    if over_limit is not None:
        text = path.read_text(encoding="utf-8")
        for old, new in (("code = 550\n", f"code = {over_limit[0]}\n"),
                         ('status = "5.7.1"\n', f'status = "{over_limit[1]}"\n')):
            assert text.count(old) == 1
            text = text.replace(old, new)
        path.write_text(text, encoding="utf-8")
    return path


def shadow_notifications(directory: Path, percents: list[int]) -> Path:
    """``directory/notifications.toml``: the shipped notifications with other thresholds."""
    directory.mkdir(parents=True, exist_ok=True)
    text = (POLICIES / "notifications.toml").read_text(encoding="utf-8")
    old = "percent = [80, 85, 90, 95]"
    assert old in text
    path = directory / "notifications.toml"
    path.write_text(text.replace(old, f"percent = {percents}"), encoding="utf-8")
    return path
