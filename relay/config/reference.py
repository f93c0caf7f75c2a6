"""docs/configuration.md, generated from the declarations of ``Settings``: the page's intro
and the table of every ``RELAY_*`` variable with its default and meaning.

Regenerate it after changing a setting: ``python -m relay.config.reference >
docs/configuration.md``; tests/config/test_reference.py fails while the file and the declarations
differ.
"""

from __future__ import annotations

from relay.config.declare import Declared, as_text
from relay.config.parsers import SettingsError
from relay.config.settings import SETTINGS, load_settings

COMMAND = "python -m relay.config.reference > docs/configuration.md"
# A bad value, to show the error the relay really gives for it (never a stale copy).
_BAD_UPSTREAM = {"RELAY_UPSTREAM_URL": "http://smtp.example.com"}


def example_error() -> str:
    try:
        load_settings(environ=_BAD_UPSTREAM)
    except SettingsError as exc:
        return str(exc)
    raise AssertionError(f"{_BAD_UPSTREAM} was accepted")  # pragma: no cover


def intro() -> str:
    return f"""\
<!-- Generated from the declarations in relay/config/settings.py: edit them (or this intro,
in relay/config/reference.py), not this file, then regenerate it with
`{COMMAND}`. -->

# Configuration

Settings (where things are, secrets) come from `RELAY_*` environment variables, optionally
on top of a TOML file (`--config FILE` or `RELAY_CONFIG`; keys are the names below in lower
case without `RELAY_`; see `deploy/relay.example.toml`). The environment wins over the file.
Unknown keys and bad values stop the relay with the key and the reason, and a valid example
where one helps (secrets are never repeated), e.g. `{example_error()}`.
`command-relay check-config` validates everything without serving, and lists the settings
that differ from their defaults (secrets masked).

What the business wants (plans, replies, notifications, routes) is not here: it lives in the
policy files under `RELAY_POLICIES_DIR`, each key documented in place.
"""


def _default(declared: Declared) -> str:
    if declared.setting.default_doc is not None:
        return declared.setting.default_doc
    text = as_text(declared.default_value())
    return f"`{text}`" if text else "—"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def table() -> str:
    rows = ["| Variable | Default | Meaning |", "|---|---|---|"]
    rows += [f"| `{d.variable}` | {_cell(_default(d))} | {_cell(d.setting.doc)} |"
             for d in SETTINGS]
    return "\n".join(rows) + "\n"


def render() -> str:
    """The whole of docs/configuration.md."""
    return intro() + "\n" + table()


if __name__ == "__main__":
    print(render(), end="")
