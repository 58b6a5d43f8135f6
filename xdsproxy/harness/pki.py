"""A throwaway certificate authority for loopback tests, made with the `openssl` command.

It issues what Istio's CA would: workload certificates whose identity is a SPIFFE URI SAN
(`spiffe://cluster.local/ns/NS/sa/SA`), and serving certificates with DNS and IP SANs.
"""

import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

TRUST_DOMAIN = "cluster.local"


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def spiffe_id(namespace: str, service_account: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/ns/{namespace}/sa/{service_account}"


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


class Authority:
    def __init__(self, directory: Path, name: str = "root") -> None:
        self.directory = directory
        self.name = name
        self.cert = directory / f"{name}-ca.pem"
        self.key = directory / f"{name}-ca.key"
        _openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", f"/O={TRUST_DOMAIN}/CN={name}",
            "-keyout", str(self.key), "-out", str(self.cert),
        )  # fmt: skip

    def issue(self, name: str, sans: list[str]) -> Issued:
        """A leaf certificate; `sans` in openssl's syntax (`URI:...`, `DNS:...`, `IP:...`)."""
        key = self.directory / f"{name}.key"
        csr = self.directory / f"{name}.csr"
        cert = self.directory / f"{name}.pem"
        ext = self.directory / f"{name}.ext"
        _openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
            "-keyout", str(key), "-out", str(csr),
        )  # fmt: skip
        ext.write_text(
            f"subjectAltName={','.join(sans)}\n"
            "extendedKeyUsage=serverAuth,clientAuth\n"
            "keyUsage=digitalSignature,keyEncipherment\n"
        )
        _openssl(
            "x509", "-req", "-in", str(csr), "-CA", str(self.cert), "-CAkey", str(self.key),
            "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(cert),
        )  # fmt: skip
        return Issued(cert, key)

    def workload(self, namespace: str, service_account: str) -> Issued:
        return self.issue(
            f"{namespace}.{service_account}", [f"URI:{spiffe_id(namespace, service_account)}"]
        )


def trusting_client(cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """A TLS client that trusts any server and presents `cert` if given: what a peer probing
    the egress would use (the egress, not this client, must refuse)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if cert and key:
        context.load_cert_chain(cert, key)
    return context
