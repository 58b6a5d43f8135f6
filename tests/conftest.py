"""Fixtures several test modules share; shared helpers are in `tests.helpers`, and what the
demo and benchmarks use too in `xdsproxy.harness`."""

from pathlib import Path

import pytest

from xdsproxy.harness.pki import Authority


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """A mesh root and a serving certificate for Istiod's name and 127.0.0.1."""
    authority = Authority(tmp_path_factory.mktemp("pki"))
    serving = authority.issue(
        "istiod", ["DNS:istiod.istio-system.svc", "DNS:xdsproxy.istio-system.svc", "IP:127.0.0.1"]
    )
    return {"ca": authority.cert, "cert": serving.cert, "key": serving.key}
