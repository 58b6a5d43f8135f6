"""Child processes for the benchmarks: spawning, waiting for a port, reading CPU and RSS."""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


def spawn(*args: str, read: bool = False) -> subprocess.Popen[str]:
    """`python -m ARGS`. Stdout is a pipe only when the caller reads every line of it: a pipe
    nobody drains fills up and stalls the child."""
    return subprocess.Popen(
        [sys.executable, "-m", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE if read else subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {port}")


def metric_sum(debug_port: int, *prefixes: str) -> float:
    """Sum of the samples on xdsproxy's /metrics whose lines start with any of `prefixes`."""
    url = f"http://127.0.0.1:{debug_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefixes)
    )
