"""Logs that help: JSON from the first line with `--log-format json`, every stream end (Delta
included), upstream failures at warning once a minute per cause, and at debug one line per
push with node, type, counts and bytes."""

import json
import logging
import subprocess
import sys

import pytest

from xdsproxy.harness.stack import eventually, running_envoy, running_proxy, running_sim

# Runs xdsproxy, kubectl or Envoy as child processes: not in `make test-fast`.
pytestmark = pytest.mark.process


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "xdsproxy.cli", *args], capture_output=True, text=True, timeout=30
    )


@pytest.mark.parametrize(
    ("args", "code", "level", "says"),
    [
        (
            ["serve", "--upstream", "x:1", "--upstream-plaintext", "--mode", "lazy"],
            2,
            "error",
            "--egress",
        ),
        (["serve", "--upstream", "x:1", "--upstream-plaintext", "--bad"], 2, "error", "--bad"),
        (["serve", "--upstream", "x:1", "--upstream-plaintext", "--check"], 0, "info", "ok"),
        (["status", "--debug", "127.0.0.1:1"], 1, "error", "cannot reach"),
    ],
)
def test_every_start_up_line_is_json_with_log_format_json(args, code, level, says) -> None:
    for where in ("before", "after"):  # the flag before or after the command's name
        argv = (
            ["--log-format", "json", *args] if where == "before" else [*args, "--log-format=json"]
        )
        out = _cli(*argv)
        assert out.returncode == code, out.stderr
        lines = [json.loads(line) for line in out.stderr.splitlines()]
        assert lines and all(entry["level"] in ("info", "warning", "error") for entry in lines)
        assert any(e["level"] == level and says in e["msg"] for e in lines), lines


def test_text_start_up_errors_stay_one_plain_line() -> None:
    out = _cli("serve", "--upstream", "x:1", "--upstream-plaintext", "--mode", "lazy")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["xdsproxy: --mode lazy needs --egress FQDN:PORT"]


@pytest.mark.envoy
async def test_stream_ends_upstream_failures_and_debug_push_lines(caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="xdsproxy")
    async with running_sim() as sim, running_proxy(sim.port) as proxy:
        async with running_envoy(proxy.port, delta=True), running_envoy(proxy.port):

            def records(message: str) -> list[logging.LogRecord]:
                return [r for r in caplog.records if r.getMessage() == message]

            await eventually(lambda: len(records("push")) >= 4, timeout=20)
            push = records("push")[0]
            assert push.type in ("CDS", "LDS") and push.resources > 0 and push.bytes > 0
            assert push.node and push.origin == "relayed"
            await sim.stop()  # both upstream streams fail together
            await eventually(lambda: len(records("stream ended")) >= 2, timeout=20)
        protocols = {r.protocol for r in records("stream ended")}
        assert protocols == {"SotW", "Delta"}
        failed = records("istiod stream failed")
        assert len(failed) == 1 and failed[0].levelno == logging.WARNING  # once a minute
        assert failed[0].code == "UNAVAILABLE"
