"""The installed package is the checkout: a built wheel carries every file the code reads
at run time (Lua scripts, openapi.json, the page templates, py.typed) and every
subpackage. The editable install the suite runs on reads files straight from the checkout,
so it would hide a missing package-data entry; this builds a real wheel and runs from it."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO

RELAY = REPO / "relay"


def _build_wheel(into: Path) -> Path:
    """A wheel built from a fresh copy of what the package is made of: building in the
    checkout would reuse its build/ and *.egg-info leftovers, which can hold files the
    package data no longer names."""
    source = into / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(RELAY, source / "relay", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet",
                    "--wheel-dir", str(into), str(source)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = into.glob("command_email_relay-*.whl")
    return wheel


def _source_files() -> set[str]:
    return {str(path.relative_to(REPO)) for path in RELAY.rglob("*")
            if path.is_file() and "__pycache__" not in path.parts}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One wheel for the module's tests: a build takes several seconds."""
    return _build_wheel(tmp_path_factory.mktemp("wheel"))


def test_the_wheel_holds_every_file_of_the_package(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        packed = {name for name in archive.namelist() if name.startswith("relay/")}
    assert _source_files() - packed == set()
    packages = {path.parent for path in RELAY.rglob("*.py")}
    assert all((package / "__init__.py").is_file() for package in packages)


def test_the_relay_runs_from_the_wheel(wheel: Path, tmp_path: Path) -> None:
    """Lua scripts and the API document load from the unpacked wheel, not the checkout."""
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tmp_path / "site")
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "import relay, relay.admin.api as api\n"
        "from relay.store.scripts import lua_source\n"
        "assert relay.__file__.startswith(sys.argv[1]), relay.__file__\n"
        "for package, name, prologues in [('relay.identity', 'user.lua', []),\n"
        "        ('relay.identity', 'auth_failure.lua', []),\n"
        "        ('relay.decisions', 'reserve.lua', ['terms.lua']),\n"
        "        ('relay.decisions', 'commit.lua', ['terms.lua', 'units.lua']),\n"
        "        ('relay.decisions', 'refund.lua', ['units.lua']),\n"
        "        ('relay.decisions', 'plan_change.lua', ['terms.lua'])]:\n"
        "    assert 'redis.call' in lua_source(package, name, prologues=prologues), name\n"
        "from relay.admin.usage_page import render_denied\n"
        "assert 'has expired' in render_denied('expired')\n"
        "print(sorted(api.openapi_document()['paths'])[0])\n"
    )
    done = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "site")],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("/")
