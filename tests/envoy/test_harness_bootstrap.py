"""The harness's sidecar bootstrap against the real Istio bootstraps in the config dumps."""

import json
import subprocess

import pytest

from tests.istio_fixtures import FIXTURES
from xdsproxy.harness.envoy import ISTIO_STATS_INCLUSION, SidecarIdentity, bootstrap, envoy_binary

# Runs xdsproxy, kubectl or Envoy as child processes: not in `make test-fast`.
pytestmark = pytest.mark.process


def _bootstrap(dump: str) -> dict:
    configs = json.loads((FIXTURES / dump).read_text())["configs"]
    return next(c["bootstrap"] for c in configs if c["@type"].endswith("BootstrapConfigDump"))


@pytest.mark.parametrize(
    "dump",
    [
        "istio-1.22.3_sidecar_app1_multiparty-lb.json",
        "istio-1.20.8-ossm_sidecar_hello-openshift.json",
    ],
)
def test_istio_stats_matcher_is_istios_default(dump) -> None:
    matcher = _bootstrap(dump)["stats_config"]["stats_matcher"]
    assert matcher == {"inclusion_list": ISTIO_STATS_INCLUSION}


@pytest.mark.envoy
def test_bootstrap_with_istio_stats_validates(tmp_path) -> None:
    config = bootstrap(15010, SidecarIdentity(istio_stats=True), delta=True)
    assert config["stats_config"]["stats_matcher"]["inclusion_list"] == ISTIO_STATS_INCLUSION
    path = tmp_path / "bootstrap.json"
    path.write_text(json.dumps(config))
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "--use-dynamic-base-id"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
