"""Chart tests: Helm's own engine (helm-python-sdk) lints and renders the
chart with several value sets; every manifest is validated strictly against
the Kubernetes 1.29 and 1.30 schemas (kubernetes-validate); the rendered
config is fed to `lessor check-config`; the values schema must reject wrong
types; a small parent chart uses the named templates.

Run: pytest charts/lessor/tests (LESSOR_BIN points at a lessor binary; by
default target/debug/lessor or target/release/lessor).
"""

import copy
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

CHART = Path(__file__).resolve().parents[1]
REPO = CHART.parents[1]
KUBE_VERSIONS = ["1.29.0", "1.30.0"]
# CRDs are not in the core schemas: their shape is tested instead.
NOT_CORE = {"ServiceMonitor"}


def lessor_bin():
    env = os.environ.get("LESSOR_BIN")
    if env:
        return env
    for profile in ["debug", "release"]:
        path = REPO / "target" / profile / "lessor"
        if path.exists():
            return str(path)
    pytest.fail("no lessor binary: build it (cargo build) or set LESSOR_BIN")


def render(values=None, name="shop", namespace="prod", chart=CHART):
    manifests = helm.Chart.load(str(chart)).render(values or {}, name=name, namespace=namespace)
    docs = []
    for path, text in manifests.items():
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                docs.append(doc)
    return docs


def notes(values=None):
    manifests = helm.Chart.load(str(CHART)).render(values or {}, name="shop", namespace="prod")
    return next(text for path, text in manifests.items() if path.endswith("NOTES.txt"))


def one(docs, kind, name=None):
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def pod_spec(docs):
    return one(docs, "Deployment")["spec"]["template"]["spec"]


def sidecar(spec):
    init = [c for c in spec.get("initContainers", []) if c["name"] == "lessor"]
    main = [c for c in spec.get("containers", []) if c["name"] == "lessor"]
    assert len(init) + len(main) == 1
    return (init or main)[0]


def validate_all(docs):
    for doc in docs:
        if doc["kind"] in NOT_CORE:
            continue
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


VARIANTS = {
    "defaults": {},
    "legacy sidecar": {"sidecar": {"native": False}},
    "otel endpoint": {"otel": {"endpoint": "http://otel-collector.observability:4317", "protocol": "grpc"}},
    "discovery rbac": {"discovery": {"enabled": True, "namespaces": ["data", "cache"]}},
    "everything": {
        "replicaCount": 3,
        "podDisruptionBudget": {"enabled": True},
        "metrics": {"serviceMonitor": {"enabled": True}},
        "podAnnotations": {"team": "checkout"},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "db", "effect": "NoSchedule"}],
        "imagePullSecrets": [{"name": "registry"}],
        "sidecar": {"ports": {"grpc": 7171, "admin": 9191}},
        "app": {"env": [{"name": "MODE", "value": "prod"}], "ports": [{"name": "http", "containerPort": 8080}]},
    },
    "library only": {"app": {"enabled": False}, "discovery": {"enabled": True}},
    "fleet budget": {"replicaCount": 4, "fleet": {"enabled": True, "budget": 200, "group": "orders"}},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_lints_renders_and_validates(variant):
    values = VARIANTS[variant]
    report = helm.lint(str(CHART), values, strict=True, kube_version="v1.30.0")
    errors = [m for m in report["messages"] if m["severity"] >= 2]
    assert not errors and not report["errors"], report
    docs = render(values)
    validate_all(docs)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_rendered_config_passes_check_config(variant, tmp_path):
    docs = render(VARIANTS[variant])
    config = one(docs, "ConfigMap")["data"]["lessor.yaml"]
    path = tmp_path / "lessor.yaml"
    path.write_text(config)
    result = subprocess.run([lessor_bin(), "check-config", "--config", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr + config


def test_native_sidecar_shape_probes_and_security():
    spec = pod_spec(render())
    lessor = sidecar(spec)
    assert spec["initContainers"][0] is lessor, "a native sidecar is an init container"
    assert lessor["restartPolicy"] == "Always"
    assert lessor["args"] == ["serve", "--config", "/etc/lessor/lessor.yaml"]
    ports = {p["name"]: p["containerPort"] for p in lessor["ports"]}
    assert ports == {"grpc": 7070, "admin": 9090}
    assert lessor["startupProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert lessor["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert lessor["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "admin"}
    sc = lessor["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert lessor["resources"]["requests"] and lessor["resources"]["limits"]
    mount = lessor["volumeMounts"][0]
    assert mount["mountPath"] == "/etc/lessor" and mount["readOnly"] is True
    env = {e["name"]: e for e in lessor["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in env
    app = next(c for c in spec["containers"] if c["name"] == "app")
    assert {"name": "LESSOR_ADDR", "value": "127.0.0.1:7070"} in app["env"]
    # The config, and a small /tmp for heap profiles (the root is read-only).
    assert spec["volumes"] == [
        {"name": "lessor-config", "configMap": {"name": "shop-lessor-config"}},
        {"name": "lessor-tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
    ]
    assert {"name": "lessor-tmp", "mountPath": "/tmp"} in lessor["volumeMounts"]


def test_legacy_sidecar_is_an_ordinary_container():
    spec = pod_spec(render({"sidecar": {"native": False}}))
    assert "initContainers" not in spec
    lessor = sidecar(spec)
    assert "restartPolicy" not in lessor
    assert "lifecycle" not in lessor, "no preStop hook: lessor's drain outlives the app"


def test_ports_have_one_source_of_truth():
    docs = render({"sidecar": {"ports": {"grpc": 7171, "admin": 9191}}})
    config = yaml.safe_load(one(docs, "ConfigMap")["data"]["lessor.yaml"])
    assert config["grpc"]["listen"] == "127.0.0.1:7171"
    assert config["admin"]["listen"] == "0.0.0.0:9191"
    spec = pod_spec(docs)
    ports = {p["name"]: p["containerPort"] for p in sidecar(spec)["ports"]}
    assert ports == {"grpc": 7171, "admin": 9191}
    app = next(c for c in spec["containers"] if c["name"] == "app")
    assert {"name": "LESSOR_ADDR", "value": "127.0.0.1:7171"} in app["env"]
    # The config's own listen addresses win, and the container follows them.
    values = {"config": copy.deepcopy(helm.Chart.load(str(CHART)).values["config"])}
    values["config"]["admin"] = {"listen": "0.0.0.0:9393"}
    docs = render(values)
    ports = {p["name"]: p["containerPort"] for p in sidecar(pod_spec(docs))["ports"]}
    assert ports["admin"] == 9393


def test_config_change_rolls_the_pods():
    def checksum(values):
        return pod_spec_meta(render(values))["annotations"]["checksum/config"]

    def pod_spec_meta(docs):
        return one(docs, "Deployment")["spec"]["template"]["metadata"]

    config = copy.deepcopy(helm.Chart.load(str(CHART)).values["config"])
    changed = copy.deepcopy(config)
    changed["upstreams"][0]["pool"]["max_size"] = 64
    assert checksum({}) == checksum({"config": config})
    assert checksum({}) != checksum({"config": changed})
    assert pod_spec_meta(render({"podAnnotations": {"team": "a"}}))["annotations"]["team"] == "a"


def test_otel_settings_reach_the_container():
    values = {"otel": {"endpoint": "http://collector:4318", "protocol": "http/protobuf", "serviceName": "cart-pool"}}
    env = {e["name"]: e.get("value") for e in sidecar(pod_spec(render(values)))["env"]}
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://collector:4318"
    assert env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "http/protobuf"
    assert env["OTEL_SERVICE_NAME"] == "cart-pool"


def test_discovery_rbac_in_each_namespace():
    docs = render({"discovery": {"enabled": True, "namespaces": ["data", "prod"]}})
    roles = [d for d in docs if d["kind"] == "Role"]
    bindings = [d for d in docs if d["kind"] == "RoleBinding"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["data", "prod"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["data", "prod"]
    for role in roles:
        assert role["rules"] == [
            {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]}
        ]
    for binding in bindings:
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "shop-lessor", "namespace": "prod"}]
        assert binding["roleRef"]["name"] == "shop-lessor-endpointslices"
    sa = one(docs, "ServiceAccount")
    assert sa["automountServiceAccountToken"] is True
    assert pod_spec(docs)["serviceAccountName"] == "shop-lessor"
    assert not [d for d in render() if d["kind"] in ("Role", "RoleBinding")]


def test_service_monitor_and_pdb_shapes():
    docs = render({"metrics": {"serviceMonitor": {"enabled": True, "interval": "15s"}}, "podDisruptionBudget": {"enabled": True}})
    monitor = one(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["endpoints"] == [{"port": "admin", "path": "/metrics", "interval": "15s"}]
    service = one(docs, "Service")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert all(service["metadata"]["labels"].get(k) == v for k, v in selector.items())
    assert service["spec"]["ports"][0]["name"] == "admin"
    pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert all(pod_labels.get(k) == v for k, v in service["spec"]["selector"].items())
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1


def test_app_disabled_renders_no_workload():
    docs = render({"app": {"enabled": False}})
    assert sorted(d["kind"] for d in docs) == ["ConfigMap", "ServiceAccount"]


def test_notes_tell_how_to_check():
    text = notes()
    assert "/readyz?verbose" in text and "lessor stats" in text
    assert 'include "lessor.sidecar"' in notes({"app": {"enabled": False}})


def test_image_tag_defaults_to_app_version():
    chart_yaml = yaml.safe_load((CHART / "Chart.yaml").read_text())
    image = sidecar(pod_spec(render()))["image"]
    assert image == f"ghcr.io/lessor-dev/lessor:{chart_yaml['appVersion']}"
    assert sidecar(pod_spec(render({"image": {"tag": "0.2.0"}})))["image"].endswith(":0.2.0")


@pytest.mark.parametrize(
    "bad",
    [
        {"replicaCount": "three"},
        {"sidecar": {"native": "yes"}},
        {"sidecar": {"ports": {"grpc": "7070", "admin": 9090}}},
        {"sidecar": {"ports": {"grpc": 70000, "admin": 9090}}},
        {"image": {"pullPolicy": "Sometimes"}},
        {"otel": {"protocol": "thrift"}},
        {"app": {"image": 42}},
        {"discovery": {"namespaces": "data"}},
        {"config": "upstreams: []"},
        {"unknownKey": 1},
    ],
)
def test_schema_rejects_wrong_types(bad):
    chart = helm.Chart.load(str(CHART))
    with pytest.raises(helm.HelmError):
        chart.validate_schema(chart.merge_values(bad))


def test_schema_leaves_room_for_global():
    chart = helm.Chart.load(str(CHART))
    chart.validate_schema(chart.merge_values({"global": {"imageRegistry": "mirror.local"}}))


PARENT_CHART = """apiVersion: v2
name: shop
version: 1.0.0
dependencies:
  - name: lessor
    version: 0.1.0
"""

PARENT_VALUES = """lessor:
  app:
    enabled: false
  config:
    upstreams:
      - name: cart
        address: "cart-redis:6379"
"""

PARENT_DEPLOYMENT = """apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ .Release.Name }}-shop
spec:
  selector:
    matchLabels: {app: shop}
  template:
    metadata:
      labels: {app: shop}
      annotations:
        checksum/lessor-config: {{ include "lessor.configChecksum" (dict "Values" .Values.lessor "Release" .Release) }}
    spec:
      initContainers:
        {{- include "lessor.sidecar" (dict "Values" .Values.lessor "Release" .Release) | nindent 8 }}
      containers:
        - name: shop
          image: "shop:1.0"
          env:
            - name: LESSOR_ADDR
              value: "127.0.0.1:7070"
      volumes:
        {{- include "lessor.volumes" (dict "Values" .Values.lessor "Release" .Release) | nindent 8 }}
"""


def test_parent_chart_uses_the_named_templates(tmp_path):
    parent = tmp_path / "shop"
    (parent / "templates").mkdir(parents=True)
    (parent / "Chart.yaml").write_text(PARENT_CHART)
    (parent / "values.yaml").write_text(PARENT_VALUES)
    (parent / "templates" / "deployment.yaml").write_text(PARENT_DEPLOYMENT)
    shutil.copytree(CHART, parent / "charts" / "lessor", ignore=shutil.ignore_patterns("tests", "__pycache__"))
    docs = render(chart=parent, name="web")
    validate_all(docs)
    deployment = one(docs, "Deployment")
    assert deployment["metadata"]["name"] == "web-shop", "the subchart renders no workload"
    spec = deployment["spec"]["template"]["spec"]
    lessor = spec["initContainers"][0]
    assert lessor["name"] == "lessor" and lessor["restartPolicy"] == "Always"
    config_map = one(docs, "ConfigMap")
    assert spec["volumes"] == [
        {"name": "lessor-config", "configMap": {"name": config_map["metadata"]["name"]}},
        {"name": "lessor-tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
    ]
    assert config_map["metadata"]["name"] == "web-lessor-config"
    assert "cart-redis:6379" in config_map["data"]["lessor.yaml"]
    assert len(deployment["spec"]["template"]["metadata"]["annotations"]["checksum/lessor-config"]) == 64


def test_secrets_are_mounted_read_only_and_stay_out_of_the_config():
    values = {
        "config": {
            "upstreams": [
                {
                    "name": "orders",
                    "address": "orders-db:5432",
                    "protocol": "postgres",
                    "postgres": {
                        "user": "orders",
                        "database": "orders",
                        "password_file": "/var/run/secrets/pg/password",
                    },
                },
                {
                    "name": "cache",
                    "address": "redis:6379",
                    "protocol": "redis",
                    "redis": {"password_env": "REDIS_PASSWORD"},
                },
            ]
        },
        "sidecar": {
            "secretMounts": [
                {
                    "secretName": "orders-db",
                    "mountPath": "/var/run/secrets/pg",
                    "items": [{"key": "password", "path": "password"}],
                }
            ],
            "envFrom": [{"secretRef": {"name": "redis-credentials"}}],
            "extraVolumes": [{"name": "ca", "configMap": {"name": "db-ca"}}],
            "extraVolumeMounts": [{"name": "ca", "mountPath": "/etc/ssl/db", "readOnly": True}],
            "lifecycle": {"preStop": {"exec": {"command": ["lessor", "shutdown"]}}},
        },
    }
    for native in [True, False]:
        values["sidecar"]["native"] = native
        docs = render(values)
        validate_all(docs)
        spec = pod_spec(docs)
        container = sidecar(spec)
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        secret_mount = mounts["/var/run/secrets/pg"]
        assert secret_mount["readOnly"] is True
        volumes = {v["name"]: v for v in spec["volumes"]}
        secret = volumes[secret_mount["name"]]["secret"]
        assert secret["secretName"] == "orders-db"
        assert secret["items"] == [{"key": "password", "path": "password"}]
        assert secret["defaultMode"] == 0o440
        assert "ca" in volumes and mounts["/etc/ssl/db"]["name"] == "ca"
        assert container["envFrom"] == [{"secretRef": {"name": "redis-credentials"}}]
        assert container["lifecycle"]["preStop"]["exec"]["command"] == ["lessor", "shutdown"]
        # The ConfigMap names where the password is, never what it is.
        config = one(docs, "ConfigMap")["data"]["lessor.yaml"]
        assert "/var/run/secrets/pg/password" in config
        assert "password:" not in config.replace("password_file:", "").replace("password_env:", "")
    text = notes(values)
    assert "Secret orders-db at /var/run/secrets/pg" in text
    assert "password_file" in notes()
    # And lessor accepts the rendered config's shape (the file itself only
    # exists in the pod: check-config must name it, not crash).
    rendered = yaml.safe_load(one(render(values), "ConfigMap")["data"]["lessor.yaml"])
    assert rendered["upstreams"][0]["postgres"]["password_file"] == "/var/run/secrets/pg/password"


def test_tls_files_are_mounted_from_secrets(tmp_path):
    values = {
        "config": {
            "upstreams": [
                {
                    "name": "orders",
                    "address": "orders-db.internal:5432",
                    "protocol": "postgres",
                    "postgres": {"user": "orders"},
                    "tls": {
                        "mode": "verify-full",
                        "ca_file": "/var/run/secrets/db-ca/ca.crt",
                        "cert_file": "/var/run/secrets/db-client/tls.crt",
                        "key_file": "/var/run/secrets/db-client/tls.key",
                    },
                }
            ]
        },
        "sidecar": {
            "secretMounts": [
                {"secretName": "db-ca", "mountPath": "/var/run/secrets/db-ca"},
                {"secretName": "db-client", "mountPath": "/var/run/secrets/db-client"},
            ]
        },
    }
    docs = render(values)
    validate_all(docs)
    spec = pod_spec(docs)
    container = sidecar(spec)
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    for path, secret_name in [
        ("/var/run/secrets/db-ca", "db-ca"),
        ("/var/run/secrets/db-client", "db-client"),
    ]:
        mount = mounts[path]
        # Whole-Secret mounts (no subPath): the kubelet's `..data` swap of
        # a rotated Secret reaches lessor, which reloads the files.
        assert mount["readOnly"] is True and "subPath" not in mount
        assert volumes[mount["name"]]["secret"]["secretName"] == secret_name
    config = one(docs, "ConfigMap")["data"]["lessor.yaml"]
    rendered = yaml.safe_load(config)
    assert rendered["upstreams"][0]["tls"]["cert_file"] == "/var/run/secrets/db-client/tls.crt"
    # lessor knows the block; the files exist only in the pod, so
    # check-config names the first one it cannot read.
    path = tmp_path / "lessor.yaml"
    path.write_text(config)
    result = subprocess.run([lessor_bin(), "check-config", "--config", str(path)], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert "upstreams[0].tls.ca_file" in result.stderr, result.stderr


@pytest.mark.parametrize(
    "bad",
    [
        {"sidecar": {"secretMounts": [{"secretName": "x"}]}},
        {"sidecar": {"secretMounts": [{"secretName": "x", "mountPath": "relative"}]}},
        {"sidecar": {"secretMounts": [{"secretName": "x", "mountPath": "/a", "colour": 1}]}},
    ],
)
def test_schema_rejects_bad_secret_mounts(bad):
    with pytest.raises(Exception):
        render(bad)


def live_metric_names():
    """The metric names a real `lessor serve` exports (histograms with their
    _bucket/_sum/_count series), read from its /metrics."""
    import socket
    import time
    import urllib.request

    def free_port():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    with tempfile.TemporaryDirectory() as tmp:
        admin = f"127.0.0.1:{free_port()}"
        config = Path(tmp) / "lessor.yaml"
        config.write_text(
            f'grpc: {{ listen: "127.0.0.1:{free_port()}" }}\n'
            f'admin: {{ listen: "{admin}", control_listen: "" }}\n'
            "upstreams:\n"
            '  - name: db\n    address: "127.0.0.1:1"\n    readiness: optional\n'
            "    pool: { min_idle: 0 }\n"
        )
        proc = subprocess.Popen([lessor_bin(), "serve", "--config", str(config)], stdout=subprocess.DEVNULL)
        try:
            deadline = time.time() + 30
            while True:
                try:
                    body = urllib.request.urlopen(f"http://{admin}/metrics", timeout=2).read().decode()
                    break
                except OSError:
                    assert time.time() < deadline, "lessor serve did not answer /metrics"
                    time.sleep(0.05)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    names = set()
    for line in body.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            if kind == "histogram":
                names |= {name + "_bucket", name + "_sum", name + "_count"}
            elif kind == "counter":
                names |= {name, name + "_total"}
            else:
                names.add(name)
        elif line and not line.startswith("#"):
            names.add(line.split("{")[0].split(" ")[0])
    return names


def promql_metric_names(node):
    """Every metric name a parsed PromQL expression selects."""
    import promql_parser

    if isinstance(node, promql_parser.VectorSelector):
        return {node.name} if node.name else set()
    found = set()
    for attr in ["expr", "lhs", "rhs", "vector_selector", "param"]:
        child = getattr(node, attr, None)
        if child is not None and not isinstance(child, (int, float, str)):
            found |= promql_metric_names(child)
    for arg in getattr(node, "args", None) or []:
        found |= promql_metric_names(arg)
    return found


def test_dashboard_queries_parse_and_use_exported_metrics():
    import json

    import promql_parser

    assert not [d for d in render() if d["metadata"]["name"].endswith("-dashboard")], "off by default"
    docs = render({"dashboard": {"enabled": True}})
    validate_all(docs)
    cm = one(docs, "ConfigMap", "shop-lessor-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(cm["data"]["lessor.json"])
    exported = live_metric_names()
    used = set()
    titles = []
    for panel in dashboard["panels"]:
        titles.append(panel["title"])
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            # Grafana's own variables, as Grafana substitutes them.
            expr = target["expr"].replace("$__rate_interval", "5m")
            names = promql_metric_names(promql_parser.parse(expr))
            assert names, f"{panel['title']}: no metric in {expr}"
            unknown = names - exported
            assert not unknown, f"{panel['title']}: {unknown} not exported by lessor"
            used |= names
    for needed in [
        "lessor_pool_connections",
        "lessor_pool_waiters",
        "lessor_checkout_wait_seconds_bucket",
        "lessor_lease_duration_seconds_bucket",
        "lessor_evictions_total",
        "lessor_connect_errors_total",
        "lessor_endpoint_ejected",
        "lessor_upstream_ready",
        "lessor_trace_spans_total",
    ]:
        assert needed in used, f"no panel shows {needed}"
    assert len(titles) == len(set(titles))


def test_fleet_budget_rbac_token_pod_name_and_config():
    values = {"fleet": {"enabled": True, "budget": 40, "group": "cache-a", "renewInterval": "2s", "leaseDuration": "10s"}}
    docs = render(values)
    role = one(docs, "Role", "shop-lessor-leases")
    assert role["metadata"]["namespace"] == "prod"
    assert role["rules"] == [
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "verbs": ["get", "list", "watch", "create", "update", "delete"],
        }
    ]
    binding = one(docs, "RoleBinding", "shop-lessor-leases")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "shop-lessor", "namespace": "prod"}]
    assert binding["roleRef"]["name"] == "shop-lessor-leases"
    assert one(docs, "ServiceAccount")["automountServiceAccountToken"] is True
    spec = pod_spec(docs)
    assert spec["automountServiceAccountToken"] is True
    env = {e["name"]: e for e in sidecar(spec)["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    config = yaml.safe_load(one(docs, "ConfigMap")["data"]["lessor.yaml"])
    assert config["upstreams"][0]["fleet"] == {
        "budget": 40,
        "group": "cache-a",
        "renew_interval": "2s",
        "lease_duration": "10s",
    }
    # Off by default: no Lease RBAC, no token, no fleet block.
    plain = render()
    assert not [d for d in plain if d["kind"] == "Role"]
    assert pod_spec(plain)["automountServiceAccountToken"] is False
    assert "fleet" not in yaml.safe_load(one(plain, "ConfigMap")["data"]["lessor.yaml"])["upstreams"][0]


def test_fleet_budget_goes_to_the_named_upstream():
    values = {
        "config": {
            "upstreams": [
                {"name": "cache", "address": "redis:6379"},
                {"name": "db", "address": "pg:5432"},
            ]
        },
        "fleet": {"enabled": True, "budget": 90, "upstream": "db"},
    }
    config = yaml.safe_load(one(render(values), "ConfigMap")["data"]["lessor.yaml"])
    assert "fleet" not in config["upstreams"][0]
    assert config["upstreams"][1]["fleet"]["budget"] == 90
    with pytest.raises(Exception, match="not the name of any config.upstreams entry"):
        render({**values, "fleet": {"enabled": True, "budget": 90, "upstream": "nope"}})


@pytest.mark.parametrize(
    "bad",
    [
        {"fleet": {"budget": -1}},
        {"fleet": {"group": "Orders"}},
        {"fleet": {"enabled": "yes"}},
        {"fleet": {"size": 3}},
    ],
)
def test_schema_rejects_bad_fleet_values(bad):
    with pytest.raises(Exception):
        render(bad)
