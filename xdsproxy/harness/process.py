"""`xdsproxy serve` as a real child process, for restart and signal tests."""

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from xdsproxy.harness.envoy import terminate
from xdsproxy.harness.http import free_port


class ProxyProcess:
    """A child `xdsproxy serve` on fixed loopback ports, so a restart keeps its address."""

    def __init__(
        self, *args: str, port: int | None = None, env: dict[str, str] | None = None
    ) -> None:
        self.args = args
        self.env = env
        self.debug_port = free_port()
        self.admin_port = free_port()
        self.port = port or free_port()
        self.log = Path(tempfile.mkstemp(prefix="xdsproxy-", suffix=".log")[1])
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> "ProxyProcess":
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "xdsproxy.cli",
                    "serve",
                    "--listen",
                    f"127.0.0.1:{self.port}",
                    "--debug-listen",
                    f"127.0.0.1:{self.debug_port}",
                    "--admin-listen",
                    f"127.0.0.1:{self.admin_port}",
                    *self.args,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env={**os.environ, **(self.env or {})},
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"xdsproxy exited: {self.log.read_text()[-2000:]}")
            channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
            try:
                grpc.channel_ready_future(channel).result(timeout=0.2)
                return self
            except grpc.FutureTimeoutError:
                pass
            finally:
                channel.close()
        raise TimeoutError(f"xdsproxy did not listen: {self.log.read_text()[-2000:]}")

    def kill(self) -> None:
        """SIGKILL: no shutdown path runs."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        terminate(self.process)
