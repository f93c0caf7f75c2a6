"""The files under deploy/ stay valid as the settings and the CLI evolve: every RELAY_* name
they use is a setting, the example settings file loads, and the README names every file.

The image, compose, Kubernetes and systemd files have a test file each
(tests/deploy/test_*.py); what they ask of the relay is in tests/deploy/deploykit.py.
"""

from __future__ import annotations

from relay.config.settings import load_settings
from tests.conftest import REPO
from tests.deploy.deploykit import DEPLOY, OWN_FILES, relay_names, unknown_names


def test_deploy_example_settings_file_loads():
    """deploy/relay.example.toml uses only known keys with valid values."""
    settings = load_settings(environ={}, config_file=REPO / "deploy" / "relay.example.toml")
    assert str(settings.listen) == "0.0.0.0:587"
    assert settings.upstream is not None and settings.upstream.tls == "starttls"
    assert "REPLACE-ME" not in repr(settings)
    # The public HTTP listener stays on loopback for the host's HTTPS proxy, whose https://
    # address the links carry (RFC 8058).
    assert settings.public_listen is not None and settings.public_listen.host == "127.0.0.1"
    assert settings.public_url.startswith("https://")


def test_deploy_names_only_real_settings():
    """Every RELAY_* name in deploy/ (manifests, units, comments, README) is a setting."""
    seen: dict[str, set[str]] = {}
    for path in OWN_FILES:
        for name in relay_names(path.read_text(encoding="utf-8")):
            seen.setdefault(name, set()).add(str(path.relative_to(REPO)))
    assert "RELAY_REDIS_URL" in seen and "RELAY_UPSTREAM_URL" in seen
    unknown = {n: sorted(seen[n]) for n in unknown_names(seen)}
    assert unknown == {}, f"not settings in relay/config/settings.py: {unknown}"


def test_deploy_name_check_catches_a_typo():
    """The check above can fail: a misspelt or retired name is reported."""
    assert unknown_names({"RELAY_REDIS_URL", "RELAY_REDIS_ULR", "RELAY_ROUTE_X_URL"}) == {
        "RELAY_REDIS_ULR"}
    assert relay_names("RELAY_ROUTE_<NAME>_URL, RELAY_* and RELAY_LISTEN.") == {"RELAY_LISTEN"}


def test_deploy_readme_covers_every_file():
    """deploy/README.md names each deployment file, and the main README and
    docs/deployment.md point to it."""
    readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    for path in OWN_FILES:
        relative = path.relative_to(DEPLOY)
        if path.name == "README.md" or (relative.parts[0] == "k8s" and path.suffix == ".yaml"):
            continue
        assert str(relative) in readme, f"deploy/README.md does not mention {relative}"
    assert "k8s/" in readme
    assert "(deploy/README.md)" in (REPO / "README.md").read_text(encoding="utf-8")
    deployment = (REPO / "docs" / "deployment.md").read_text(encoding="utf-8")
    assert "(../deploy/README.md)" in deployment
