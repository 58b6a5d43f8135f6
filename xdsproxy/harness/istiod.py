"""Istio's own Istiod on loopback, for tests: the program in `istiod/` (Go), which runs the
istio.io/istio module's config generator and xDS server (`pilot/test/xds`) over an in-memory
Kubernetes client. Real Istio config and push logic; the Kubernetes API server is the only
stand-in. `make istiod` builds it (`build/istiod/istiod`); `IstiodProcess` starts it, feeds it
YAML and stops it.
"""

import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BINARY = Path(os.environ.get("XDSPROXY_ISTIOD", ROOT / "build" / "istiod" / "istiod"))


class IstiodMissing(RuntimeError):
    """The Go program is not built."""


def binary() -> Path:
    if not BINARY.is_file():
        raise IstiodMissing(f"{BINARY} is not built: run `make istiod` (needs Go 1.26)")
    return BINARY


# Upstream Envoy lacks istio-proxy's own filters, which Istiod adds unless told not to: the
# metadata exchange (cluster filter `envoy.tcp.metadataexchange.config.MetadataExchange`, HTTP
# filter `io.istio.http.peer_metadata.Config`) and the ALPN override on outbound HTTP
# (`istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig`). Without them (and with an SDS
# server for the workload certificate), stock Envoy 1.40 accepts every type Istiod sends.
FOR_STOCK_ENVOY = {"PILOT_ENABLE_METADATA_EXCHANGE": "false", "PILOT_ENABLE_ALPN_FILTER": "false"}


class IstiodProcess:
    """One Istiod. `yaml` is loaded at start (Kubernetes Services, EndpointSlices, Pods and
    Namespaces, and Istio's kinds); `apply` and `delete` change it later, as the API server
    would. Ports: `ads_port` (plaintext ADS), `control_port` (the YAML control API)."""

    def __init__(
        self, yaml: str = "", ads_port: int = 0, env: dict[str, str] | None = None
    ) -> None:
        self.yaml = yaml
        self.ads_port = ads_port
        self.env = env or {}  # Istio's feature flags (PILOT_*), read at start
        self.control_port = 0
        self.process: subprocess.Popen | None = None
        self._dir = tempfile.mkdtemp(prefix="istiod-")
        self._stderr = open(Path(self._dir) / "stderr.log", "w+b")  # noqa: SIM115

    def start(self, timeout: float = 60.0) -> "IstiodProcess":
        config = Path(self._dir) / "config"
        config.mkdir(exist_ok=True)
        (config / "mesh.yaml").write_text(self.yaml)
        self.process = subprocess.Popen(
            [
                str(binary()),
                "--listen",
                f"127.0.0.1:{self.ads_port}",
                "--config",
                str(config),
            ],
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env={**os.environ, **self.env},
        )
        deadline = time.monotonic() + timeout
        assert self.process.stdout is not None
        line = ""
        while time.monotonic() < deadline and self.process.poll() is None:
            line = self.process.stdout.readline()
            if line.startswith("READY "):
                break
        if not line.startswith("READY "):
            self.stop()
            raise RuntimeError(f"istiod did not start: {self.log()[-2000:]}")
        fields = dict(part.split("=", 1) for part in line.split()[1:])
        self.ads_port = int(fields["ads"].rsplit(":", 1)[1])
        self.control_port = int(fields["control"].rsplit(":", 1)[1])
        return self

    def log(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def _post(self, path: str, yaml: str) -> None:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.control_port}{path}", data=yaml.encode(), method="POST"
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()

    def apply(self, yaml: str) -> None:
        """Create or update the objects, as `kubectl apply` would."""
        self._post("/apply", yaml)

    def delete(self, yaml: str) -> None:
        self._post("/delete", yaml)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        if self.process is not None and self.process.stdout is not None:
            self.process.stdout.close()
        self._stderr.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> "IstiodProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
