"""`xdsproxy serve` as a real process: TLS both ways, SIGTERM, command-line errors."""

import asyncio
import os
import re
import signal
import subprocess
import sys

import grpc
import pytest

from tests.helpers import server_credentials
from tests.xds_messages import sotw_request
from xdsproxy.harness.ads import AdsClient, RecordingUpstream
from xdsproxy.harness.pki import Authority
from xdsproxy.harness.stack import eventually, running_proxy, running_sim
from xdsproxy.sim.mesh import generate
from xdsproxy.wire.codec import decode_sotw_response

# Runs xdsproxy, kubectl or Envoy as child processes: not in `make test-fast`.
pytestmark = pytest.mark.process


async def test_tls_downstream_and_upstream_without_client_certificate(pki) -> None:
    upstream = RecordingUpstream(lambda data: [])
    await upstream.start(server_credentials(pki))
    try:
        async with running_proxy(
            upstream.port,
            cert=pki["cert"],
            key=pki["key"],
            upstream_ca=pki["ca"],
            upstream_sni="istiod.istio-system.svc",
        ) as proxy:
            credentials = grpc.ssl_channel_credentials(pki["ca"].read_bytes())
            client = AdsClient(
                proxy.port,
                credentials=credentials,
                options=[("grpc.ssl_target_name_override", "xdsproxy.istio-system.svc")],
            )
            await client.send(sotw_request(with_node=True))
            for _ in range(100):
                if upstream.requests:
                    break
                await asyncio.sleep(0.05)
            assert upstream.requests, "the request did not reach the TLS upstream"
            assert upstream.auth[0].get("transport_security_type") == [b"ssl"]
            assert "x509_common_name" not in upstream.auth[0]
            assert "x509_pem_cert" not in upstream.auth[0]
            await client.close()

            plain = AdsClient(proxy.port)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await plain.send(sotw_request(with_node=True))
                await plain.recv()
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            await plain.close()
    finally:
        await upstream.stop()


async def test_wrong_upstream_name_fails_the_stream_not_the_process(pki) -> None:
    upstream = RecordingUpstream(lambda data: [])
    await upstream.start(server_credentials(pki))
    try:
        async with running_proxy(
            upstream.port, upstream_ca=pki["ca"], upstream_sni="someone-else.example"
        ) as proxy:
            client = AdsClient(proxy.port)
            await client.send(sotw_request(with_node=True))
            code, _ = await client.status(timeout=30)
            assert code == grpc.StatusCode.UNAVAILABLE
            assert not upstream.requests
            await client.close()
    finally:
        await upstream.stop()


def _spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "xdsproxy.cli", *args, "--admin-listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


async def _port_from_log(process: subprocess.Popen[str]) -> int:
    assert process.stderr is not None
    for _ in range(200):
        line = await asyncio.to_thread(process.stderr.readline)
        if match := re.search(r"serving ADS .*port=(\d+)", line):
            return int(match.group(1))
        if not line and process.poll() is not None:
            break
    raise AssertionError("xdsproxy did not report its port")


async def test_sigterm_ends_streams_with_unavailable_and_exits() -> None:
    async with running_sim(generate(10)) as sim:
        process = _spawn(
            "serve",
            "--upstream",
            f"127.0.0.1:{sim.port}",
            "--upstream-plaintext",
            "--listen",
            "127.0.0.1:0",
        )
        try:
            port = await _port_from_log(process)
            client = AdsClient(port)
            await client.send(sotw_request(with_node=True))
            assert decode_sotw_response(await client.recv()).names
            process.send_signal(signal.SIGTERM)
            code, details = await client.status()
            assert code == grpc.StatusCode.UNAVAILABLE and "shutting down" in details
            assert await asyncio.to_thread(process.wait, 15) == 0
            await client.close()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serve", "--upstream", "x:1"], "one of the arguments"),
        (["serve", "--upstream", "x:1", "--upstream-plaintext", "--cert", "a.pem"], "go together"),
        (["serve", "--upstream", "x:1", "--upstream-ca", "/nonexistent/ca.pem"], "no such file"),
        (["serve", "--upstream", "x:1", "--upstream-plaintext", "--mode", "lazy"], "--egress"),
        (
            ["serve", "--upstream", "x:1", "--upstream-plaintext", "--listen", "127.0.0.1"],
            "--listen",
        ),
        (["serve", "--upstream", "x:1", "--upstream-plaintext", "--listen", "garbage"], "--listen"),
        (
            ["serve", "--upstream", "x:1", "--upstream-plaintext", "--usage-sample", "101"],
            "--usage",
        ),
        (
            ["serve", "--upstream", "x:1", "--upstream-plaintext", "--egress-port", "0"],
            "--egress-p",
        ),
        (
            ["serve", "--upstream", "x:1", "--upstream-plaintext", "--upstream-connections", "-1"],
            "--upstream-connections",
        ),
        (["serve", "--upstream", "nope", "--upstream-plaintext"], "--upstream"),
        (
            [
                "serve",
                "--upstream",
                "x:1",
                "--upstream-plaintext",
                "--mode",
                "lazy",
                "--egress",
                "e.ns.svc.cluster.local:80",
                "--service-cidr",
                "10.96.0.0/99",
            ],
            "--service-cidr '10.96.0.0/99'",
        ),
        (
            [
                "serve",
                "--upstream",
                "x:1",
                "--upstream-plaintext",
                "--mode",
                "lazy",
                "--egress",
                "e.ns.svc.cluster.local:80",
                "--rules",
                "/nonexistent/rules.yaml",
            ],
            "/nonexistent/rules.yaml",
        ),
        (
            [
                *("serve", "--upstream", "x:1", "--upstream-plaintext", "--mode", "lazy"),
                *("--egress", "e.ns.svc.cluster.local:80", "--admin-writes"),
                *("--admin-listen", "0.0.0.0:15015"),
            ],
            "--admin-writes: --admin-listen '0.0.0.0:15015' is not loopback",
        ),
    ],
)
def test_command_line_errors_are_clear(args: list[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "xdsproxy.cli", *args], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert message in result.stderr


def test_invalid_rules_file_names_file_and_line(tmp_path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("default:\n  - istio-system/*\nworkloadz: []\n")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "xdsproxy.cli",
            "serve",
            "--upstream",
            "x:1",
            "--upstream-plaintext",
            "--mode",
            "lazy",
            "--egress",
            "e.ns.svc.cluster.local:80",
            "--rules",
            str(rules),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert f"{rules}:3" in result.stderr and "workloadz" in result.stderr


def _serve_args(*extra: str) -> list[str]:
    return [
        sys.executable, "-m", "xdsproxy.cli", "serve",
        "--upstream", "127.0.0.1:1", "--upstream-plaintext",
        "--listen", "127.0.0.1:0", "--als-listen", "127.0.0.1:0", "--debug-listen", "127.0.0.1:0",
        "--admin-listen", "127.0.0.1:0", *extra,
    ]  # fmt: skip


def test_a_store_that_cannot_be_opened_stops_start_up_every_time(tmp_path) -> None:
    """Never a process that answers /healthz while it cannot serve: exit 2, naming the store."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    store = f"sqlite://{blocker}/edges.db"  # a directory that can never be created
    lazy = ("--mode", "lazy", "--egress", "e.ns.svc.cluster.local:80", "--store", store)
    for extra in ((), ("--check",), (), ()):
        result = subprocess.run(
            _serve_args(*lazy, *extra), capture_output=True, text=True, timeout=30
        )
        assert result.returncode == 2
        [line] = result.stderr.strip().splitlines()
        assert f"--store {store}" in line and "writable" in line


async def test_a_store_failing_at_load_leaves_nothing_serving(tmp_path) -> None:
    """Past the flag checks (the store broke after them), start-up raises and stops what it
    had started: no debug endpoint answers /healthz for a process that cannot serve."""
    from xdsproxy.istio.names import ServicePort
    from xdsproxy.server.app import ProxyServer, ServeConfig
    from xdsproxy.store.base import StoreError

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    config = ServeConfig(
        upstream="127.0.0.1:1",
        mode="lazy",
        egress=ServicePort("e.ns.svc.cluster.local", 80),
        store=f"sqlite://{blocker}/edges.db",
        debug_listen="127.0.0.1:0",
    )
    server = ProxyServer(config)
    with pytest.raises(StoreError):
        await server.start()
    assert server.debug is None and server._server is None
    assert not [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]


async def test_a_second_process_on_a_port_in_use_refuses_to_start() -> None:
    """gRPC's SO_REUSEPORT would let both serve and share the sidecars: the second exits 2."""
    async with running_sim(generate(5)) as sim:
        first = _spawn(
            "serve", "--upstream", f"127.0.0.1:{sim.port}", "--upstream-plaintext",
            "--listen", "127.0.0.1:0", "--debug-listen", "",
        )  # fmt: skip
        try:
            port = await _port_from_log(first)
            second = subprocess.run(
                _serve_args("--listen", f"127.0.0.1:{port}"),
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert second.returncode == 2
            assert f"--listen 127.0.0.1:{port}: address in use" in second.stderr
        finally:
            first.terminate()
            first.wait(15)


@pytest.mark.parametrize("defect", ["mismatched key", "garbage certificate", "garbage CA"])
def test_bad_certificates_are_named_not_reported_as_a_bind_failure(pki, tmp_path, defect) -> None:
    other = Authority(tmp_path).issue("other", ["DNS:other"])
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    cert, key, ca = pki["cert"], pki["key"], pki["ca"]
    if defect == "mismatched key":
        key = other.key
    elif defect == "garbage certificate":
        cert = garbage
    else:
        ca = garbage
    args = [
        sys.executable, "-m", "xdsproxy.cli", "serve",
        "--upstream", "127.0.0.1:1", "--upstream-ca", str(ca),
        "--listen", "127.0.0.1:0", "--debug-listen", "", "--cert", str(cert), "--key", str(key),
    ]  # fmt: skip
    result = subprocess.run(args, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2, result.stderr
    assert "Failed to bind" not in result.stderr
    named = "--upstream-ca" if defect == "garbage CA" else "--cert"
    assert named in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_lazy_only_flags_in_passthrough_mode_are_warned_about() -> None:
    result = subprocess.run(
        [
            *_serve_args("--egress", "e.ns.svc.cluster.local:80", "--ttl", "1h"),
            "--check",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0
    assert "--egress is ignored in passthrough mode" in result.stderr
    assert "--ttl is ignored in passthrough mode" in result.stderr


def test_help_shows_defaults() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "xdsproxy.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "(default: 0.0.0.0:15010)" in result.stdout and "(default: 168h)" in result.stdout


async def test_rules_reload_on_sighup_and_on_change_and_a_bad_file_keeps_the_old(tmp_path) -> None:
    import json
    import urllib.request

    from xdsproxy.harness.http import free_port

    rules = tmp_path / "rules.yaml"
    rules.write_text("default:\n  - a.ns-1.svc.cluster.local\n")
    admin = free_port()

    def static() -> list[str]:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/debug/workloads", timeout=5) as r:
            rows = json.loads(r.read())
        return next(row["static"] for row in rows if row["workload"] == "ns-0/app")

    def replace(text: str) -> None:
        staged = tmp_path / "rules.new"
        staged.write_text(text)
        os.replace(staged, rules)

    async with running_sim(generate(10)) as sim:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "xdsproxy.cli", "serve",
                "--upstream", f"127.0.0.1:{sim.port}", "--upstream-plaintext",
                "--listen", "127.0.0.1:0", "--debug-listen", "", "--admin-listen",
                f"127.0.0.1:{admin}", "--mode", "lazy", "--egress", "e.ns.svc.cluster.local:80",
                "--store", "memory://", "--als-listen", "127.0.0.1:0", "--rules", str(rules),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        try:
            port = await _port_from_log(process)
            client = AdsClient(port)
            await client.send(sotw_request(with_node=True))
            await client.recv()
            first = await eventually(lambda: static(), timeout=10)
            rules.write_text("default:\n  - b.ns-2.svc.cluster.local\n")
            process.send_signal(signal.SIGHUP)
            second = await eventually(lambda: (s := static()) != first and s, timeout=10)
            rules.write_text("default: [[[\n")
            process.send_signal(signal.SIGHUP)
            await asyncio.sleep(1.0)
            assert process.poll() is None and static() == second
            replace("default:\n  - c.ns-3.svc.cluster.local\n")  # no signal: a ConfigMap update
            third = await eventually(
                lambda: (s := static()) not in (first, second) and s, timeout=10
            )
            assert len({str(first), str(second), str(third)}) == 3
            await client.close()
        finally:
            process.terminate()
            _, stderr = await asyncio.to_thread(process.communicate, timeout=15)
        assert "keeping the previous rules" in stderr and str(rules) in stderr
