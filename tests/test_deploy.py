"""The deployment files hold what the README's "Deploying" section promises: the systemd unit passes
``systemd-analyze verify``, every Kubernetes manifest passes ``kubernetes-validate`` (custom
resources against their CRD's structure), the PrometheusRule is the alert rules file, and the
Dockerfile builds a non-root image from a pinned base without baking anything secret in.

``python -m tests.test_deploy`` regenerates deploy/k8s/prometheusrule.yaml from
deploy/prometheus/rotator-alerts.yml.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.support import ROTATOR, debian_tool, make_fleet

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "deploy" / "systemd" / "rotator.service"
SYSTEMD_POLICIES = ROOT / "deploy" / "systemd" / "rotation-policies.toml"
K8S = ROOT / "deploy" / "k8s"
ALERTS = ROOT / "deploy" / "prometheus" / "rotator-alerts.yml"
PROMETHEUS_RULE = K8S / "prometheusrule.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
INSTALLED_AT = "/opt/rotator/bin/rotator"
"""Where the unit (and the README) install the console script."""
CUSTOM_KINDS = {"Kustomization", "ServiceMonitor", "PrometheusRule"}
"""Kinds kubernetes-validate has no schema for; the tests check them otherwise."""


# -- systemd -----------------------------------------------------------------------------------


def _unit() -> dict[str, list[tuple[str, str]]]:
    """section -> [(key, value)] in file order (keys repeat in unit files)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
            continue
        key, _, value = line.partition("=")
        current.append((key, value))
    return sections


def _service(key: str) -> list[str]:
    return [v for k, v in _unit()["Service"] if k == key]


def _installed_unit(tmp_path: Path) -> Path:
    """The unit as installed next to this checkout's console script (verify checks that the
    ExecStart= binary exists and is executable)."""
    script = Path(sys.executable).with_name("rotator")
    if not script.exists():
        pytest.skip(f"no console script at {script}: pip install -e . first")
    unit = tmp_path / "rotator.service"
    unit.write_text(UNIT.read_text().replace(INSTALLED_AT, str(script)))
    return unit


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path):
    tool = debian_tool("systemd-analyze", "systemd")
    assert INSTALLED_AT in UNIT.read_text()
    result = subprocess.run([tool, "verify", str(_installed_unit(tmp_path))],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr  # verify's warnings go to stderr too


def test_systemd_unit_sandbox_scores_ok_in_systemd_analyze_security(tmp_path):
    tool = debian_tool("systemd-analyze", "systemd")
    result = subprocess.run([tool, "security", "--offline=yes", "--no-pager",
                             str(_installed_unit(tmp_path))],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    if "--offline" in result.stderr:
        pytest.skip("systemd-analyze security --offline needs systemd 250 or newer")
    match = re.search(r"Overall exposure level for rotator\.service: (\d+\.\d)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.0, result.stdout  # 0 = locked down, 10 = exposed


def test_systemd_unit_is_notify_type_sandboxed_with_its_own_user_and_credentials():
    service = dict(_unit()["Service"])
    assert service["Type"] == "notify" and service["NotifyAccess"] == "main"
    assert service["WatchdogSec"] and service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service.get("DynamicUser") == "yes" or service.get("User") not in (None, "root")
    assert service["StateDirectory"] == "rotator"
    assert service["RestartPreventExitStatus"] == "2"  # a bad policy file: restarting is futile
    expected = {
        "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
        "NoNewPrivileges": "yes", "PrivateDevices": "yes", "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes", "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes", "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "RestrictNamespaces": "yes", "LockPersonality": "yes", "MemoryDenyWriteExecute": "yes",
        "RestrictRealtime": "yes", "SystemCallArchitectures": "native",
        "SystemCallErrorNumber": "EPERM", "CapabilityBoundingSet": "", "UMask": "0077",
    }
    assert {k: service.get(k) for k in expected} == expected
    assert "@system-service" in _service("SystemCallFilter")
    assert not _service("Environment") or all(
        not re.search(r"TOKEN|SECRET|PASSWORD|KEY=", v) for v in _service("Environment"))


def test_systemd_policy_file_uses_the_units_state_directory_and_credential():
    result = subprocess.run([*ROTATOR, "check", "-c", str(SYSTEMD_POLICIES)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    doc = tomllib.loads(SYSTEMD_POLICIES.read_text())
    assert doc["rotator"]["state_url"] == "sqlite:////var/lib/rotator/state.db"
    loaded = {v.split(":", 1)[0] for v in _service("LoadCredential")}
    token_file = doc["vaults"]["main"]["token_file"]
    assert token_file.startswith("${CREDENTIALS_DIRECTORY}/")
    assert token_file.removeprefix("${CREDENTIALS_DIRECTORY}/") in loaded


@pytest.mark.slow
def test_token_file_under_credentials_directory_is_read_from_there(tmp_path, openbao,
                                                                   fake_openai):
    """What LoadCredential= gives the daemon: the token in $CREDENTIALS_DIRECTORY, named in the
    policy file as ${CREDENTIALS_DIRECTORY}/vault-token."""
    credentials = tmp_path / "credentials"
    credentials.mkdir(mode=0o700)
    (credentials / "vault-token").write_text(openbao.root_token + "\n")

    def token_file(doc: dict[str, Any]) -> None:
        doc["vaults"]["main"] = {"type": "vault", "url": openbao.url,
                                 "token_file": "${CREDENTIALS_DIRECTORY}/vault-token"}

    fleet = make_fleet(tmp_path, openbao, fake_openai, n=1, extra=token_file)
    env = {"CREDENTIALS_DIRECTORY": str(credentials), "VAULT_TOKEN": ""}
    check = fleet.cli("check", "--online", **env)
    assert check.returncode == 0, check.stdout + check.stderr
    rotated = fleet.cli("rotate-now", "--all", "--yes", **env)
    assert rotated.returncode == 0, rotated.stdout + rotated.stderr
    fleet.assert_settled()
    unset = fleet.cli("check", "--online", VAULT_TOKEN="")
    assert unset.returncode == 2 and "LoadCredential=" in unset.stdout + unset.stderr


# -- Kubernetes --------------------------------------------------------------------------------


def _manifests() -> list[Path]:
    return sorted(K8S.glob("*.yaml"))


def _resources() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in _manifests():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield path, doc


def _one(kind: str) -> dict[str, Any]:
    found = [doc for _, doc in _resources() if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


@pytest.mark.parametrize("version", ["1.30", "latest"])
def test_every_manifest_passes_kubernetes_validate(version):
    """``kubernetes-validate --strict`` (unknown fields are errors) on every file; it has no
    schema for custom resources and says so, which the next test makes up for."""
    args = [sys.executable, "-m", "kubernetes_validate", "--strict"]
    if version != "latest":
        args += ["-k", version]
    result = subprocess.run([*args, *map(str, _manifests())], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert not [line for line in lines if line.startswith(("ERROR", "FATAL"))], result.stdout
    unchecked = {m.group(1) for line in lines if line.startswith("WARN")
                 if (m := re.search(r"schema for kind (\w+)", line))}
    assert unchecked <= CUSTOM_KINDS, result.stdout
    passed = sum(1 for line in lines if line.startswith("INFO") and " passed " in line)
    assert passed == sum(1 for _, doc in _resources() if doc["kind"] not in CUSTOM_KINDS)


_DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?)$"}
_STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
_METADATA = {"type": "object", "required": ["name"],
             "properties": {"name": {"type": "string"}, "labels": _STRINGS,
                            "annotations": _STRINGS, "namespace": {"type": "string"}},
             "additionalProperties": False}
_CRD_SCHEMAS: dict[str, dict[str, Any]] = {
    # The fields these manifests use, as monitoring.coreos.com/v1's CRDs define them
    # (prometheus-operator example/prometheus-operator-crd); unknown fields are errors here,
    # where the API server would silently prune them.
    "ServiceMonitor": {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"type": "string"},
            "metadata": _METADATA,
            "spec": {"type": "object", "required": ["selector", "endpoints"],
                     "additionalProperties": False, "properties": {
                         "jobLabel": {"type": "string"},
                         "selector": {"type": "object", "additionalProperties": False,
                                      "properties": {"matchLabels": _STRINGS}},
                         "namespaceSelector": {"type": "object"},
                         "endpoints": {"type": "array", "minItems": 1, "items": {
                             "type": "object", "additionalProperties": False,
                             "properties": {"port": {"type": "string"},
                                            "path": {"type": "string"},
                                            "scheme": {"enum": ["http", "https"]},
                                            "interval": _DURATION,
                                            "scrapeTimeout": _DURATION}}}}}},
        "additionalProperties": False},
    "PrometheusRule": {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"type": "string"},
            "metadata": _METADATA,
            "spec": {"type": "object", "additionalProperties": False, "properties": {
                "groups": {"type": "array", "items": {
                    "type": "object", "required": ["name"], "additionalProperties": False,
                    "properties": {
                        "name": {"type": "string", "minLength": 1}, "interval": _DURATION,
                        "rules": {"type": "array", "items": {
                            "type": "object", "required": ["expr"],
                            "additionalProperties": False,
                            "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                            "properties": {"alert": {"type": "string"},
                                           "record": {"type": "string"},
                                           "expr": {"type": ["string", "integer"]},
                                           "for": _DURATION, "keep_firing_for": _DURATION,
                                           "labels": _STRINGS,
                                           "annotations": _STRINGS}}}}}}}}},
        "additionalProperties": False},
    "Kustomization": {
        "type": "object", "required": ["apiVersion", "kind", "resources"],
        "properties": {
            "apiVersion": {"const": "kustomize.config.k8s.io/v1beta1"},
            "kind": {"type": "string"}, "namespace": {"type": "string"},
            "resources": {"type": "array", "items": {"type": "string"}},
            "images": {"type": "array", "items": {
                "type": "object", "required": ["name"], "additionalProperties": False,
                "properties": {"name": {"type": "string"}, "newName": {"type": "string"},
                               "newTag": {"type": "string"}, "digest": {"type": "string"}}}}},
        "additionalProperties": False},
}


def test_custom_resources_match_their_crd_structure():
    seen = set()
    for path, doc in _resources():
        if doc["kind"] in CUSTOM_KINDS:
            seen.add(doc["kind"])
            errors = sorted(jsonschema.Draft202012Validator(_CRD_SCHEMAS[doc["kind"]])
                            .iter_errors(doc), key=str)
            assert not errors, f"{path.name}: " + "; ".join(
                f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors)
    assert seen == CUSTOM_KINDS


def render_prometheus_rule() -> str:
    """deploy/k8s/prometheusrule.yaml as generated from the alert rules file (comments and
    layout kept, so the two read alike)."""
    alerts = ALERTS.read_text()
    body = alerts[alerts.index("groups:"):]
    return (
        "# GENERATED from deploy/prometheus/rotator-alerts.yml: edit that file, then run\n"
        "#   python -m tests.test_deploy\n"
        "# (tests/test_deploy.py fails while the two differ). Add the labels your Prometheus "
        "selects\n"
        "# rules by (e.g. release: kube-prometheus-stack) in a kustomize patch if it needs "
        "them.\n"
        "apiVersion: monitoring.coreos.com/v1\nkind: PrometheusRule\nmetadata:\n"
        "  name: rotator\n  labels:\n    app.kubernetes.io/name: rotator\nspec:\n"
        + "".join(f"  {line}" if line.strip() else line for line in body.splitlines(True)))


def test_prometheus_rule_holds_exactly_the_alert_rules(tmp_path):
    rule = yaml.safe_load(PROMETHEUS_RULE.read_text())
    assert rule["spec"] == yaml.safe_load(ALERTS.read_text()), \
        "deploy/k8s/prometheusrule.yaml differs from the alert rules: python -m tests.test_deploy"
    assert PROMETHEUS_RULE.read_text() == render_prometheus_rule(), \
        "regenerate it: python -m tests.test_deploy"
    promtool = debian_tool("promtool")
    extracted = tmp_path / "rules.yml"
    extracted.write_text(yaml.safe_dump(rule["spec"]))
    checked = subprocess.run([promtool, "check", "rules", str(extracted)], capture_output=True,
                             text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_kustomization_applies_every_manifest_and_renders():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in _manifests()} - {"kustomization.yaml"}
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not found: its built-in kustomize renders deploy/k8s")
    rendered = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True,
                              timeout=60)
    assert rendered.returncode == 0, rendered.stderr
    from kubernetes_validate import utils

    docs = [d for d in yaml.safe_load_all(rendered.stdout) if d]
    assert len(docs) == len(listed)
    for doc in docs:
        if doc["kind"] not in CUSTOM_KINDS:
            utils.validate(doc, utils.latest_version(), strict=True)
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == kustomization["namespace"]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    image = kustomization["images"][0]
    for container in pod["containers"] + pod["initContainers"]:
        assert container["image"] == f"{image['newName']}:{image['newTag']}"


def _containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return pod["containers"] + pod.get("initContainers", [])


def test_deployment_is_non_root_read_only_and_probed_on_the_metrics_port():
    deployment = _one("Deployment")
    assert deployment["spec"]["replicas"] == 2
    template = deployment["spec"]["template"]
    pod = template["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == _dockerfile_uid()
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == _one("ServiceAccount")["metadata"]["name"]
    for container in _containers(pod):
        ctx = container["securityContext"]
        assert ctx["allowPrivilegeEscalation"] is False, container["name"]
        assert ctx["readOnlyRootFilesystem"] is True, container["name"]
        assert ctx["capabilities"] == {"drop": ["ALL"]}, container["name"]
        assert container["resources"]["requests"] and container["resources"]["limits"]
        assert "/tmp" in {m["mountPath"] for m in container["volumeMounts"]}
        for var in container["env"]:
            assert not re.search(r"TOKEN|SECRET|PASSWORD|KEY", var["name"]) or \
                "secretKeyRef" in var.get("valueFrom", {}), f"{var['name']} not from a Secret"
    (daemon,) = pod["containers"]
    assert daemon["args"] == ["run"]
    port = {p["name"]: p["containerPort"] for p in daemon["ports"]}["metrics"]
    assert daemon["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert daemon["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    policies = tomllib.loads(_configmap_policies())
    assert policies["rotator"]["metrics_address"] == f"0.0.0.0:{port}"

    labels = template["metadata"]["labels"]
    service = _one("Service")
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["metadata"]["name"] == "rotator"  # the alert rules' job="rotator"
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["metrics"]
    monitor = _one("ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= \
        service["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == [service["spec"]["ports"][0]
                                                                 ["name"]]
    pdb = _one("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def _configmap_policies() -> str:
    return _one("ConfigMap")["data"]["rotation-policies.toml"]


def test_configmap_policies_pass_rotator_check_and_fit_the_pod(tmp_path):
    policies_file = tmp_path / "rotation-policies.toml"
    policies_file.write_text(_configmap_policies())
    result = subprocess.run([*ROTATOR, "check", "-c", str(policies_file)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    doc = tomllib.loads(_configmap_policies())
    state_url = doc["rotator"]["state_url"]
    assert state_url.startswith("postgresql+psycopg://")
    assert not re.search(r"//[^/@]*:[^/@]*@", state_url), "no password in the ConfigMap"

    pod = _one("Deployment")["spec"]["template"]["spec"]
    (daemon,) = pod["containers"]
    env = {v["name"]: v for v in daemon["env"]}
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "rotator-state"
    mounts = {m["name"]: m["mountPath"] for m in daemon["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    config_dir, config_name = os.path.split(env["ROTATOR_CONFIG"]["value"])
    policies_volume = next(n for n, p in mounts.items() if p == config_dir)
    assert volumes[policies_volume]["configMap"]["name"] == _one("ConfigMap")["metadata"]["name"]
    assert config_name in _one("ConfigMap")["data"]

    kube = doc["vaults"]["main"]["kubernetes"]
    jwt_dir, jwt_name = os.path.split(kube["jwt_file"])
    token_volume = next(n for n, p in mounts.items() if p == jwt_dir)
    (source,) = volumes[token_volume]["projected"]["sources"]
    assert source["serviceAccountToken"]["path"] == jwt_name
    assert source["serviceAccountToken"]["audience"] == "vault"


def test_every_container_runs_a_real_rotator_command():
    """The manifests' args name commands this rotator has (``--help`` exits 0 for each)."""
    pod = _one("Deployment")["spec"]["template"]["spec"]
    for container in _containers(pod):
        result = subprocess.run([*ROTATOR, *container["args"], "--help"], capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0, f"{container['name']}: rotator " \
            f"{' '.join(container['args'])}: {result.stderr}"


# -- the container image -----------------------------------------------------------------------


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def _dockerfile_uid() -> int:
    users = [args for word, args in _instructions() if word == "USER"]
    return int(users[-1].split(":")[0])


def test_dockerfile_is_pinned_non_root_and_runs_rotator():
    instructions = _instructions()
    for word, args in instructions:
        if word == "FROM":
            image = args.split()[0]
            assert image.startswith("python:3.11"), image
            assert "@sha256:" in image or re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", image), \
                f"base image {image} is not pinned to an exact release or digest"
    final_stage = instructions[max(i for i, (w, _) in enumerate(instructions) if w == "FROM"):]
    users = [args for word, args in final_stage if word == "USER"]
    assert users and re.fullmatch(r"\d+(:\d+)?", users[-1]), "USER must be numeric (runAsNonRoot)"
    assert _dockerfile_uid() != 0
    assert ("ENTRYPOINT", '["rotator"]') in final_stage and ("CMD", '["run"]') in final_stage
    text = DOCKERFILE.read_text()
    assert "[dev]" not in text and "pip install -e" not in text
    for word, args in instructions:
        if word in ("ENV", "ARG"):
            assert not re.search(r"(TOKEN|SECRET|PASSWORD|_KEY)\w*=", args), args
        if word in ("COPY", "ADD"):
            assert not re.search(r"\.toml\b(?<!pyproject\.toml)|\.db\b|tests|\.env", args), args


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matching a directory matches
    everything under it; ``!`` re-includes."""
    ignored = False
    parts = path.split("/")
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        regex = (re.escape(pattern).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
                 .replace(r"\*", "[^/]*").replace(r"\?", "[^/]"))
        if any(re.fullmatch(regex, "/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            ignored = not negate
    return ignored


def _build_context() -> list[str]:
    """The files ``docker build .`` would send, walking the checkout as Docker does (a
    top-level entry no ``!`` pattern re-includes is skipped whole, like .venv and .git)."""
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    reincluded = {p.lstrip("!").split("/")[0] for p in patterns if p.startswith("!")}
    found = []
    for top in ROOT.iterdir():
        if _dockerignored(top.name, patterns) and top.name not in reincluded:
            continue
        paths = [top] if top.is_file() else [p for p in top.rglob("*") if p.is_file()]
        found += [str(p.relative_to(ROOT)) for p in paths]
    return sorted(p for p in found if not _dockerignored(p, patterns))


def test_the_build_context_is_only_the_package_sources():
    context = _build_context()
    assert "pyproject.toml" in context and "rotator/cli.py" in context
    assert "providers/openai_api_key.py" in context
    strays = [p for p in context
              if not (p in ("pyproject.toml", "README.md") or p.startswith(("rotator/",
                                                                            "providers/")))]
    assert strays == []
    assert not [p for p in context if p.endswith((".db", ".pyc")) or "__pycache__" in p]
    for word, args in _instructions():
        if word == "COPY" and "--from" not in args:
            *sources, _ = args.split()
            for source in sources:
                assert any(p == source or p.startswith(source.rstrip("/") + "/")
                           for p in context), f"COPY {source}: not in the build context"


@pytest.mark.slow
def test_the_build_context_builds_a_wheel_with_migrations_and_providers(tmp_path):
    """What the image's ``pip install /src`` gets: a wheel with the console script, the
    migrations and every built-in provider (built offline, without the image)."""
    context = tmp_path / "src"
    for name in _build_context():
        target = context / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                            "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"),
                            str(context)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = (tmp_path / "dist").glob("rotator-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("rotator/state/migrations/versions/") for n in names)
    assert "providers/openai_api_key.py" in names and "rotator/systemd.py" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "rotator = rotator.cli:console_main" in zipfile.ZipFile(wheel).read(
        entry_points).decode()


# -- the docs ----------------------------------------------------------------------------------


def test_deploy_section_names_only_files_that_exist():
    readme = (ROOT / "README.md").read_text()
    doc = readme[readme.index("## Deploying"):readme.index("## Runbook")]
    named = set(re.findall(r"(?<![\w/.-])((?:deploy|docs)/[\w./-]+\.\w+|Dockerfile)\b", doc))
    assert {"deploy/systemd/rotator.service", "deploy/vault/rotator-policy.hcl",
            "Dockerfile", "deploy/k8s/configmap.yaml"} <= named
    missing = sorted(n for n in named if not (ROOT / n).exists())
    assert missing == []


if __name__ == "__main__":
    PROMETHEUS_RULE.write_text(render_prometheus_rule())
    print(f"wrote {PROMETHEUS_RULE.relative_to(ROOT)}")
