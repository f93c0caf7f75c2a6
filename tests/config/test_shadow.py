"""relay/config/shadow.py: the shadow folder laid over the live policies, file by file, and
its errors (file, line and key, as for policies/)."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.config.policies import PolicyError, load_policies
from relay.config.shadow import load_candidate
from tests.conftest import POLICIES
from tests.policy_files import shadow_notifications, shadow_plans, shadow_routing

LIVE = load_policies(POLICIES)
RULE = '[[rules]]\nname = "trial"\nroute = "mailchimp"'


def test_shadow_one_file_replaces_only_its_part(tmp_path: Path) -> None:
    """A folder with plans.toml alone: the candidate's plans, the live routing and
    notifications (the very same objects)."""
    shadow_plans(tmp_path, 4)
    found = load_candidate(tmp_path, LIVE)
    assert found is not None
    assert found.files == ("plans.toml",)
    assert found.policies.plans["free"].monthly_limit == 4
    assert found.policies.routing is LIVE.routing
    assert found.policies.notifications is LIVE.notifications
    assert LIVE.plans["free"].monthly_limit == 5000


def test_shadow_every_file(tmp_path: Path) -> None:
    shadow_plans(tmp_path, 4)
    shadow_routing(tmp_path, RULE)
    shadow_notifications(tmp_path, [50])
    found = load_candidate(tmp_path, LIVE)
    assert found is not None
    assert found.files == ("plans.toml", "routing.toml", "notifications.toml")
    assert found.policies.routing.rules[0].name == "trial"
    assert found.policies.notifications.thresholds == (50,)
    assert found.policies.passwords == LIVE.passwords


def test_shadow_empty_folder_trials_nothing(tmp_path: Path) -> None:
    (tmp_path / "README").write_text("candidate policies go here\n", encoding="utf-8")
    assert load_candidate(tmp_path, LIVE) is None


@pytest.mark.parametrize(("write", "message"), [
    (lambda d: (d / "plans.toml").write_text("[defaults]\nplan = 1\n", encoding="utf-8"),
     "plans.toml"),
    (lambda d: (d / "routing.toml").write_text("[routes.command]\ncounted = 1\n",
                                               encoding="utf-8"), "routing.toml"),
    (lambda d: (d / "notifications.toml").write_text("[thresholds]\npercent = [120]\n",
                                                     encoding="utf-8"),
     "notifications.toml"),
    (lambda d: (d / "plan.toml").write_text("", encoding="utf-8"),
     "plan.toml: not a policy file"),
])
def test_shadow_bad_file_names_it(tmp_path: Path, write, message: str) -> None:
    """A bad or unknown file is a PolicyError naming the shadow file, never a partial trial."""
    shadow_plans(tmp_path, 4)
    write(tmp_path)
    with pytest.raises(PolicyError) as caught:
        load_candidate(tmp_path, LIVE)
    assert str(tmp_path) in str(caught.value)
    assert message in str(caught.value)


def test_shadow_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="the shadow policies folder does not exist"):
        load_candidate(tmp_path / "absent", LIVE)
