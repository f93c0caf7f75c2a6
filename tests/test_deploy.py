"""The files under deploy/ stay valid as the settings evolve."""

from __future__ import annotations

from relay.settings import load_settings
from tests.conftest import REPO


def test_deploy_example_settings_file_loads():
    """deploy/relay.example.toml uses only known keys with valid values."""
    settings = load_settings(environ={}, config_file=REPO / "deploy" / "relay.example.toml")
    assert str(settings.listen) == "0.0.0.0:587"
    assert settings.upstream is not None and settings.upstream.tls == "starttls"
    assert "REPLACE-ME" not in repr(settings)
