"""deploy/compose.yaml, without a container engine: valid against the Compose Specification's
JSON schema (the copy vendored by check-jsonschema), and consistent with the image, the
relay's settings and its CLI.
"""

from __future__ import annotations

import copy
import importlib.resources
import json
import re
import urllib.parse
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from relay.admin.usage_links import usage_link
from relay.config.endpoints import parse_upstream_url
from relay.identity.signed_links import LinkSigner
from relay.smtp.unsubscribe import UnsubscribeLinks
from tests.conftest import REPO
from tests.deploy.deploykit import (
    DEPLOY,
    assert_cli_command,
    port_of,
    project_version,
    setting_value,
    settings_for,
    unknown_names,
)
from tests.deploy.dockerfile import (
    exec_form,
    final_stage,
    image_environment,
    parsed,
    pinned_image_problems,
    values_of,
)

COMPOSE = DEPLOY / "compose.yaml"
SECRETS_MOUNT = Path("/run/secrets")


def compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(document, dict)
    return document


def _schema_errors(document: dict[str, Any]) -> list[str]:
    text = importlib.resources.files("check_jsonschema.builtin_schemas.vendor").joinpath(
        "compose-spec.json").read_text(encoding="utf-8")
    schema = json.loads(text)
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(document)]


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _seconds(duration: str) -> float:
    """A compose duration such as 45s, 1m30s or 1m."""
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m(?!s))?(?:(\d+)s)?", duration)
    assert parts and duration, duration
    hours, minutes, seconds = (int(p or 0) for p in parts.groups())
    return hours * 3600 + minutes * 60 + seconds


def _relay_services(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in document["services"].items()
            if s.get("image", "").startswith("command-relay:")}


def _process_environment(document: dict[str, Any], service: dict[str, Any]) -> dict[str, str]:
    """What the relay process in that container sees: the image's RELAY_* variables, then the
    service's, with RELAY_CONFIG pointing at the repository file behind the compose secret."""
    env = {**image_environment(), **_environment(service)}
    config = env.get("RELAY_CONFIG")
    if config:
        mounted = Path(config)
        assert mounted.parent == SECRETS_MOUNT, config
        targets = {s.get("target", s["source"]): s["source"] for s in service["secrets"]}
        source = document["secrets"][targets[mounted.name]]["file"]
        env["RELAY_CONFIG"] = str((COMPOSE.parent / source).resolve())
    return env


def test_compose_matches_the_compose_specification():
    """compose.yaml is valid against the Compose Specification's JSON schema."""
    assert _schema_errors(compose()) == []


def test_compose_schema_check_can_fail():
    """A misspelt service key and a wrong type are reported by the same check."""
    document = copy.deepcopy(compose())
    document["services"]["relay"]["stop_grace_periood"] = "45s"
    document["services"]["redis"]["volumes"] = "redis-data:/data"
    errors = _schema_errors(document)
    assert any("stop_grace_periood" in e for e in errors), errors
    assert any(e.startswith("services.redis.volumes") for e in errors), errors


def test_compose_has_the_local_stack():
    """The relay, the notifier, Redis and a capturing upstream (Mailpit)."""
    services = compose()["services"]
    assert {"relay", "notifier", "redis", "mailpit"} <= set(services)
    assert services["mailpit"]["image"].startswith("axllent/mailpit:")
    for name in ("relay", "notifier"):
        build = services[name]["build"]
        assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == \
            (DEPLOY / "Dockerfile").resolve()


def test_compose_images_are_pinned():
    """Every image is tagged, none `latest`; the relay's tag is the project's version."""
    services = compose()["services"]
    assert pinned_image_problems([s["image"] for s in services.values()]) == []
    for service in _relay_services(compose()).values():
        assert service["image"] == f"command-relay:{project_version()}"


def test_compose_commands_are_real_cli_commands():
    """The relay runs `serve` and the notifier `notifier`, both commands of the CLI."""
    services = compose()["services"]
    assert services["relay"]["command"] == ["serve"]
    assert services["notifier"]["command"] == ["notifier"]
    for name in ("relay", "notifier"):
        assert_cli_command(services[name]["command"])


def test_compose_environment_is_valid_settings():
    """Each relay container's environment, with the secrets file, loads as settings: Redis
    and the upstream are the compose services."""
    document = compose()
    for name, service in _relay_services(document).items():
        env = _process_environment(document, service)
        assert unknown_names(env) == set(), name
        settings = settings_for(env)
        assert settings.redis_url == "redis://redis:6379/0"
        assert settings.upstream == parse_upstream_url("smtp://mailpit:1025")
        assert settings.redis_url.split("//")[1].split(":")[0] in document["services"]
        assert settings.upstream is not None and settings.upstream.host in document["services"]
        if name == "relay":
            assert settings.admin_token is not None


def test_compose_secrets_file_is_settings_and_not_a_real_secret():
    """compose.secrets.toml holds only settings keys, and says it is for local use."""
    secrets = DEPLOY / "compose.secrets.toml"
    settings = settings_for({}, config_file=secrets)
    assert settings.admin_token is not None and "local" in settings.admin_token
    assert "LOCAL" in secrets.read_text(encoding="utf-8")


def _published(service: dict[str, Any]) -> dict[int, int]:
    """Container port -> host port, each published on 127.0.0.1 only."""
    published = {}
    for entry in service["ports"]:
        host_ip, host_port, container = entry.split(":")
        assert host_ip == "127.0.0.1", entry
        published[int(container)] = int(host_port)
    return published


def test_compose_relay_publishes_its_listeners_on_loopback():
    """The published container ports are the relay's listen ports (SMTP, SMTPS, metrics,
    admin API, public HTTP); only on 127.0.0.1."""
    document = compose()
    relay = document["services"]["relay"]
    env = _process_environment(document, relay)
    published = _published(relay)
    wanted = {port_of(setting_value(env, n)) for n in (
        "RELAY_LISTEN", "RELAY_SMTPS_LISTEN", "RELAY_METRICS_LISTEN", "RELAY_ADMIN_LISTEN",
        "RELAY_PUBLIC_LISTEN")}
    assert set(published) == wanted
    # Nothing else is published from the host but Mailpit's web UI, on loopback.
    for name, service in document["services"].items():
        if name not in ("relay", "mailpit"):
            assert "ports" not in service, name
    assert all(p.startswith("127.0.0.1:") for p in document["services"]["mailpit"]["ports"])


def test_compose_public_links_open_on_the_published_listener():
    """The links the relay hands out (one-click unsubscribe, the usage page), made by its own
    code from the container's RELAY_PUBLIC_URL, point at the host port that publishes the
    public listener, which listens on every interface of the container."""
    document = compose()
    relay = document["services"]["relay"]
    settings = settings_for(_process_environment(document, relay))
    assert settings.public_listen is not None and settings.public_listen.host == "0.0.0.0"
    host_port = _published(relay)[settings.public_listen.port]
    secret = b"a-link-signing-secret-of-some-length"
    links = [UnsubscribeLinks(settings.public_url, lambda: secret).url(
                 "agent@kw.example", "client@example.com"),
             usage_link(LinkSigner(secret), settings.public_url, "agent@kw.example")]
    for link in links:
        url = urllib.parse.urlsplit(link)
        assert (url.scheme, url.hostname, url.port) == ("http", "127.0.0.1", host_port), link


def test_compose_stop_grace_period_outlasts_the_drain():
    """docker compose stop waits longer than RELAY_DRAIN_TIMEOUT before SIGKILL."""
    document = compose()
    for name, service in _relay_services(document).items():
        drain = float(setting_value(_process_environment(document, service),
                                    "RELAY_DRAIN_TIMEOUT"))
        assert _seconds(service["stop_grace_period"]) > drain, name


def test_compose_redis_keeps_an_append_only_file():
    """Redis runs with appendonly on a named volume, so counts survive a restart."""
    document = compose()
    redis = document["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    volume = next(v for v in redis["volumes"] if v.endswith(":/data"))
    assert volume.split(":")[0] in document["volumes"]
    assert redis["healthcheck"]["test"][-1] == "ping"
    assert document["services"]["relay"]["depends_on"]["redis"]["condition"] == \
        "service_healthy"


def test_compose_policies_are_mounted_where_the_image_reads_them():
    """The repository's policies/ is mounted read-only at the image's RELAY_POLICIES_DIR."""
    document = compose()
    for name, service in _relay_services(document).items():
        policies_dir = _process_environment(document, service)["RELAY_POLICIES_DIR"]
        mounts = [v.split(":") for v in service["volumes"]]
        source, _, mode = next(m for m in mounts if m[1] == policies_dir)
        assert (COMPOSE.parent / source).resolve() == (REPO / "policies").resolve(), name
        assert mode == "ro"


@pytest.mark.parametrize("name", ["relay", "notifier"])
def test_compose_relay_containers_are_locked_down(name: str):
    """Read-only root, no capabilities, no privilege gain; state on a volume or tmpfs."""
    document = compose()
    service = document["services"][name]
    assert service["read_only"] is True
    assert service["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in service["security_opt"]
    state = _process_environment(document, service)["RELAY_STATE_DIR"]
    writable = set(service.get("tmpfs", [])) | {
        v.split(":")[1] for v in service.get("volumes", []) if not v.endswith(":ro")}
    assert {state, "/tmp"} <= writable


def test_compose_notifier_checks_its_own_health_endpoint():
    """The notifier's health check is the image's script on the notifier's own listener
    (its variable as the argument), which its environment enables; the relay keeps the
    image's (the relay's listener)."""
    document = compose()
    notifier = document["services"]["notifier"]
    check = notifier["healthcheck"]
    final = _final_healthcheck_argv()
    assert check["test"] == ["CMD", *final, "RELAY_NOTIFIER_METRICS_LISTEN"]
    assert {"interval", "timeout", "retries"} <= set(check)
    listen = setting_value(_process_environment(document, notifier),
                           "RELAY_NOTIFIER_METRICS_LISTEN")
    assert listen and port_of(listen) > 0
    assert "healthcheck" not in document["services"]["relay"]


def _final_healthcheck_argv() -> list[str]:
    """The image's HEALTHCHECK command (exec form)."""
    [check] = values_of(final_stage(parsed()), "HEALTHCHECK")
    return exec_form(check.partition("CMD")[2].strip())
