"""Certificates read from files that Kubernetes swaps in place (a mounted Secret or ConfigMap
is updated by a symlink swap): re-read when they change, so a renewal needs no restart; and one
clear line when Istiod's certificate cannot be verified.
"""

import logging
import os
import socket
import ssl
from pathlib import Path

import grpc

log = logging.getLogger("xdsproxy.tls")


class WatchedFiles:
    """The contents of some files, read again when any of them changes (by inode, size or
    modification time: a symlink swap changes the inode)."""

    def __init__(self, *paths: Path) -> None:
        self.paths = paths
        self._stamp: tuple = ()
        self._contents: tuple[bytes, ...] = ()

    def _stat(self) -> tuple:
        stamps = []
        for path in self.paths:
            info = os.stat(path)
            stamps.append((info.st_ino, info.st_size, info.st_mtime_ns))
        return tuple(stamps)

    def changed(self) -> bool:
        """Read the files again if they changed; True when they did."""
        try:
            stamp = self._stat()
        except OSError as exc:  # mid-swap, or gone: keep what was read last
            log.warning("cannot read certificate files", extra={"error": str(exc)})
            return False
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        self._contents = tuple(path.read_bytes() for path in self.paths)
        return True

    def contents(self) -> tuple[bytes, ...]:
        self.changed()
        return self._contents


def server_credentials(cert: Path, key: Path) -> grpc.ServerCredentials:
    """Serving credentials that pick up a renewed certificate at the next handshake; open
    streams keep theirs. A new pair that does not load is logged and the old one kept."""
    files = WatchedFiles(cert, key)
    cert_bytes, key_bytes = files.contents()
    initial = grpc.ssl_server_certificate_configuration([(key_bytes, cert_bytes)])

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        if not files.changed():
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(str(cert), str(key))
        except (ssl.SSLError, OSError) as exc:
            log.warning(
                "renewed certificate does not load; serving the previous one",
                extra={"cert": str(cert), "error": str(exc)},
            )
            return None
        new_cert, new_key = files.contents()
        log.info("serving certificate reloaded", extra={"cert": str(cert)})
        return grpc.ssl_server_certificate_configuration([(new_key, new_cert)])

    return grpc.dynamic_ssl_server_credentials(initial, fetch)


def verify_problem(target: str, ca: Path, server_name: str, timeout: float = 3.0) -> str:
    """Why Istiod's certificate at `target` does not verify against `ca` for `server_name`
    (or the host of `target`); empty when it does, or when Istiod cannot be reached at all
    (that is the probe's to report)."""
    host, _, port = target.rpartition(":")
    name = server_name or host
    try:
        context = ssl.create_default_context(cafile=str(ca))
        context.set_alpn_protocols(["h2"])
        with (
            socket.create_connection((host, int(port)), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=name),
        ):
            return ""
    except ssl.SSLCertVerificationError as exc:
        return (
            f"--upstream-ca {ca}: Istiod's certificate at {target} does not verify as {name!r}: "
            f"{exc.verify_message}; check the CA (the mesh root) and --upstream-sni"
        )
    except (OSError, ssl.SSLError, ValueError):
        return ""
