"""deploy/Dockerfile, .dockerignore and the image's health check, without a container engine.

The Dockerfile is parsed with dockerfile-parse and linted with hadolint; what it says is
checked against the relay itself (its settings, its CLI) and against the build context that
.dockerignore leaves. The health check script runs for real against HTTP listeners.
"""

from __future__ import annotations

import http.server
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.conftest import REPO, free_port
from tests.deploy.deploykit import (
    DEPLOY,
    RelayProcess,
    assert_cli_command,
    port_of,
    setting_value,
    settings_for,
    unknown_names,
)
from tests.deploy.dockerfile import (
    DOCKERFILE,
    base_images,
    build_stages,
    exec_form,
    final_stage,
    image_environment,
    parsed,
    pinned_image_problems,
    values_of,
)
from tests.serving import clean_env

HEALTHCHECK = DEPLOY / "healthcheck.py"


# -- the Dockerfile --------------------------------------------------------------------------
def test_dockerfile_runs_as_a_non_root_user():
    """The final stage ends as a numeric non-root user (Kubernetes' runAsNonRoot needs a
    number), the same uid the manifests run as."""
    users = values_of(final_stage(parsed()), "USER")
    assert users, "the final stage sets no USER: the relay would run as root"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) >= 1000, users[-1]
    assert not gid or (gid.isdigit() and int(gid) != 0), users[-1]


def test_dockerfile_base_images_are_pinned():
    """Every base image has an explicit tag that is not `latest`."""
    images = base_images(parsed())
    assert images and all(i.startswith("python:3.1") for i in images), images
    assert pinned_image_problems(images) == []


def test_dockerfile_pin_check_can_fail():
    """The pin check reports an untagged image and a `latest` one."""
    assert pinned_image_problems(["python", "redis:latest", "redis:7.2-alpine",
                                  "registry.example:5000/relay", "a/b@sha256:00"]) == [
        "python: no tag", "redis:latest: the latest tag", "registry.example:5000/relay: no tag"]


def test_dockerfile_entrypoint_is_the_relay_cli():
    """ENTRYPOINT + CMD is `command-relay serve`, a real command of the CLI."""
    final = final_stage(parsed())
    entrypoint = exec_form(values_of(final, "ENTRYPOINT")[-1])
    command = exec_form(values_of(final, "CMD")[-1])
    assert entrypoint == ["command-relay"]
    assert command == ["serve"]
    assert_cli_command(command)
    assert values_of(final, "STOPSIGNAL") == ["SIGTERM"]


def test_dockerfile_healthcheck_runs_the_shipped_script():
    """HEALTHCHECK runs deploy/healthcheck.py, copied into the image, with python."""
    final = final_stage(parsed())
    checks = values_of(final, "HEALTHCHECK")
    assert len(checks) == 1
    options, _, command = checks[0].partition("CMD")
    assert "--timeout=" in options and "--interval=" in options
    argv = exec_form(command.strip())
    assert argv[0] == "python"
    copies = [shlex.split(v) for v in values_of(final, "COPY")]
    assert ["deploy/healthcheck.py", argv[1]] in copies


def test_dockerfile_exposes_the_listen_ports():
    """EXPOSE lists exactly the ports of the image's SMTP, SMTPS and metrics listeners (the
    relay's, and the notifier's for a container that runs `notifier`) and of its public HTTP
    listener (what the HTTPS reverse proxy forwards to)."""
    env = image_environment()
    exposed = {int(p.split("/")[0]) for v in values_of(final_stage(parsed()), "EXPOSE")
               for p in v.split()}
    listeners = {port_of(setting_value(env, n))
                 for n in ("RELAY_LISTEN", "RELAY_SMTPS_LISTEN", "RELAY_METRICS_LISTEN",
                           "RELAY_NOTIFIER_METRICS_LISTEN", "RELAY_PUBLIC_LISTEN")}
    assert exposed == listeners == {587, 465, 9465, 9466, 8026}


def test_dockerfile_environment_is_valid_settings():
    """The image's RELAY_* variables are settings and load as they are."""
    env = image_environment()
    assert unknown_names(env) == set()
    settings = settings_for(env)
    assert str(settings.listen) == "0.0.0.0:587"
    assert settings.smtps_listen is not None and settings.smtps_listen.port == 465
    assert settings.public_listen is not None and settings.public_listen.port == 8026
    assert settings.log_format == "json"
    assert str(settings.policies_dir) == "/etc/command-relay/policies"
    # The image copies the repository's policies exactly there.
    copies = [shlex.split(v) for v in values_of(final_stage(parsed()), "COPY")]
    assert ["policies/", f"{settings.policies_dir}/"] in copies
    # No secret is baked into the image.
    assert not {"RELAY_REDIS_URL", "RELAY_UPSTREAM_URL", "RELAY_ADMIN_TOKEN",
                "RELAY_CREDENTIALS_KEY"} & set(env)


@pytest.mark.parametrize("name", ["RELAY_METRICS_LISTEN", "RELAY_NOTIFIER_METRICS_LISTEN",
                                  "RELAY_PUBLIC_LISTEN"])
def test_dockerfile_http_listener_is_reachable_from_outside_the_container(name: str):
    """Probes, Prometheus and the reverse proxy in front of the public listener come from
    outside the container's loopback (the settings' default): the image listens on 0.0.0.0,
    for the relay's metrics and public listeners and for the notifier's."""
    assert image_environment()[name].startswith("0.0.0.0:")
    assert not setting_value({}, name).startswith("0.0.0.0:")


def test_dockerfile_build_stage_has_what_pip_install_needs():
    """The build stage copies pyproject.toml, the readme it names and the package."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    build = build_stages(parsed())[1]
    copied = {source.rstrip("/") for v in values_of(build, "COPY")
              for source in shlex.split(v)[:-1]}
    assert "pyproject.toml" in copied
    assert project["project"]["readme"] in copied
    for package in project["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert package.rstrip("*") in copied
    assert any("pip install ." in v for v in values_of(build, "RUN"))


def test_dockerfile_passes_hadolint(tmp_path: Path):
    """hadolint (the Dockerfile linter, from the test extra) finds nothing, at any level."""
    hadolint = Path(sys.executable).with_name("hadolint")
    result = subprocess.run(
        [str(hadolint), "--no-color", "-f", "json", "--failure-threshold", "style",
         str(DOCKERFILE)], capture_output=True, text=True, timeout=60, cwd=tmp_path,
        env={**os.environ, "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path)})
    assert json.loads(result.stdout or "[]") == [], result.stdout
    assert result.returncode == 0, result.stderr


def test_hadolint_reports_a_bad_dockerfile(tmp_path: Path):
    """The lint test can fail: hadolint flags a `latest` base image and an unpinned apt."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install -y gcc\n", encoding="utf-8")
    hadolint = Path(sys.executable).with_name("hadolint")
    result = subprocess.run([str(hadolint), "--no-color", "-f", "json", str(bad)],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path,
                            env={**os.environ, "HOME": str(tmp_path)})
    codes = {finding["code"] for finding in json.loads(result.stdout)}
    assert {"DL3007", "DL3008"} <= codes, codes
    assert result.returncode != 0


# -- .dockerignore ---------------------------------------------------------------------------
def _pattern(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match, plus `**`) as a regular expression."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def ignored(relative: str, text: str | None = None) -> bool:
    """Whether Docker leaves ``relative`` (a path in the context) out of the build context:
    the last pattern matching the path or one of its parent folders decides."""
    text = (REPO / ".dockerignore").read_text(encoding="utf-8") if text is None else text
    parts = relative.strip("/").split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    result = False
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        regex = _pattern(os.path.normpath(line.lstrip("!").strip("/")))
        if any(regex.match(prefix) for prefix in prefixes):
            result = not negated
    return result


def test_dockerignore_matcher_follows_docker_rules():
    """The matcher used below: parents, `**`, and exceptions with `!`, last match wins."""
    rules = "deploy/*\n!deploy/healthcheck.py\n**/__pycache__\n.venv\n"
    assert ignored("deploy/compose.yaml", rules)
    assert not ignored("deploy/healthcheck.py", rules)
    assert ignored("relay/__pycache__/app.cpython-311.pyc", rules)
    assert ignored(".venv/bin/python", rules)
    assert not ignored("relay/process/wiring.py", rules)


def _copied_sources() -> list[str]:
    sources = []
    for stage in build_stages(parsed())[1:]:
        for value in values_of(stage, "COPY"):
            words = shlex.split(value)
            if not any(w.startswith("--from") for w in words):
                sources += words[:-1]
    return sources


def test_dockerignore_keeps_everything_the_dockerfile_copies():
    """Each COPY source exists and is in the build context, down to every file it holds."""
    sources = _copied_sources()
    assert {"relay/", "policies/", "deploy/healthcheck.py", "pyproject.toml"} <= set(sources)
    for source in sources:
        path = REPO / source
        assert path.exists(), f"COPY {source}: no such file in the repository"
        files = [path] if path.is_file() else [
            p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
        assert files, source
        for file in files:
            relative = str(file.relative_to(REPO))
            assert not ignored(relative), f".dockerignore leaves out {relative}, which is copied"


def test_dockerignore_leaves_out_local_state_and_tooling():
    """The virtualenv, git data, the development state folder (keys, data) and the test and
    deployment files are not sent to the builder."""
    for relative in (".venv/bin/python", ".git/config", ".relay-state/credentials.key",
                     ".relay-state/dev-key.pem", "tests/conftest.py", "bench/README.md",
                     "deploy/compose.secrets.toml", "deploy/k8s/examples/secret.yaml",
                     "relay/__pycache__/app.cpython-311.pyc", ".env"):
        assert ignored(relative), relative


# -- the health check script -----------------------------------------------------------------
def _healthcheck_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("deploy_healthcheck", HEALTHCHECK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("listen", "url"), [
    ("127.0.0.1:9465", "http://127.0.0.1:9465/healthz"),
    ("0.0.0.0:9465", "http://127.0.0.1:9465/healthz"),
    ("[::]:9000", "http://[::1]:9000/healthz"),
    ("[::1]:9000", "http://[::1]:9000/healthz"),
    ("10.1.2.3:9465", "http://10.1.2.3:9465/healthz"),
    ("", None),
])
def test_healthcheck_url_follows_the_metrics_listener(listen: str, url: str | None):
    """A wildcard listener is checked on loopback; an empty one means there is nothing."""
    assert _healthcheck_module().healthz_url({"RELAY_METRICS_LISTEN": listen}) == url


def test_healthcheck_url_defaults_to_the_relay_default():
    """Without the variable, the script checks the relay's own default listener (the
    notifier's with its variable named): the defaults are relay/config/settings.py's."""
    module = _healthcheck_module()
    assert module.healthz_url({}) == "http://127.0.0.1:9465/healthz"
    assert module.healthz_url({}, "RELAY_NOTIFIER_METRICS_LISTEN") == \
        "http://127.0.0.1:9466/healthz"
    assert module.DEFAULT_LISTEN == setting_value({}, "RELAY_METRICS_LISTEN")
    for name, listen in module.DEFAULTS.items():
        assert listen == setting_value({}, name), name


def test_healthcheck_reads_the_variable_it_is_given():
    """`healthcheck.py RELAY_NOTIFIER_METRICS_LISTEN` follows that variable, not the relay's."""
    module = _healthcheck_module()
    environ = {"RELAY_METRICS_LISTEN": "0.0.0.0:9465",
               "RELAY_NOTIFIER_METRICS_LISTEN": "0.0.0.0:9100"}
    assert module.healthz_url(environ, "RELAY_NOTIFIER_METRICS_LISTEN") == \
        "http://127.0.0.1:9100/healthz"
    assert module.healthz_url(environ) == "http://127.0.0.1:9465/healthz"


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200
    paths: list[str]

    def do_GET(self) -> None:
        type(self).paths.append(self.path)
        self.send_response(type(self).status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"status": "x"}')

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[tuple[http.server.HTTPServer, type[_Health]]]:
    handler = type("Health", (_Health,), {"paths": [], "status": 200})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, handler
    server.shutdown()
    server.server_close()
    thread.join(5)


def _run_healthcheck(listen: str,
                     variable: str | None = None) -> subprocess.CompletedProcess[str]:
    env = clean_env(metrics_ports=False)
    env[variable or "RELAY_METRICS_LISTEN"] = listen
    argv = [variable] if variable else []
    return subprocess.run([sys.executable, str(HEALTHCHECK), *argv], env=env,
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize(("status", "code"), [(200, 0), (503, 1), (500, 1)])
def test_healthcheck_exit_status_follows_healthz(
        health_server: tuple[http.server.HTTPServer, type[_Health]], status: int, code: int):
    """Exit 0 only when GET /healthz answers 200; the line printed says which URL and why."""
    server, handler = health_server
    handler.status = status
    port = server.server_address[1]
    result = _run_healthcheck(f"0.0.0.0:{port}")
    assert result.returncode == code, result.stdout + result.stderr
    assert handler.paths == ["/healthz"]
    assert f"http://127.0.0.1:{port}/healthz: {status}" in result.stdout
    assert result.stdout.startswith("healthy" if code == 0 else "unhealthy")


def test_healthcheck_fails_when_nothing_listens():
    """A relay that is not listening is unhealthy, promptly and without a traceback."""
    result = _run_healthcheck(f"127.0.0.1:{free_port()}")
    assert result.returncode == 1
    assert result.stdout.startswith("unhealthy") and "Traceback" not in result.stderr


def test_healthcheck_fails_when_the_listener_is_disabled():
    """RELAY_METRICS_LISTEN="" has no /healthz: unhealthy, saying what to do."""
    result = _run_healthcheck("")
    assert result.returncode == 1
    assert "RELAY_METRICS_LISTEN is empty" in result.stdout


@pytest.mark.parametrize("argv", [["RELAY_LISTEN"], ["RELAY_METRICS_LISTEN", "extra"]])
def test_healthcheck_refuses_an_unknown_variable(argv: list[str]):
    """Only the two metrics listeners' variables are accepted: anything else is a usage
    error (status 2), not a check of some other port."""
    result = subprocess.run([sys.executable, str(HEALTHCHECK), *argv], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 2
    assert "usage: healthcheck.py" in result.stderr


def test_healthcheck_against_the_real_relay(redis_server: Any, tmp_path: Path):
    """The image's health check passes against `command-relay serve` itself (as many workers
    as cores, the image's default: the supervisor answers)."""
    metrics = f"127.0.0.1:{free_port()}"
    relay = RelayProcess(tmp_path, redis_server.url, {"RELAY_METRICS_LISTEN": metrics})
    try:
        relay.wait_listening()
        result = _run_healthcheck(metrics)
    finally:
        relay.stop()
    assert result.returncode == 0, result.stdout


def test_healthcheck_against_the_real_notifier(redis_server: Any, tmp_path: Path):
    """With RELAY_NOTIFIER_METRICS_LISTEN as its argument, the health check passes against
    `command-relay notifier` (as compose.yaml runs it), once it listens."""
    metrics = f"127.0.0.1:{free_port()}"
    notifier = RelayProcess(tmp_path, redis_server.url,
                            {"RELAY_NOTIFIER_METRICS_LISTEN": metrics}, argv=["notifier"])
    try:
        deadline = time.monotonic() + 30
        while True:
            result = _run_healthcheck(metrics, "RELAY_NOTIFIER_METRICS_LISTEN")
            if result.returncode == 0 or time.monotonic() > deadline:
                break
            assert notifier.process.poll() is None, notifier.output()
            time.sleep(0.2)
        # The relay's variable names another listener: nothing answers there.
        other = _run_healthcheck(f"127.0.0.1:{free_port()}")
    finally:
        assert notifier.stop() == 0, notifier.output()
    assert result.returncode == 0, result.stdout
    assert result.stdout.startswith(f"healthy: http://{metrics}/healthz: 200")
    assert other.returncode == 1
