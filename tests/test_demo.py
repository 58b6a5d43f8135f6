"""`xdsproxy demo` runs end to end and leaves no process behind."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.envoy


def test_demo_smoke() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "xdsproxy.cli",
            "--log-level",
            "warning",
            "demo",
            "--services",
            "50",
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    assert "held by Envoy" in result.stdout
    assert "CDS updates rejected: 0" in result.stdout
