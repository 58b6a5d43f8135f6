"""`xdsproxy demo` runs end to end, writes its plot, and leaves no process behind."""

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

pytestmark = pytest.mark.envoy


def _demo_env(tmp_path) -> dict[str, str]:
    """The demo's temporary files, its Envoys' working directories included, under
    `tmp_path`: so `_envoys_left` counts this demo's Envoys only, not those of anything else
    running on the machine."""
    (tmp_path / "tmp").mkdir()
    return {**os.environ, "TMPDIR": str(tmp_path / "tmp")}


def _envoys_left(tmp_path) -> bool:
    pattern = f"{tmp_path / 'tmp'}/xdsproxy-envoy-"
    return subprocess.run(["pgrep", "-f", pattern], capture_output=True).returncode == 0


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
        env=_demo_env(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    assert "[7/7] plot written to" in result.stdout
    assert "learn latency, median (ms)" in result.stdout
    clusters = next(line for line in result.stdout.splitlines() if line.startswith("clusters"))
    full, lazy = (int(value) for value in clusters.split()[1:3])
    assert full > lazy > 0
    assert (tmp_path / "xdsproxy-demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not _envoys_left(tmp_path), "the demo left an Envoy running"


def test_demo_keep_running_serves_the_commands_it_prints_and_stops_on_ctrl_c(tmp_path) -> None:
    demo = subprocess.Popen(
        [
            *(sys.executable, "-m", "xdsproxy.cli", "--log-level", "warning", "demo"),
            *("--services", "200", "--calls", "3", "--output", str(tmp_path), "--keep-running"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=_demo_env(tmp_path),
        start_new_session=True,
        # As a shell's background job starts it: SIGINT ignored. Ctrl-C must still stop it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(ln) for ln in demo.stdout], daemon=True).start()
    try:
        printed = []
        deadline = time.monotonic() + 300
        while not printed or printed[-1] != "Ctrl-C stops everything.":
            printed.append(lines.get(timeout=max(0.1, deadline - time.monotonic())).rstrip())
        commands = [ln.strip() for ln in printed if ln.startswith("  ")]
        debug = next(c for c in commands if c.startswith("xdsproxy status")).split()[2:]
        spare = next(c for c in commands if "first request to" in c).rsplit(" ", 1)[1]

        def run(*args: str) -> str:
            out = subprocess.run(
                [sys.executable, "-m", "xdsproxy.cli", *args, *debug],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert out.returncode == 0, out.stderr
            return out.stdout

        assert "app-0.ns-0" in run("status")
        assert "NOT IN SCOPE" in run("scope", "why", "ns-0/app", f"{spare}:80")
        # The printed printf | nc line, sent as nc would.
        nc = next(c for c in commands if c.startswith("printf"))
        payload = nc.split("'")[1].encode().decode("unicode_escape").encode()
        port = int(nc.split("| nc 127.0.0.1 ")[1].split()[0])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(payload)
            assert conn.recv(64).startswith(b"HTTP/1.1 200")
        why = ""
        for _ in range(50):
            why = run("scope", "why", "ns-0/app", f"{spare}:80")
            if ": IN SCOPE" in why:
                break
            time.sleep(0.2)
        assert ": IN SCOPE" in why and "- learned" in why
        assert "forgot 1" in run("scope", "forget", "ns-0/app", f"{spare}:80")
        assert "kind: Sidecar" in run("scope", "export")
    finally:
        demo.send_signal(signal.SIGINT)
        try:
            code = demo.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(demo.pid, signal.SIGKILL)
            raise
    assert code == 130
    assert not _envoys_left(tmp_path), "the demo left an Envoy running"
