"""Fixtures for the suite against Istio's own Istiod (`istiod/`, built by `make istiod`)."""

import pytest

from tests.helpers import ISTIOD_MESH
from xdsproxy.harness.istiod import IstiodProcess


@pytest.fixture
def istiod():
    """A fresh Istiod with the mesh of `mesh.yaml`; stopped after the test."""
    with IstiodProcess(ISTIOD_MESH) as process:
        yield process


@pytest.fixture(params=[False, True], ids=["sotw", "delta"])
def delta(request) -> bool:
    return request.param
