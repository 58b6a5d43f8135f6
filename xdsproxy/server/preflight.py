"""Checks run before serving (and alone by `xdsproxy serve --check`): every flag, file and URL
that would otherwise fail later, less clearly, or not at all while the process looks healthy.

Each failure is one `ConfigError` line naming the flag or file and what to do about it.
"""

import ipaddress
import sqlite3
import ssl
from pathlib import Path

from xdsproxy.store.base import open_store


class ConfigError(ValueError):
    """A flag, file or URL that cannot work; the message names it and the fix."""


def check_address(flag: str, value: str) -> None:
    """HOST:PORT with a port in 0..65535 (0: the kernel chooses)."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"{flag} {value!r}: expected HOST:PORT, e.g. 0.0.0.0:15010")


def check_admin_writes(admin_listen: str) -> None:
    """Scope writes change what every sidecar of a workload gets: loopback only, reached with
    `kubectl port-forward` or from inside the pod."""
    host = admin_listen.rpartition(":")[0].strip("[]")
    if not admin_listen:
        raise ConfigError("--admin-writes needs --admin-listen on loopback, e.g. 127.0.0.1:15015")
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise ConfigError(
            f"--admin-writes: --admin-listen {admin_listen!r} is not loopback; scope writes are "
            "served on loopback only (reach them with kubectl port-forward)"
        )


def check_cidrs(flag: str, values: tuple[str, ...]) -> None:
    for value in values:
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError as exc:
            raise ConfigError(f"{flag} {value!r}: not a network ({exc})") from None


def check_ca(flag: str, path: Path) -> None:
    """A root CA file that TLS can use: PEM with at least one certificate."""
    try:
        ssl.create_default_context(cafile=str(path))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"{flag} {path}: not a usable PEM CA bundle ({exc}); give the mesh root, "
            "e.g. root-cert.pem from the istio-ca-root-cert ConfigMap"
        ) from None


def check_key_pair(cert: Path, key: Path) -> None:
    """The serving certificate and key load and belong together (gRPC would only say that it
    failed to bind)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(str(cert), str(key))
    except ssl.SSLError as exc:
        mismatch = "KEY_VALUES_MISMATCH" in str(exc)
        reason = "the key does not match the certificate" if mismatch else str(exc)
        raise ConfigError(
            f"--cert {cert} / --key {key}: {reason}; give a PEM certificate and its own key"
        ) from None
    except OSError as exc:
        raise ConfigError(f"--cert {cert} / --key {key}: {exc}") from None


def check_store(url: str) -> None:
    """The store URL parses and its backend can be reached from here: a SQLite file that can
    be created and written, or a Kubernetes client configuration (in-cluster or kubeconfig)."""
    try:
        open_store(url)
    except ValueError as exc:
        raise ConfigError(f"--store: {exc}") from None
    scheme, _, rest = url.partition("://")
    if scheme == "sqlite":
        _check_sqlite(url, Path(rest))
    elif scheme == "kubernetes":
        _check_kubernetes(url)


def _check_sqlite(url: str, path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path)
        try:
            db.execute("BEGIN IMMEDIATE")  # takes the write lock: fails on a read-only file
            db.execute("ROLLBACK")
        finally:
            db.close()
    except (sqlite3.Error, OSError) as exc:
        raise ConfigError(
            f"--store {url}: cannot open {path} for writing ({exc}); mount a writable volume "
            "there or give another path, e.g. --store sqlite:///tmp/xdsproxy/edges.db"
        ) from None


def _check_kubernetes(url: str) -> None:
    from kubernetes import config

    from xdsproxy.store.kubernetes import api_client

    try:
        api_client().close()
    except (config.ConfigException, OSError) as exc:
        raise ConfigError(
            f"--store {url}: no Kubernetes client configuration ({exc}); run in a pod "
            "with a service account, or set KUBECONFIG"
        ) from None
