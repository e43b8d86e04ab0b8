"""The Helm chart, rendered and linted by the Helm library for every supported values shape and checked as a
platform team would: valid Kubernetes objects, hardened pods, stable selectors, the controller's exact RBAC,
the operator's flags, and bad values refused at render time naming the value."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from controller.crd import crd_manifest
from controller.spec import load_training_run
from controller.sweep.crd import crd_manifest as sweep_crd_manifest
from controller.sweep.spec import parse_training_sweep

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "relay"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
ALL_EXAMPLES = sorted(p for p in (REPO / "manifests" / "examples").glob("*.yaml"))
EXAMPLES = [p for p in ALL_EXAMPLES if "kind: TrainingSweep" not in p.read_text(encoding="utf-8")]
SWEEP_EXAMPLES = [p for p in ALL_EXAMPLES if p not in EXAMPLES]
KUBE_VERSION = "1.30.0"
RELEASE, NAMESPACE = "relay", "ml"
# Custom resources of add-ons; kubernetes-validate ships only the built-in kinds.
ADD_ON_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}


@pytest.fixture(scope="module")
def chart() -> Any:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render(chart: Any, values: dict[str, Any], release: str = RELEASE) -> tuple[list[dict[str, Any]], str]:
    """The chart's objects (in template order) and its NOTES, as `helm install` would create them."""
    manifests = chart.render(values, name=release, namespace=NAMESPACE, is_install=True)
    notes = manifests.pop(f"{CHART.name}/templates/NOTES.txt", "")
    objects = [doc for _, text in sorted(manifests.items()) for doc in yaml.safe_load_all(text) if doc]
    return objects, notes


def ci_values(path: Path) -> dict[str, Any]:
    loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict), f"{path.name}: not a mapping"
    return loaded


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in by_kind(objects, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def controller_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    deployment = one(objects, "Deployment", RELEASE)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def flags(container: dict[str, Any]) -> dict[str, list[str]]:
    """`--name value` arguments of the controller command, by name (a flag may repeat; "" for a bare flag)."""
    command = container["command"]
    assert command[:2] == ["relay", "controller"]
    parsed: dict[str, list[str]] = {}
    arguments = command[2:]
    for index, argument in enumerate(arguments):
        if argument.startswith("--"):
            following = arguments[index + 1] if index + 1 < len(arguments) else "--"
            parsed.setdefault(argument, []).append("" if following.startswith("--") else following)
        else:
            assert index > 0 and arguments[index - 1].startswith("--"), f"stray argument {argument!r}"
    return parsed


def rule_set(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in rules
        for group in rule.get("apiGroups", [])
        for resource in rule.get("resources", [])
        for verb in rule.get("verbs", [])
    }


SHAPES = pytest.mark.parametrize("values_file", CI_VALUES, ids=[p.name.removesuffix("-values.yaml") for p in CI_VALUES])


def test_every_supported_shape_has_a_ci_values_file() -> None:
    assert {p.name for p in CI_VALUES} == {
        "embedded-temporal-values.yaml",
        "external-temporal-tls-values.yaml",
        "existing-claim-values.yaml",
        "cluster-wide-values.yaml",
    }


@SHAPES
def test_strict_lint_finds_nothing(values_file: Path) -> None:
    report = helm.lint(CHART, ci_values(values_file), strict=True, namespace=NAMESPACE, kube_version="v1.30.0")
    assert report["errors"] == []
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == []


@SHAPES
def test_every_rendered_object_is_valid_kubernetes(chart: Any, values_file: Path) -> None:
    objects, _ = render(chart, ci_values(values_file))
    assert objects
    for obj in objects:
        if (obj["apiVersion"], obj["kind"]) in ADD_ON_KINDS:
            continue  # checked field by field in test_service_monitor_scrapes_the_metrics_port
        try:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        except jsonschema.ValidationError as exc:  # kubernetes_validate's own error subclasses it
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} ({values_file.name}): {path}: {exc.message}")
        assert len(obj["metadata"]["name"]) <= 63


@SHAPES
def test_every_pod_is_non_root_with_a_read_only_root_and_no_capabilities(chart: Any, values_file: Path) -> None:
    objects, _ = render(chart, ci_values(values_file))
    deployments = by_kind(objects, "Deployment")
    assert deployments
    for deployment in deployments:
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] > 0
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["readOnlyRootFilesystem"] is True
            assert context["capabilities"]["drop"] == ["ALL"]
            assert not context.get("privileged", False)
            mounts = {m["mountPath"] for m in container["volumeMounts"]}
            assert "/tmp" in mounts, "a read-only root needs a writable /tmp"
            assert "resources" not in container or values_file.name.startswith("external"), "resources unset"


def test_the_controller_runs_as_the_trainer_pods_user_so_both_can_write_the_volume(chart: Any) -> None:
    from controller.kubernetes.jobs import NON_ROOT_UID

    objects, _ = render(chart, ci_values(CHART / "ci" / "embedded-temporal-values.yaml"))
    pod = one(objects, "Deployment", RELEASE)["spec"]["template"]["spec"]
    context = pod["securityContext"]
    assert context["runAsUser"] == context["runAsGroup"] == context["fsGroup"] == NON_ROOT_UID


@SHAPES
def test_labels_and_selectors_are_stable_and_match(chart: Any, values_file: Path) -> None:
    objects, _ = render(chart, ci_values(values_file))
    for obj in objects:
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "relay"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["helm.sh/chart"] == "relay-0.1.0"
    pod_labels = {
        d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in by_kind(objects, "Deployment")
    }
    selectors: list[dict[str, str]] = []
    for deployment in by_kind(objects, "Deployment"):
        match = deployment["spec"]["selector"]["matchLabels"]
        assert match.items() <= pod_labels[deployment["metadata"]["name"]].items()
        selectors.append(match)
    for service in by_kind(objects, "Service"):
        selector = service["spec"]["selector"]
        matched = [name for name, labels in pod_labels.items() if selector.items() <= labels.items()]
        assert len(matched) == 1, f"Service {service['metadata']['name']} selects {matched}"
        selectors.append(selector)
    for budget in by_kind(objects, "PodDisruptionBudget"):
        selectors.append(budget["spec"]["selector"]["matchLabels"])
    for selector in selectors:
        assert "helm.sh/chart" not in selector
        assert "app.kubernetes.io/version" not in selector
        assert selector["app.kubernetes.io/instance"] == RELEASE


def test_selectors_do_not_change_when_the_chart_is_upgraded(chart: Any) -> None:
    """A Deployment's selector is immutable: a new chart or app version must not touch it."""
    values = ci_values(CHART / "ci" / "embedded-temporal-values.yaml")
    before, _ = render(chart, values)
    after, _ = render(chart, values | {"image": {"repository": "r/c", "tag": "9.9.9", "pullPolicy": "Always"}})
    assert [d["spec"]["selector"] for d in by_kind(before, "Deployment")] == [
        d["spec"]["selector"] for d in by_kind(after, "Deployment")
    ]


@SHAPES
def test_probes_use_the_health_endpoints_and_the_controller_flags(chart: Any, values_file: Path) -> None:
    objects, _ = render(chart, ci_values(values_file))
    container = controller_container(objects)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http-metrics": 9090, "http-health": 8081}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http-health"}
    assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http-health"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http-health"}
    parsed = flags(container)
    assert parsed["--metrics-port"] == ["9090"]
    assert parsed["--health-port"] == ["8081"]
    assert parsed["--volume-root"] == ["/relay-volume"]
    env = {e["name"]: e for e in container["env"]}
    assert env["RELAY_POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/relay-volume")
    pod = one(objects, "Deployment", RELEASE)["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    claim = ci_values(values_file).get("persistence", {}).get("existingClaim") or "relay-shared"
    assert volume["persistentVolumeClaim"]["claimName"] == claim


def test_the_controller_accepts_the_deployment_command(chart: Any) -> None:
    """The flags the chart passes are the ones `relay controller` parses, for every shape."""
    from controller.kubernetes.main import build_parser

    parser = build_parser()
    for values_file in CI_VALUES:
        objects, _ = render(chart, ci_values(values_file))
        parser.parse_args(controller_container(objects)["command"][2:])


def test_embedded_temporal_is_a_dev_server_the_controller_points_at(chart: Any) -> None:
    objects, notes = render(chart, ci_values(CHART / "ci" / "embedded-temporal-values.yaml"))
    server = one(objects, "Deployment", f"{RELEASE}-temporal")
    (container,) = server["spec"]["template"]["spec"]["containers"]
    assert container["args"][:2] == ["server", "start-dev"]
    assert "--ip=0.0.0.0" in container["args"]
    assert server["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    service = one(objects, "Service", f"{RELEASE}-temporal")
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"grpc": 7233, "http-ui": 8233}
    assert flags(controller_container(objects))["--temporal-address"] == [f"{RELEASE}-temporal:7233"]
    budget = one(objects, "PodDisruptionBudget", f"{RELEASE}-temporal")
    assert budget["apiVersion"] == "policy/v1"
    assert budget["spec"]["maxUnavailable"] == 0
    assert "keeps NO durable history" in notes
    assert "kubectl -n ml port-forward svc/relay-temporal 7233:7233 8233:8233" in notes
    assert "temporal workflow query --address localhost:7233 --namespace default" in notes
    assert "--workflow-id trainingrun-ml.tiny-cpu --name get_status" in notes
    assert "kubectl -n ml get trainingruns" in notes
    assert "http://localhost:8233/namespaces/default/workflows" in notes


def test_external_temporal_with_tls_reads_address_and_certificates_from_secrets(chart: Any) -> None:
    objects, notes = render(chart, ci_values(CHART / "ci" / "external-temporal-tls-values.yaml"))
    assert not [d for d in by_kind(objects, "Deployment") if d["metadata"]["name"].endswith("-temporal")]
    container = controller_container(objects)
    parsed = flags(container)
    assert "--temporal-address" not in parsed
    assert parsed["--temporal-namespace"] == ["ml-training"]
    assert parsed["--temporal-tls-cert"] == ["/etc/relay/temporal-tls/tls.crt"]
    assert parsed["--temporal-tls-key"] == ["/etc/relay/temporal-tls/tls.key"]
    assert parsed["--temporal-tls-ca"] == ["/etc/relay/temporal-tls/ca.crt"]
    env = {e["name"]: e for e in container["env"]}
    assert env["RELAY_TEMPORAL_ADDRESS"]["valueFrom"] == {
        "secretKeyRef": {"name": "temporal-endpoint", "key": "address"}
    }
    pod = one(objects, "Deployment", RELEASE)["spec"]["template"]["spec"]
    tls_volume = next(v for v in pod["volumes"] if v["name"] == "temporal-tls")
    assert tls_volume["secret"]["secretName"] == "temporal-client-tls"
    mount = next(m for m in container["volumeMounts"] if m["name"] == "temporal-tls")
    assert (mount["mountPath"], mount["readOnly"]) == ("/etc/relay/temporal-tls", True)
    assert container["resources"]["requests"] == {"cpu": "100m", "memory": "256Mi"}
    assert "NO durable history" not in notes


def test_service_monitor_scrapes_the_metrics_port(chart: Any) -> None:
    objects, _ = render(chart, ci_values(CHART / "ci" / "external-temporal-tls-values.yaml"))
    monitor = one(objects, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint == {
        "port": "http-metrics",
        "path": "/metrics",
        "interval": "30s",
        "scrapeTimeout": "10s",
        "honorLabels": True,  # the runs' own `namespace` label stays `namespace` (the dashboard filters on it)
    }
    services = [
        s
        for s in by_kind(objects, "Service")
        if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
    ]
    assert [s["metadata"]["name"] for s in services] == [f"{RELEASE}-metrics"]
    assert [p["name"] for p in services[0]["spec"]["ports"]] == ["http-metrics"]


def test_existing_claim_creates_no_claim_and_mounts_the_given_one(chart: Any) -> None:
    objects, notes = render(chart, ci_values(CHART / "ci" / "existing-claim-values.yaml"))
    assert by_kind(objects, "PersistentVolumeClaim") == []
    pod = one(objects, "Deployment", RELEASE)["spec"]["template"]["spec"]
    assert {"name": "relay-volume", "persistentVolumeClaim": {"claimName": "team-nfs-share"}} in pod["volumes"]
    assert "spec.storage.claimName: team-nfs-share" in notes
    account = one(objects, "ServiceAccount")
    assert account["metadata"]["annotations"] == {
        "iam.gke.io/gcp-service-account": "relay@example-project.iam.gserviceaccount.com"
    }


def test_created_claim_is_read_write_many_and_kept_on_uninstall(chart: Any) -> None:
    objects, _ = render(chart, ci_values(CHART / "ci" / "embedded-temporal-values.yaml"))
    claim = one(objects, "PersistentVolumeClaim", "relay-shared")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claim["spec"]["storageClassName"] == "nfs-client"
    assert claim["spec"]["resources"]["requests"]["storage"] == "20Gi"
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_a_claim_on_the_default_storage_class_comes_with_the_hint_and_the_supported_range_is_declared(
    chart: Any,
) -> None:
    values = ci_values(CHART / "ci" / "embedded-temporal-values.yaml")
    _, named = render(chart, values)
    values["persistence"] = {**values["persistence"], "storageClassName": ""}
    _, default = render(chart, values)
    assert "persistence.storageClassName" not in named
    assert "stays Pending, set persistence.storageClassName" in default and "VolumeReady=False" in default
    chart_yaml = yaml.safe_load((CHART / "Chart.yaml").read_text(encoding="utf-8"))
    assert chart_yaml["kubeVersion"] == ">=1.20.0-0"  # the oldest the cluster tier runs; no cap on newer ones


# ------------------------------------------------------------------ RBAC


def is_leader_election(obj: dict[str, Any]) -> bool:
    """The Lease's Role and RoleBinding (release namespace only), apart from the rules on watched namespaces."""
    return str(obj["metadata"]["name"]).endswith("-leader-election")


def is_node_reader(obj: dict[str, Any]) -> bool:
    """The cluster-wide node reads (lost-leg detection, issue 13), apart from the rules on watched namespaces."""
    return str(obj["metadata"]["name"]).endswith("-nodes")


def without_leader_election(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objects if not is_leader_election(o) and not is_node_reader(o)]


def reference_rbac_rules() -> set[tuple[str, str, str]]:
    """The rules of the plain manifests in manifests/rbac/ (area 3's source of what the controller calls)."""
    rules: set[tuple[str, str, str]] = set()
    for path in sorted((REPO / "manifests" / "rbac").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if (
                doc
                and doc["kind"] in ("Role", "ClusterRole")
                and not is_leader_election(doc)
                and not is_node_reader(doc)
            ):
                rules |= rule_set(doc["rules"])
    assert rules, "manifests/rbac/ holds no Role or ClusterRole"
    return rules


@SHAPES
def test_rbac_grants_exactly_what_the_controller_needs(chart: Any, values_file: Path) -> None:
    values = ci_values(values_file)
    objects, _ = render(chart, values)
    objects = without_leader_election(objects)
    cluster_wide = values.get("controller", {}).get("watch", {}).get("allNamespaces", False)
    roles = by_kind(objects, "ClusterRole" if cluster_wide else "Role")
    assert by_kind(objects, "Role" if cluster_wide else "ClusterRole") == []
    assert len(roles) == 1
    assert rule_set(roles[0]["rules"]) == reference_rbac_rules()
    binding = one(objects, "ClusterRoleBinding" if cluster_wide else "RoleBinding")
    assert binding["roleRef"]["name"] == roles[0]["metadata"]["name"]
    account = one(objects, "ServiceAccount")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": NAMESPACE}
    ]
    assert (
        one(objects, "Deployment", RELEASE)["spec"]["template"]["spec"]["serviceAccountName"]
        == (account["metadata"]["name"])
    )
    parsed = flags(controller_container(objects))
    if cluster_wide:
        assert "--all-namespaces" in parsed and "--watch-namespace" not in parsed
    else:
        assert parsed["--watch-namespace"] == [NAMESPACE]


def test_watching_listed_namespaces_grants_a_role_in_each(chart: Any) -> None:
    values = ci_values(CHART / "ci" / "embedded-temporal-values.yaml")
    values["controller"] = {"watch": {"allNamespaces": False, "namespaces": ["team-a", "team-b"]}}
    objects, notes = render(chart, values)
    objects = without_leader_election(objects)
    assert sorted(r["metadata"]["namespace"] for r in by_kind(objects, "Role")) == ["team-a", "team-b"]
    assert sorted(b["metadata"]["namespace"] for b in by_kind(objects, "RoleBinding")) == ["team-a", "team-b"]
    assert flags(controller_container(objects))["--watch-namespace"] == ["team-a", "team-b"]
    assert "need a claim of that name in their own namespace" in notes


@SHAPES
def test_the_lease_role_is_get_create_update_on_the_one_lease_in_the_release_namespace(
    chart: Any, values_file: Path
) -> None:
    objects, _ = render(chart, ci_values(values_file))
    role = one(objects, "Role", f"{RELEASE}-leader-election")
    assert role["metadata"]["namespace"] == NAMESPACE
    assert rule_set(role["rules"]) == {("coordination.k8s.io", "leases", v) for v in ("get", "create", "update")}
    named = [r for r in role["rules"] if "get" in r["verbs"] or "update" in r["verbs"]]
    assert all(r.get("resourceNames") == [RELEASE] for r in named), "get/update only on the release's Lease"
    binding = one(objects, "RoleBinding", f"{RELEASE}-leader-election")
    assert binding["roleRef"]["name"] == role["metadata"]["name"] and binding["metadata"]["namespace"] == NAMESPACE
    manifest = [
        doc
        for doc in yaml.safe_load_all((REPO / "manifests" / "rbac" / "controller.yaml").read_text(encoding="utf-8"))
        if doc and doc["kind"] == "Role" and is_leader_election(doc)
    ]
    assert [rule_set(doc["rules"]) for doc in manifest] == [rule_set(role["rules"])], "manifests/rbac agrees"


@SHAPES
def test_node_reads_are_one_cluster_role_agreeing_with_manifests_rbac(chart: Any, values_file: Path) -> None:
    objects, _ = render(chart, ci_values(values_file))
    role = one(objects, "ClusterRole", f"{RELEASE}-nodes")
    assert rule_set(role["rules"]) == {("", "nodes", v) for v in ("get", "list", "watch")}
    binding = one(objects, "ClusterRoleBinding", f"{RELEASE}-nodes")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"][0]["namespace"] == NAMESPACE
    manifest = [
        doc
        for doc in yaml.safe_load_all((REPO / "manifests" / "rbac" / "controller.yaml").read_text(encoding="utf-8"))
        if doc and doc["kind"] == "ClusterRole" and is_node_reader(doc)
    ]
    assert [rule_set(doc["rules"]) for doc in manifest] == [rule_set(role["rules"])], "manifests/rbac agrees"


def test_two_replicas_by_default_with_a_lease_a_budget_and_a_surge_first_rollout(chart: Any) -> None:
    objects, _ = render(chart, ci_values(CHART / "ci" / "embedded-temporal-values.yaml"))
    deployment = one(objects, "Deployment", RELEASE)
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    parsed = flags(controller_container(objects))
    assert parsed["--leader-election-name"] == [RELEASE]
    assert (parsed["--lease-duration"], parsed["--renew-deadline"], parsed["--retry-period"]) == (["10"], ["7"], ["2"])
    assert parsed["--task-queue"] == ["bert-checkpointing-task-queue"]
    assert parsed["--inference-task-queue"] == ["bert-inference-task-queue"]
    env = {e["name"]: e for e in controller_container(objects)["env"]}
    assert env["RELAY_POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    budget = one(objects, "PodDisruptionBudget", RELEASE)
    assert budget["spec"]["minAvailable"] == 1
    assert (
        budget["spec"]["selector"]["matchLabels"].items()
        <= deployment["spec"]["template"]["metadata"]["labels"].items()
    )


def test_one_replica_gets_no_budget_that_would_block_every_drain(chart: Any) -> None:
    values = ci_values(CHART / "ci" / "embedded-temporal-values.yaml")
    values["controller"] = {**values.get("controller", {}), "replicas": 1}
    objects, _ = render(chart, values)
    assert one(objects, "Deployment", RELEASE)["spec"]["replicas"] == 1
    assert [b["metadata"]["name"] for b in by_kind(objects, "PodDisruptionBudget")] == [f"{RELEASE}-temporal"]


def test_no_rbac_and_an_existing_service_account(chart: Any) -> None:
    values = ci_values(CHART / "ci" / "embedded-temporal-values.yaml")
    values |= {"rbac": {"create": False}, "serviceAccount": {"create": False, "name": "platform-relay"}}
    objects, _ = render(chart, values)
    kinds = {o["kind"] for o in objects}
    assert not kinds & {"Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding", "ServiceAccount"}
    assert one(objects, "Deployment", RELEASE)["spec"]["template"]["spec"]["serviceAccountName"] == "platform-relay"


# ------------------------------------------------------------------ names and values


def test_long_release_names_are_cut_to_63_characters(chart: Any) -> None:
    release = "a-very-long-release-name-for-a-platform-team-relay-x"  # 52 of Helm's 53
    objects, _ = render(chart, ci_values(CHART / "ci" / "embedded-temporal-values.yaml"), release=release)
    names = [o["metadata"]["name"] for o in objects]
    assert all(len(n) <= 63 and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", n) for n in names), names
    assert len(set(zip((o["kind"] for o in objects), names, strict=True))) == len(objects)


BAD_VALUES = [
    ({"replicas": 2}, "additional properties 'replicas' not allowed"),
    ({"controller": {"replicaCount": 2}}, "at '/controller': additional properties 'replicaCount' not allowed"),
    ({"controller": {"metricsPort": "9090"}}, "at '/controller/metricsPort': got string, want integer"),
    ({"controller": {"replicas": 0}}, "at '/controller/replicas'"),
    (
        {"temporal": {"address": "t:7233"}, "controller": {"leaderElection": {"renewDeadline": 12}}},
        "leaseDuration must exceed renewDeadline",
    ),
    ({"temporal": {"embedded": {"enabled": "yes"}}}, "at '/temporal/embedded/enabled': got string, want boolean"),
    ({"temporal": {"address": "temporal.example.com"}}, "at '/temporal/address'"),
    ({"persistence": {"accessModes": ["ReadWriteSometimes"]}}, "at '/persistence/accessModes/0'"),
    ({"persistence": {"size": "lots"}}, "at '/persistence/size'"),
    ({"controller": {"watch": {"namespaces": ["Team_A"]}}}, "at '/controller/watch/namespaces/0'"),
    ({}, "temporal.address is required when temporal.embedded.enabled is false"),
    (
        {"temporal": {"address": "t:7233", "addressFromSecret": {"name": "s", "key": "address"}}},
        "temporal.address and temporal.addressFromSecret.name are both set",
    ),
    (
        {"temporal": {"address": "t:7233", "tls": {"enabled": True}}},
        "temporal.tls.existingSecret is required when temporal.tls.enabled is true",
    ),
    (
        {"temporal": {"address": "t:7233"}, "persistence": {"create": False}},
        "persistence.existingClaim is required when persistence.create is false",
    ),
    (
        {"temporal": {"address": "t:7233"}, "persistence": {"existingClaim": "nfs"}},
        "persistence.existingClaim is set but persistence.create is true",
    ),
    (
        {"temporal": {"address": "t:7233"}, "serviceAccount": {"create": False}},
        "serviceAccount.name is required when serviceAccount.create is false",
    ),
    (
        {"temporal": {"address": "t:7233"}, "controller": {"watch": {"allNamespaces": True, "namespaces": ["a"]}}},
        "controller.watch.namespaces must be empty when controller.watch.allNamespaces is true",
    ),
]


@pytest.mark.parametrize(("values", "message"), BAD_VALUES, ids=[m[:40] for _, m in BAD_VALUES])
def test_bad_values_fail_at_render_time_naming_the_value(chart: Any, values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmError) as caught:
        chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    assert message in str(caught.value)


def test_every_values_key_is_documented_and_declared_in_the_schema(chart: Any) -> None:
    chart.validate_schema(chart.values)  # additionalProperties: false throughout, so every key is declared
    lines = (CHART / "values.yaml").read_text(encoding="utf-8").splitlines()
    undocumented: list[str] = []
    documented_at: list[int] = []  # indents of the documented keys enclosing the current line
    for number, line in enumerate(lines):
        match = re.match(r"^(\s*)([A-Za-z][\w.-]*):", line)
        if not match:
            continue
        indent = len(match.group(1))
        documented_at = [i for i in documented_at if i < indent]
        comment_above = []
        for previous in reversed(lines[:number]):
            if not previous.strip().startswith("#"):
                break
            comment_above.append(previous)
        documented = any(c.strip().startswith("# --") for c in comment_above)
        is_section = number + 1 < len(lines) and re.match(rf"^\s{{{indent + 1},}}\S", lines[number + 1]) is not None
        if documented:
            documented_at.append(indent)
        elif not documented_at and not is_section:
            undocumented.append(line.strip())
    assert undocumented == []


# ------------------------------------------------------------------ CRD and examples


def test_the_chart_ships_the_generated_crds() -> None:
    """Two CRDs: TrainingRun, and TrainingSweep (issue 15), whose trials are TrainingRuns the controller runs."""
    with helm.Chart.load(CHART) as loaded:
        crds = {c["name"]: c for c in loaded.crds}
    assert sorted(crds) == ["crds/trainingruns.relay.dev.yaml", "crds/trainingsweeps.relay.dev.yaml"]
    (run,) = [d for d in yaml.safe_load_all(crds["crds/trainingruns.relay.dev.yaml"]["data"]) if d]
    assert run == crd_manifest()  # one source: regenerate with `python -m controller.crd`
    (sweep,) = [d for d in yaml.safe_load_all(crds["crds/trainingsweeps.relay.dev.yaml"]["data"]) if d]
    assert sweep == sweep_crd_manifest()  # `python -m controller.crd` regenerates it too


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_example_is_a_valid_training_run(example: Path) -> None:
    run = load_training_run(str(example))  # raises InvalidTrainingRun naming the field
    document = yaml.safe_load(example.read_text(encoding="utf-8"))
    crd = crd_manifest()
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == document["apiVersion"].split("/")[1]]
    assert document["apiVersion"] == f"{crd['spec']['group']}/{version['name']}"
    assert document["kind"] == crd["spec"]["names"]["kind"]
    jsonschema.Draft4Validator(version["schema"]["openAPIV3Schema"]).validate(document)
    assert run.spec.image.startswith("ghcr.io/relay-ml/relay-trainer:")


@pytest.mark.parametrize("example", SWEEP_EXAMPLES, ids=[p.stem for p in SWEEP_EXAMPLES])
def test_every_sweep_example_is_valid_for_the_models_and_the_crd(example: Path) -> None:
    document = yaml.safe_load(example.read_text(encoding="utf-8"))
    parse_training_sweep(document, str(example))  # raises InvalidTrainingSweep naming the field
    (version,) = sweep_crd_manifest()["spec"]["versions"]
    jsonschema.Draft4Validator(version["schema"]["openAPIV3Schema"]).validate(document)


def test_the_sweep_example_is_shipped() -> None:
    assert [p.name for p in SWEEP_EXAMPLES] == ["sweep-tiny.yaml"]


def test_the_examples_cover_cpu_gpu_spot_and_the_hub() -> None:
    runs = {p.stem: load_training_run(str(p)) for p in EXAMPLES}
    assert {"tiny-cpu", "gpu-spot", "hub-model"} <= runs.keys()
    assert runs["tiny-cpu"].spec.resources.gpus == 0 and runs["tiny-cpu"].spec.model == "tiny"
    spot = runs["gpu-spot"].spec
    assert spot.resources.gpus == 1 and spot.scheduling.tolerations and spot.scheduling.fallback is not None
    assert runs["hub-model"].spec.dataset.source == "hub" and "/" in runs["hub-model"].spec.model


def test_the_crd_schema_refuses_a_broken_example() -> None:
    """The CRD check above can fail: a wrong type in an example is caught with its path."""
    document = yaml.safe_load((REPO / "manifests" / "examples" / "tiny-cpu.yaml").read_text(encoding="utf-8"))
    document["spec"]["training"]["epochs"] = "two"
    version = crd_manifest()["spec"]["versions"][0]
    with pytest.raises(jsonschema.ValidationError) as caught:
        jsonschema.Draft4Validator(version["schema"]["openAPIV3Schema"]).validate(document)
    assert list(caught.value.path) == ["spec", "training", "epochs"]
