"""relay.config.reference: docs/configuration.md is generated from the settings' declarations,
and says what the relay really reads."""

from __future__ import annotations

import subprocess
import sys

from relay.config.reference import COMMAND, render, table
from relay.config.settings import SETTINGS, load_settings
from tests.conftest import REPO

DOC = REPO / "docs" / "configuration.md"


def test_reference_file_is_the_generated_one() -> None:
    """docs/configuration.md is exactly what the generator writes from the declarations: a
    setting added, renamed or redocumented without regenerating the file fails here."""
    assert DOC.read_text(encoding="utf-8") == render(), (
        f"docs/configuration.md is stale; regenerate it with: {COMMAND}")


def test_reference_command_writes_the_file() -> None:
    """The command the file names at its top prints the file as it is."""
    assert COMMAND in DOC.read_text(encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "relay.config.reference"], cwd=REPO,
                            capture_output=True, text=True, check=True, timeout=60)
    assert result.stdout == DOC.read_text(encoding="utf-8")


def test_reference_table_has_one_row_per_setting() -> None:
    """Every declared setting, the route URL family included, has one row, in declaration
    order, and every single variable of the table is one load_settings knows."""
    rows = table().splitlines()[2:]
    assert [row.split("`")[1] for row in rows] == [d.variable for d in SETTINGS]
    assert any(row.startswith("| `RELAY_ROUTE_<NAME>_URL` | — |") for row in rows)
    for declared in SETTINGS:
        if declared.setting.family is None:
            load_settings(environ={declared.variable: ""})  # "unknown setting" if not


def test_reference_defaults_are_the_values_or_say_what_unset_does() -> None:
    """The Default column shows the value in its text form, or the declared words."""
    rows = {row.split("`")[1]: row for row in table().splitlines()[2:]}
    assert rows["RELAY_LISTEN"].startswith("| `RELAY_LISTEN` | `127.0.0.1:2525` |")
    assert rows["RELAY_IDLE_TIMEOUT"].startswith("| `RELAY_IDLE_TIMEOUT` | `300` |")
    assert rows["RELAY_UPSTREAM_TLS_VERIFY"].startswith("| `RELAY_UPSTREAM_TLS_VERIFY` | `1` |")
    assert rows["RELAY_TRUSTED_PROXIES"].startswith("| `RELAY_TRUSTED_PROXIES` | — |")
    assert rows["RELAY_REDIS_URL"].startswith("| `RELAY_REDIS_URL` | — (embedded) |")
    assert rows["RELAY_HOSTNAME"].startswith("| `RELAY_HOSTNAME` | the machine's host name |")


def test_reference_example_error_is_the_relays_own() -> None:
    """The intro quotes the error the relay gives today for a bad upstream URL."""
    try:
        load_settings(environ={"RELAY_UPSTREAM_URL": "http://smtp.example.com"})
    except ValueError as exc:
        assert f"e.g. `{exc}`" in DOC.read_text(encoding="utf-8")
    else:
        raise AssertionError("a bad upstream URL was accepted")
