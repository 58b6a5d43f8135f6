"""The `xdsproxy serve` process: the downstream gRPC server around `AdsProxy`."""

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc

from xdsproxy.debug.http import DebugServer, Readiness
from xdsproxy.debug.metrics import Metrics
from xdsproxy.debug.model import DebugModel
from xdsproxy.istio.names import ServicePort
from xdsproxy.learn.pods import PodDirectory
from xdsproxy.scope.compact import CompactMode, MeshRanges
from xdsproxy.scope.egress import EgressSettings
from xdsproxy.scope.failopen import FailOpen
from xdsproxy.scope.rules import Rules, RulesError, load_rules
from xdsproxy.server.ads import AdsProxy, Limits
from xdsproxy.server.als import AlsService
from xdsproxy.server.grpcio import ads_handler, message_options, server_keepalive
from xdsproxy.server.heap import HeapTrimmer
from xdsproxy.server.lazy import LazyRuntime
from xdsproxy.server.podwatch import PodWatch
from xdsproxy.server.servicecidrs import service_cidrs
from xdsproxy.server.tlsfiles import WatchedFiles, server_credentials
from xdsproxy.server.upstream import Channels, Upstream, UpstreamProbe
from xdsproxy.store.base import open_store

log = logging.getLogger("xdsproxy.serve")
# gRPC sets SO_REUSEPORT by default, so a second process on the same port would start and
# share the traffic: a stale replica or a typo'd port must fail instead.
_EXCLUSIVE_PORT = [("grpc.so_reuseport", 0)]


class AddressInUse(OSError):
    """A listen address could not be bound; the message names the flag."""


def _bind(server: grpc.aio.Server, flag: str, address: str, credentials=None) -> int:
    try:
        if credentials is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, credentials)
    except RuntimeError:  # gRPC says only "Failed to bind to address"
        raise AddressInUse(
            f"{flag} {address}: address in use or not available; stop the process holding it "
            "or choose another port"
        ) from None


@dataclass(frozen=True)
class ServeConfig:
    upstream: str
    listen: str = "127.0.0.1:15010"
    listen_tls: str = ""  # a second, TLS listener (with cert and key), e.g. 0.0.0.0:15012
    upstream_ca: Path | None = None
    upstream_sni: str = ""
    cert: Path | None = None
    key: Path | None = None
    max_message_bytes: int = -1
    max_pending_bytes: int = 128 * 1024 * 1024
    pause_upstream_bytes: int = 1024 * 1024
    upstream_connections: int = 0  # 0: a connection per sidecar, as without xdsproxy
    shutdown_grace_seconds: float = 5.0
    mode: str = "passthrough"
    egress: ServicePort | None = None
    egress_settings: EgressSettings = field(default_factory=EgressSettings)
    als_listen: str = "127.0.0.1:15020"
    als_allow: tuple[str, ...] = ()
    rules: Rules | None = None
    rules_file: Path | None = None  # re-read on SIGHUP and when it changes
    # Out-of-scope TCP and sniffed services, per listener kind: "placeholders" or "compact"
    # (see scope/compact.py; "auto": compact once the ranges are given); compact mode's mesh
    # ranges, else derived from the VIPs.
    lazy_tcp: str = "auto"
    lazy_sniffed: str = "placeholders"
    service_cidrs: tuple[str, ...] = ()
    store: str = "memory://"
    ttl_seconds: float = 0.0
    flush_seconds: float = 10.0
    usage_sample_percent: float = 0.0
    usage_flush_seconds: int = 30
    debug_listen: str = ""  # health, readiness, metrics; off unless set (CLI: 127.0.0.1:15014)
    replica: str = ""  # this replica's name in `xdsproxy status` (the pod name in a cluster)
    admin_listen: str = ""  # those and every node's config; off unless set (CLI: 127.0.0.1:15015)
    admin_writes: bool = False  # `xdsproxy scope add|forget` on admin_listen (loopback only)
    fail_open: str = "never"  # or "auto": see scope/failopen.py
    fail_open_hold_down: float = 60.0
    kube_client: Any = None  # a kubernetes.client.ApiClient (tests); else in-cluster/kubeconfig


def compact_mode(config: ServeConfig) -> CompactMode | None:
    """Compact for TCP when asked, or by default once the service ranges are known: given with
    --service-cidr, or read from the Kubernetes ServiceCIDR API where the store is Kubernetes
    (deriving them from VIPs could sweep in non-service addresses, so `auto` never does). For
    sniffed ports only when asked, since their first-contact HTTP then loses L7 (docs/lazy.md)."""
    known = bool(config.service_cidrs) or config.store.startswith("kubernetes://")
    tcp = config.lazy_tcp == "compact" or (config.lazy_tcp == "auto" and known)
    sniffed = config.lazy_sniffed == "compact"
    if not (tcp or sniffed):
        return None
    asked = "compact" in (config.lazy_tcp, config.lazy_sniffed)
    return CompactMode(MeshRanges(config.service_cidrs, derive=asked), tcp=tcp, sniffed=sniffed)


class ProxyServer:
    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        ca = WatchedFiles(config.upstream_ca) if config.upstream_ca else None
        upstream = Upstream(config.upstream, ca, config.upstream_sni, config.max_message_bytes)
        self.metrics = Metrics()
        self.probe = UpstreamProbe(upstream)
        self.runtime: LazyRuntime | None = None
        self.pod_watch: PodWatch | None = None
        if config.mode == "lazy":
            if config.egress is None:
                raise ValueError("lazy mode needs the egress service (--egress FQDN:PORT)")
            pods = None
            if config.store.startswith("kubernetes://"):
                # Replicas share state: any of them may receive any sidecar's access logs.
                pods = PodDirectory()
                self.pod_watch = PodWatch(pods, config.kube_client)
            compact = compact_mode(config)
            self.runtime = LazyRuntime(
                config.egress,
                config.egress_settings,
                config.rules,
                config.als_allow,
                store=open_store(config.store, config.kube_client),
                ttl=config.ttl_seconds,
                flush_interval=config.flush_seconds,
                usage_sample_percent=config.usage_sample_percent,
                usage_flush_seconds=config.usage_flush_seconds,
                metrics=self.metrics,
                pods=pods,
                fail_open=FailOpen(config.fail_open, config.fail_open_hold_down),
                compact=compact,
                replica=config.replica,
            )
        self.channels = Channels(upstream, config.upstream_connections)
        self.proxy = AdsProxy(
            self.channels,
            self.runtime,
            Limits(config.max_pending_bytes, config.pause_upstream_bytes),
            self.metrics,
        )
        self.metrics.watch_sync_states(
            lambda: (
                (type_url, status.state)
                for session in self.proxy.sessions.values()
                for type_url, status in session.stream.status().items()
            )
        )
        self.port = 0
        self.tls_port = 0
        self.als_port = 0
        self._server: grpc.aio.Server | None = None
        self._als: grpc.aio.Server | None = None
        self._probing: asyncio.Task[None] | None = None
        self._rules_watch: asyncio.Task[None] | None = None
        self.heap = HeapTrimmer()
        self._trimming: asyncio.Task[None] | None = None
        self.debug: DebugServer | None = None
        self.admin: DebugServer | None = None

    def _readiness(self) -> Readiness:
        def store() -> tuple[bool, str]:
            if self.runtime is None or self.runtime.store_healthy:
                return True, ""
            return False, "the store is not loaded or not writable"

        def upstream() -> tuple[bool, str]:
            return self.probe.reachable, self.probe.last_error

        def egress() -> tuple[bool, str]:
            problem = self.runtime.egress_problem() if self.runtime is not None else ""
            return not problem, problem

        return Readiness({"store": store, "upstream": upstream, "egress": egress})

    async def start(self) -> int:
        """Serve, or raise having stopped whatever had started: a process that cannot serve
        must exit rather than answer health checks."""
        try:
            return await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> int:
        if self.runtime is not None:
            await self.runtime.start()  # scopes come back before anything is served
        if self.pod_watch is not None:
            await self.pod_watch.start()
        compact = self.runtime.compact if self.runtime is not None else None
        if (
            compact is not None
            and not compact.ranges.networks
            and self.config.store.startswith("kubernetes://")
        ):
            cidrs = await asyncio.to_thread(service_cidrs, self.config.kube_client)
            compact.ranges.configure(cidrs, "the Kubernetes ServiceCIDR API")
        if self.runtime is not None and self.config.rules_file is not None:
            self._rules_watch = asyncio.create_task(self._watch_rules(self.config.rules_file))
        self._probing = asyncio.create_task(self.probe.run())
        self._trimming = asyncio.create_task(self.heap.run())
        if self.config.debug_listen:
            # What the kubelet and Prometheus read; exposed by the Service.
            self.debug = await self._debug_server("--debug-listen", self.config.debug_listen, None)
        if self.config.admin_listen:
            # Every sidecar's config as well: loopback unless the operator says otherwise.
            model = DebugModel(self.proxy, self.runtime, self.config.replica, self.config.upstream)
            self.admin = await self._debug_server(
                "--admin-listen", self.config.admin_listen, model, self.config.admin_writes
            )
        if self.runtime is not None:
            # The ALS endpoint first: the config pushed to Envoys names its port.
            als = grpc.aio.server(
                options=message_options(self.config.max_message_bytes) + _EXCLUSIVE_PORT
            )
            als.add_generic_rpc_handlers((AlsService(self.runtime).handler(),))
            self._als = als
            self.als_port = _bind(als, "--als-listen", self.config.als_listen)
            if self.runtime.settings.als_port == 0:  # a kernel-chosen port (tests)
                self.runtime.settings = replace(self.runtime.settings, als_port=self.als_port)
            await als.start()
            log.info("serving ALS", extra={"listen": self.config.als_listen, "port": self.als_port})
        server = grpc.aio.server(
            options=message_options(self.config.max_message_bytes)
            + server_keepalive()
            + _EXCLUSIVE_PORT
        )
        server.add_generic_rpc_handlers((ads_handler(self.proxy.sotw, self.proxy.delta),))
        self._server = server
        credentials = None
        if self.config.cert and self.config.key:
            credentials = server_credentials(self.config.cert, self.config.key)
        if credentials is not None and not self.config.listen_tls:
            self.port = _bind(server, "--listen", self.config.listen, credentials)
        else:
            self.port = _bind(server, "--listen", self.config.listen)
        if self.config.listen_tls:
            assert credentials is not None, "--listen-tls needs --cert and --key"
            self.tls_port = _bind(server, "--listen-tls", self.config.listen_tls, credentials)
        await server.start()
        log.info(
            "serving ADS",
            extra={
                "listen": self.config.listen,
                "port": self.port,
                "upstream": self.config.upstream,
            },
        )
        return self.port

    def reload_rules(self) -> None:
        """Re-read `--rules` (SIGHUP, or the file changed); a bad file keeps the rules in
        force and says why in one line."""
        path = self.config.rules_file
        if self.runtime is None or path is None:
            return
        try:
            rules = load_rules(path)
        except RulesError as exc:
            log.warning("keeping the previous rules", extra={"error": str(exc)})
            return
        for warning in rules.warnings:
            log.warning("rules: %s", warning)
        self.runtime.set_rules(rules)
        log.info("rules reloaded", extra={"file": str(path)})

    async def _watch_rules(self, path: Path, interval: float = 2.0) -> None:
        """A mounted ConfigMap is updated by a symlink swap: poll for it."""
        files = WatchedFiles(path)
        files.changed()
        while True:
            await asyncio.sleep(interval)
            if files.changed():
                self.reload_rules()

    async def _debug_server(
        self, flag: str, listen: str, model: DebugModel | None, writes: bool = False
    ) -> DebugServer:
        server = DebugServer(listen, self.metrics.registry, self._readiness(), model, writes)
        try:
            await server.start()
        except OSError as exc:
            raise AddressInUse(
                f"{flag} {listen}: {exc.strerror or exc}; choose another address"
            ) from None
        log.info("serving debug", extra={"flag": flag, "listen": listen, "port": server.port})
        return server

    async def stop(self) -> None:
        """Stop accepting, end every stream with UNAVAILABLE, then close. Safe after a start
        that failed part way."""
        self.proxy.shutdown()
        if self._als is not None:
            await self._als.stop(0)
            self._als = None
        if self._server is not None:
            await self._server.stop(self.config.shutdown_grace_seconds)
            self._server = None
        await self.channels.close()
        if self.pod_watch is not None:
            await self.pod_watch.stop()
        if self.runtime is not None:
            await self.runtime.stop()
        for task in (self._probing, self._trimming, self._rules_watch):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._probing = self._trimming = self._rules_watch = None
        for server in (self.debug, self.admin):
            if server is not None:
                await server.stop()
        self.debug = self.admin = None


async def run(config: ServeConfig) -> None:
    server = ProxyServer(config)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, server.reload_rules)
    await stop.wait()
    log.info("shutting down")
    await server.stop()
