"""`xdsproxy demo` runs end to end, writes its plot, and leaves no process behind."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.envoy


def test_demo_smoke(tmp_path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "xdsproxy.cli",
            "--log-level",
            "warning",
            "demo",
            "--services",
            "200",
            "--output",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "[7/7] plot written to" in result.stdout
    assert "learn latency, median (ms)" in result.stdout
    clusters = next(line for line in result.stdout.splitlines() if line.startswith("clusters"))
    full, lazy = (int(value) for value in clusters.split()[1:3])
    assert full > lazy > 0
    assert (tmp_path / "xdsproxy-demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    left = subprocess.run(["pgrep", "-f", "xdsproxy-envoy-"], capture_output=True)
    assert left.returncode == 1, "the demo left an Envoy running"
