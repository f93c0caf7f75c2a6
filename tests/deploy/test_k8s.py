"""deploy/k8s/, without a cluster: every object valid against the official Kubernetes JSON
schemas (strict: unknown fields are errors) bundled by kubernetes-validate, and the objects
consistent with each other, with the image and with the relay's settings and CLI.
"""

from __future__ import annotations

import copy
import importlib.util
import subprocess
import sys
import urllib.parse
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from relay.admin import command_events, mandrill
from relay.admin.usage_links import usage_link
from relay.config.parsers import SettingsError
from relay.identity.signed_links import LinkSigner
from relay.observe.supervisor_metrics import READY_TIMEOUT
from relay.smtp.unsubscribe import UnsubscribeLinks
from tests.conftest import REPO
from tests.deploy.deploykit import (
    DEPLOY,
    SECRET_STAND_INS,
    assert_cli_command,
    port_of,
    project_version,
    setting_value,
    settings_for,
    unknown_names,
)
from tests.deploy.dockerfile import image_environment, image_user, pinned_image_problems

K8S = DEPLOY / "k8s"
# The oldest Kubernetes the manifests are meant for, and the newest schema bundled.
VERSIONS = ["1.29", kubernetes_validate.latest_version()]
def manifests() -> dict[str, list[dict[str, Any]]]:
    """Every object of every manifest, by path under k8s/ (the kustomization excluded)."""
    found = {}
    for path in sorted([*K8S.glob("*.yaml"), *K8S.glob("examples/*.yaml")]):
        if path.name == "kustomization.yaml":
            continue
        found[str(path.relative_to(K8S))] = [
            d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
    return found


def objects() -> list[dict[str, Any]]:
    return [o for docs in manifests().values() for o in docs]


def one(kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, (kind, name)
    return matches[0]


RELAY = "command-relay"
NOTIFIER = "command-relay-notifier"
PUBLIC = "command-relay-public"


def container(deployment: str) -> dict[str, Any]:
    containers = one("Deployment", deployment)["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def pod_environment(deployment: str, *, stand_ins: bool = True) -> dict[str, str]:
    """What the process in the Deployment's container sees: the image's RELAY_* variables,
    then the envFrom ConfigMaps and Secrets in order, then env."""
    spec = container(deployment)
    env = dict(image_environment())
    for source in spec.get("envFrom", []):
        if "configMapRef" in source:
            env.update(one("ConfigMap", source["configMapRef"]["name"])["data"])
        else:
            secret = one("Secret", source["secretRef"]["name"])["stringData"]
            env.update({k: SECRET_STAND_INS[k] if stand_ins else v for k, v in secret.items()})
    env.update({e["name"]: e["value"] for e in spec.get("env", [])})
    return env


def _validate(document: dict[str, Any], version: str) -> None:
    kubernetes_validate.validate(document, version, strict=True)


# -- schemas ---------------------------------------------------------------------------------
@pytest.mark.parametrize("version", VERSIONS)
def test_k8s_manifests_match_the_kubernetes_schemas(version: str):
    """Every object validates, strictly, against the Kubernetes API schema."""
    found = objects()
    assert {o["kind"] for o in found} == {
        "Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler",
        "ConfigMap", "Secret", "ServiceAccount", "Ingress"}
    for document in found:
        _validate(document, version)


def test_k8s_schema_check_can_fail():
    """A misspelt field and a wrong type are refused by the same check."""
    deployment = copy.deepcopy(one("Deployment", RELAY))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(deployment, VERSIONS[0])
    hpa = copy.deepcopy(one("HorizontalPodAutoscaler", RELAY))
    hpa["spec"]["minReplicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(hpa, VERSIONS[0])


def test_k8s_kustomization_lists_every_manifest():
    """`kubectl apply -k` applies the same files as `kubectl apply -f deploy/k8s/` (which
    does not descend into examples/), and neither applies a Secret."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    assert kustomization["kind"] == "Kustomization"
    top_level = sorted(name for name in manifests() if "/" not in name)
    assert sorted(kustomization["resources"]) == top_level
    applied = [o["kind"] for name in top_level for o in manifests()[name]]
    assert "Secret" not in applied
    assert [o["kind"] for o in manifests()["examples/secret.yaml"]] == ["Secret"]
    assert [o["kind"] for o in manifests()["examples/ingress.yaml"]] == ["Ingress"]


# -- the policies ConfigMap ------------------------------------------------------------------
def test_k8s_policies_configmap_is_the_repository_policies():
    """The ConfigMap holds policies/*.toml byte for byte, one key per file."""
    data = one("ConfigMap", "command-relay-policies")["data"]
    files = {p.name: p.read_text(encoding="utf-8") for p in (REPO / "policies").glob("*.toml")}
    assert set(data) == set(files) == {"plans.toml", "routing.toml", "notifications.toml"}
    for name, text in files.items():
        assert data[name] == text, f"{name} differs: run deploy/k8s/gen_policies_configmap.py"


def test_k8s_policies_configmap_is_generated_by_the_script():
    """The committed file is exactly what the documented script writes (--check)."""
    script = K8S / "gen_policies_configmap.py"
    result = subprocess.run([sys.executable, str(script), "--check"], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_k8s_policies_generator_notices_a_change(tmp_path: Path):
    """The generator reproduces any policy text exactly, and a changed file changes it."""
    spec = importlib.util.spec_from_file_location("gen_policies_configmap",
                                                  K8S / "gen_policies_configmap.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    texts = {"a.toml": "# x\n\nkey = 1\n", "b.toml": "  indented = true\n\n\n",
             "c.toml": "no_newline = 'x'", "d.toml": "v = '''\n\tindented\n'''\n"}
    for name, text in texts.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    rendered = module.render(tmp_path)
    assert yaml.safe_load(rendered)["data"] == texts
    assert module.render(REPO / "policies") == (K8S / "policies-configmap.yaml").read_text(
        encoding="utf-8")
    (tmp_path / "a.toml").write_text("# y\n", encoding="utf-8")
    assert module.render(tmp_path) != rendered


@pytest.mark.parametrize("deployment", [RELAY, NOTIFIER])
def test_k8s_policies_are_mounted_where_the_relay_reads_them(deployment: str):
    """Both Deployments mount the policies ConfigMap, whole (so edits propagate), read-only,
    at RELAY_POLICIES_DIR."""
    spec = one("Deployment", deployment)["spec"]["template"]["spec"]
    volume = next(v for v in spec["volumes"] if "configMap" in v)
    assert volume["configMap"]["name"] == "command-relay-policies"
    mount = next(m for m in container(deployment)["volumeMounts"]
                 if m["name"] == volume["name"])
    assert mount["mountPath"] == pod_environment(deployment)["RELAY_POLICIES_DIR"]
    assert mount.get("readOnly") is True and "subPath" not in mount


# -- settings and CLI ------------------------------------------------------------------------
@pytest.mark.parametrize("deployment", [RELAY, NOTIFIER])
def test_k8s_environment_is_valid_settings(deployment: str):
    """A pod's environment (image, ConfigMap, Secret with real-looking values, env) names
    only settings and loads."""
    env = pod_environment(deployment)
    assert unknown_names(env) == set()
    settings = settings_for(env)
    assert settings.redis_url is not None and settings.upstream is not None
    assert settings.credentials_key is not None


def test_k8s_secret_holds_only_placeholders():
    """The Secret ships no credential: every value is a REPLACE-ME placeholder, every key a
    setting, and the stand-ins above cover exactly its keys."""
    secret = one("Secret", "command-relay-secrets")
    assert "data" not in secret
    values = secret["stringData"]
    assert set(values) == set(SECRET_STAND_INS)
    assert unknown_names(values) == set()
    for key, value in values.items():
        assert "REPLACE-ME" in value, key


def test_k8s_secret_placeholders_are_refused_or_unusable():
    """A pod started with the placeholders as they are does not run on them: the keys and
    tokens fail validation at start-up."""
    with pytest.raises(SettingsError, match=r"credentials_key|admin_token|webhook_secret"):
        settings_for(pod_environment(RELAY, stand_ins=False))


@pytest.mark.parametrize(("deployment", "command"), [(RELAY, "serve"), (NOTIFIER, "notifier")])
def test_k8s_containers_run_real_cli_commands(deployment: str, command: str):
    """Each container's args are a command of `command-relay` (the image's ENTRYPOINT)."""
    args = container(deployment)["args"]
    assert args == [command]
    assert_cli_command(args)


@pytest.mark.parametrize("deployment", [RELAY, NOTIFIER])
def test_k8s_images_are_pinned_to_the_project_version(deployment: str):
    """The image is tagged with the project's version, never `latest`."""
    image = container(deployment)["image"]
    assert pinned_image_problems([image]) == []
    assert image == f"command-relay:{project_version()}"


def test_k8s_relay_sets_the_agreed_scale_out_settings():
    """The relay pod listens on all interfaces, runs one worker (the pod's CPU, not the
    node's) and drains for RELAY_DRAIN_TIMEOUT."""
    env = pod_environment(RELAY)
    assert env["RELAY_WORKERS"] == "1"
    assert setting_value(env, "RELAY_METRICS_LISTEN").startswith("0.0.0.0:")
    assert float(env["RELAY_DRAIN_TIMEOUT"]) > 0
    settings = settings_for(env)
    assert str(settings.listen) == "0.0.0.0:587"
    assert settings.tls_cert is not None and settings.tls_key is not None


# -- probes, ports, lifecycle ----------------------------------------------------------------
def _named_ports(deployment: str) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container(deployment)["ports"]}


def test_k8s_container_ports_are_the_listen_ports():
    """Each named container port is the port of the matching listener setting."""
    env = pod_environment(RELAY)
    assert _named_ports(RELAY) == {
        "smtp": port_of(setting_value(env, "RELAY_LISTEN")),
        "smtps": port_of(setting_value(env, "RELAY_SMTPS_LISTEN")),
        "metrics": port_of(setting_value(env, "RELAY_METRICS_LISTEN")),
        "admin": port_of(setting_value(env, "RELAY_ADMIN_LISTEN")),
        "public": port_of(setting_value(env, "RELAY_PUBLIC_LISTEN")),
    }


def test_k8s_relay_serves_its_public_listener_for_the_ingress():
    """The public HTTP listener listens on every interface of the pod (its default, loopback,
    is unreachable from the Ingress controller), and the links it answers are under an https
    RELAY_PUBLIC_URL (RFC 8058 one-click needs an https URI)."""
    env = pod_environment(RELAY)
    settings = settings_for(env)
    assert settings.public_listen is not None and settings.public_listen.host == "0.0.0.0"
    assert settings.public_url.startswith("https://")
    assert settings.link_secret is not None  # one key for every replica the Ingress picks


@pytest.mark.parametrize("deployment", [RELAY, NOTIFIER])
def test_k8s_probes_use_the_health_endpoints(deployment: str):
    """Liveness (and start-up) GET /healthz, readiness GET /readyz, on the metrics port (the
    relay's and the notifier's own)."""
    main = container(deployment)
    for probe, path in (("livenessProbe", "/healthz"), ("startupProbe", "/healthz"),
                        ("readinessProbe", "/readyz")):
        get = main[probe]["httpGet"]
        assert (get["path"], get["port"]) == (path, "metrics"), probe
    assert "metrics" in _named_ports(deployment)


def test_k8s_notifier_serves_its_metrics_port_on_every_interface():
    """The notifier's named port is its metrics listener's, which listens on all interfaces
    so that the kubelet and Prometheus reach it."""
    env = pod_environment(NOTIFIER)
    listen = setting_value(env, "RELAY_NOTIFIER_METRICS_LISTEN")
    assert listen.startswith("0.0.0.0:")
    assert _named_ports(NOTIFIER) == {"metrics": port_of(listen)}
    assert settings_for(env).notifier_metrics_listen is not None


def test_k8s_readiness_probe_outlasts_the_supervisors_questions():
    """With RELAY_WORKERS above 1, the supervisor's /readyz asks each worker for up to
    READY_TIMEOUT seconds: the probe waits longer than that before calling it failed."""
    assert container(RELAY)["readinessProbe"]["timeoutSeconds"] > READY_TIMEOUT


def test_k8s_grace_period_outlasts_prestop_and_drain():
    """SIGKILL comes only after the preStop sleep and the whole drain."""
    spec = one("Deployment", RELAY)["spec"]["template"]["spec"]
    command = container(RELAY)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    drain = float(setting_value(pod_environment(RELAY), "RELAY_DRAIN_TIMEOUT"))
    assert spec["terminationGracePeriodSeconds"] > float(command[1]) + drain


@pytest.mark.parametrize("deployment", [RELAY, NOTIFIER])
def test_k8s_pods_are_locked_down(deployment: str):
    """Non-root (the image's uid), no privilege escalation, no capabilities, read-only root
    with writable emptyDirs for the state folder and /tmp, no API token."""
    spec = one("Deployment", deployment)["spec"]["template"]["spec"]
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert f"{pod['runAsUser']}:{pod['runAsGroup']}" == image_user()
    assert pod["seccompProfile"]["type"] == "RuntimeDefault"
    assert spec["automountServiceAccountToken"] is False
    one("ServiceAccount", spec["serviceAccountName"])
    main = container(deployment)
    security = main["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    empty = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
    writable = {m["mountPath"] for m in main["volumeMounts"] if m["name"] in empty}
    assert writable == {pod_environment(deployment)["RELAY_STATE_DIR"], "/tmp"}
    assert {"cpu", "memory"} <= set(main["resources"]["requests"])
    assert {"cpu", "memory"} <= set(main["resources"]["limits"])


def test_k8s_relay_may_bind_the_smtp_ports_unprivileged():
    """Ports below 1024 as a non-root user: the pod sets ip_unprivileged_port_start."""
    sysctls = one("Deployment", RELAY)["spec"]["template"]["spec"]["securityContext"]["sysctls"]
    start = int(next(s["value"] for s in sysctls
                     if s["name"] == "net.ipv4.ip_unprivileged_port_start"))
    assert start <= min(_named_ports(RELAY).values())


def test_k8s_relay_mounts_its_tls_certificate():
    """RELAY_TLS_CERT and RELAY_TLS_KEY are files of the mounted kubernetes.io/tls Secret."""
    env = pod_environment(RELAY)
    spec = one("Deployment", RELAY)["spec"]["template"]["spec"]
    volume = next(v for v in spec["volumes"] if "secret" in v)
    mount = next(m for m in container(RELAY)["volumeMounts"] if m["name"] == volume["name"])
    assert env["RELAY_TLS_CERT"] == f"{mount['mountPath']}/tls.crt"
    assert env["RELAY_TLS_KEY"] == f"{mount['mountPath']}/tls.key"


# -- Services, PDB, HPA ----------------------------------------------------------------------
def _pod_labels(deployment: str) -> dict[str, str]:
    labels = one("Deployment", deployment)["spec"]["template"]["metadata"]["labels"]
    selector = one("Deployment", deployment)["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    return dict(labels)


def test_k8s_services_select_the_relay_and_expose_smtp_and_metrics():
    """The SMTP Service has 587 and 465, the public one (the Ingress's backend) the public
    HTTP listener, the internal one metrics and admin; each targets a named container port of
    the relay pods, whose labels it selects (not the notifier's)."""
    services = [o for o in objects() if o["kind"] == "Service"]
    relay_labels, notifier_labels = _pod_labels(RELAY), _pod_labels(NOTIFIER)
    named = _named_ports(RELAY)
    exposed = {}
    for service in services:
        selector = service["spec"]["selector"]
        assert selector.items() <= relay_labels.items()
        assert not selector.items() <= notifier_labels.items()
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in named and port.get("protocol", "TCP") == "TCP"
            exposed[port["port"]] = service["metadata"]["name"]
    assert exposed == {587: RELAY, 465: RELAY, 8026: PUBLIC, 9465: "command-relay-internal",
                       8025: "command-relay-internal"}
    # Plain HTTP: only through the Ingress's TLS, never a balancer of its own.
    assert one("Service", PUBLIC)["spec"]["type"] == "ClusterIP"


# -- the example Ingress ---------------------------------------------------------------------
def _prefix_matches(prefix: str, path: str) -> bool:
    """Kubernetes' pathType Prefix: the prefix's "/"-separated elements begin the path's."""
    wanted = [e for e in prefix.split("/") if e]
    return [e for e in path.split("/") if e][:len(wanted)] == wanted


def _ingress_backend(host: str, path: str) -> tuple[str, str] | None:
    """(Service, port name) the example Ingress sends ``host`` + ``path`` to, if any: the
    longest matching Prefix path of the host's rule, as controllers choose."""
    rules = [r for r in one("Ingress", PUBLIC)["spec"]["rules"] if r["host"] == host]
    paths = [p for r in rules for p in r["http"]["paths"]
             if p["pathType"] == "Prefix" and _prefix_matches(p["path"], path)]
    if not paths:
        return None
    service = max(paths, key=lambda p: len(p["path"]))["backend"]["service"]
    return service["name"], service["port"]["name"]


def test_k8s_prefix_matcher_follows_kubernetes_rules():
    """The matcher above: whole path elements, a trailing slash ignored, "/" matches all."""
    assert _prefix_matches("/usage", "/usage/abc.def")
    assert _prefix_matches("/usage/", "/usage")
    assert not _prefix_matches("/usage", "/usages/x")
    assert _prefix_matches("/", "/metrics")


def test_k8s_ingress_routes_the_relays_links_to_the_public_listener():
    """The links the relay hands out, made by its own code from the pod's RELAY_PUBLIC_URL,
    and the provider webhooks' paths reach the public Service's port, which targets the
    relay's public listener; the host has TLS. Nothing else is routed: not the admin API,
    not the metrics."""
    settings = settings_for(pod_environment(RELAY))
    host = urllib.parse.urlsplit(settings.public_url).hostname
    assert host is not None
    ingress = one("Ingress", PUBLIC)
    assert any(host in t["hosts"] and t["secretName"] for t in ingress["spec"]["tls"])
    secret = b"a-link-signing-secret-of-some-length"
    links = [UnsubscribeLinks(settings.public_url, lambda: secret).url(
                 "agent@kw.example", "client@example.com"),
             usage_link(LinkSigner(secret), settings.public_url, "agent@kw.example")]
    paths = [urllib.parse.urlsplit(link).path for link in links]
    paths += [mandrill.PATH, command_events.PATH]
    ports = {p["name"]: p["targetPort"] for p in one("Service", PUBLIC)["spec"]["ports"]}
    for path in paths:
        backend = _ingress_backend(host, path)
        assert backend is not None and backend[0] == PUBLIC, path
        assert ports[backend[1]] == "public", path
    for path in ("/", "/v1/users", "/metrics", "/readyz", "/healthz"):
        assert _ingress_backend(host, path) is None, path


def test_k8s_ingress_lets_a_whole_webhook_batch_through():
    """ingress-nginx's body limit (1 MiB by default) is raised to what the Mandrill webhook
    accepts, so a large batch reaches the relay rather than a 413 from the proxy."""
    size = one("Ingress", PUBLIC)["metadata"]["annotations"][
        "nginx.ingress.kubernetes.io/proxy-body-size"]
    number, unit = int(size[:-1]), size[-1].lower()
    assert number * {"k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}[unit] >= mandrill.MAX_BODY


def test_k8s_disruption_budget_covers_the_relay():
    """The PodDisruptionBudget selects the relay pods and lets one go at a time."""
    pdb = one("PodDisruptionBudget", RELAY)
    assert pdb["spec"]["selector"]["matchLabels"].items() <= _pod_labels(RELAY).items()
    assert pdb["spec"]["maxUnavailable"] == 1


def test_k8s_autoscaler_scales_the_relay_on_cpu():
    """autoscaling/v2 on CPU utilisation of the relay Deployment, which requests CPU (the
    target is a share of it) and leaves the replica count to the autoscaler."""
    hpa = one("HorizontalPodAutoscaler", RELAY)
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", RELAY)
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert hpa["spec"]["minReplicas"] >= 2
    assert "replicas" not in one("Deployment", RELAY)["spec"]
    assert "cpu" in container(RELAY)["resources"]["requests"]
    # The PDB leaves at least one relay while the autoscaler's minimum is up.
    assert hpa["spec"]["minReplicas"] > one("PodDisruptionBudget", RELAY)["spec"][
        "maxUnavailable"]

