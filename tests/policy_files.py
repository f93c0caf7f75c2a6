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
