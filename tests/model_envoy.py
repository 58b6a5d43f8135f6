"""A model Envoy for the pure protocol tests, and a loop that joins it to a stream state machine
and the simulated Istiod's pure connection. No sockets, no asyncio: bytes in, bytes out.

The model does what real Envoy does that the protocol rules depend on:
- it applies SotW responses as the whole set of a type, Delta ones as changes;
- a new EDS cluster warms until a ClusterLoadAssignment for it arrives;
- it subscribes EDS for its EDS clusters and RDS for the tables its listeners name;
- a reconnect re-requests every type at once, with the versions (SotW) or the resources
  (Delta, `initial_resource_versions`) it holds;
- it can be told to reject (NACK) a resource; like Envoy 1.40, it still applies the valid
  resources and removals of a CDS or LDS response it NACKs (DESIGN.md), and nothing of others;
- it holds the lazy egress's caller routes (SRDS, a whole-set type in SotW) when it watches them.

The checker flags what Envoy would turn into failed requests or stale config (each rule is in
docs/protocol.md): a listener or route that names a cluster Envoy lacks or is still warming, a
cluster removed while a held listener or route names it, and (at the end) an upstream response
never answered.
"""

import asyncio
from dataclasses import dataclass, field

import grpc
from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.config.endpoint.v3.endpoint_pb2 import ClusterLoadAssignment
from envoy.config.listener.v3.listener_pb2 import Listener
from envoy.config.route.v3.route_pb2 import RouteConfiguration
from envoy.config.route.v3.scoped_route_pb2 import ScopedRouteConfiguration
from envoy.service.discovery.v3.discovery_pb2 import (
    DeltaDiscoveryRequest,
    DeltaDiscoveryResponse,
    DiscoveryRequest,
    DiscoveryResponse,
)
from google.protobuf.any_pb2 import Any

from tests.xds_messages import receive_upstream
from xdsproxy.harness.ads import AdsClient
from xdsproxy.scope.listeners import listener_refs
from xdsproxy.scope.routes import route_clusters
from xdsproxy.sim.istiod import DeltaConnection, SotwConnection
from xdsproxy.wire import typeurls
from xdsproxy.xds.delta import DeltaStream
from xdsproxy.xds.events import AckedHere, SendDownstream, SendUpstream
from xdsproxy.xds.sotw import SotwStream

CDS, EDS, LDS, RDS = typeurls.CLUSTER, typeurls.ENDPOINT, typeurls.LISTENER, typeurls.ROUTE
SRDS = typeurls.SCOPED_ROUTE
ORDER = (CDS, EDS, LDS, RDS)
# Types Envoy 1.40 applies in part when it NACKs a response (the valid resources, the removals)
PARTLY_APPLIED = frozenset({CDS, LDS})


def _is_eds(body: bytes) -> bool:
    cluster = Cluster()
    Any.FromString(body).Unpack(cluster)
    return cluster.type == Cluster.EDS


@dataclass
class ModelEnvoy:
    node: object
    delta: bool
    reject: set[str] = field(default_factory=set)  # names it NACKs
    held: dict[str, dict[str, bytes]] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    warming: set[str] = field(default_factory=set)
    subscribed: dict[str, set[str]] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    nacks: int = 0
    removals: list[tuple[str, str]] = field(default_factory=list)  # (type URL, name), in order

    # -- requests --------------------------------------------------------------------------

    def _request(self, type_url: str, names=(), nonce="", first=False, error="") -> bytes:
        if self.delta:
            request = DeltaDiscoveryRequest(type_url=type_url, response_nonce=nonce)
            request.resource_names_subscribe.extend(names)
            if first and self.held.get(type_url):
                request.initial_resource_versions.update(dict.fromkeys(self.held[type_url], "1"))
        else:
            request = DiscoveryRequest(
                type_url=type_url,
                response_nonce=nonce,
                version_info=self.versions.get(type_url, ""),
                resource_names=sorted(self.subscribed.get(type_url, ())),
            )
        if error:
            request.error_detail.message = error
        if first and type_url == CDS:
            request.node.CopyFrom(self.node)
        return request.SerializeToString()

    def connect(self) -> list[bytes]:
        """A fresh Envoy asks CDS first; LDS once CDS has been answered."""
        return [self._request(CDS, first=True)]

    def watch(self, type_url: str) -> bytes:
        """A wildcard watch of a type (the egress asks SRDS once its listener names it)."""
        self.subscribed[type_url] = set()
        return self._request(type_url, first=True)

    def reconnect(self) -> list[bytes]:
        """Every type it holds or watches, at once (the ADS mux on a new stream)."""
        out = [self._request(CDS, first=True)]
        for type_url in (EDS, LDS, RDS):
            if type_url in self.subscribed or type_url in self.held:
                names = sorted(self.subscribed.get(type_url, ())) if self.delta else ()
                out.append(self._request(type_url, names, first=True))
        return out

    # -- responses -------------------------------------------------------------------------

    def on_response(self, data: bytes) -> list[bytes]:
        if self.delta:
            response = DeltaDiscoveryResponse.FromString(data)
            updates = {r.name: r.resource.SerializeToString() for r in response.resources}
            removed = set(response.removed_resources)
        else:
            response = DiscoveryResponse.FromString(data)
            updates = {}
            for resource in response.resources:
                body = resource.SerializeToString()
                updates[_name(response.type_url, body)] = body
            # SotW CDS, LDS and SRDS are the whole set; EDS and RDS keep what a response
            # leaves out.
            full = response.type_url in (CDS, LDS, SRDS)
            removed = set(self.held.get(response.type_url, {})) - set(updates) if full else set()
        type_url = response.type_url
        if type_url in (EDS, RDS):
            # Envoy takes only what it watches of a type that is no wildcard: a response
            # crossing its unsubscribe brings nothing back.
            watched = self.subscribed.get(type_url, set())
            updates = {n: b for n, b in updates.items() if n in watched}
        bad = sorted(set(updates) & self.reject)
        if bad:
            self.nacks += 1
            error = f"rejected {bad}"
            nack = self._request(type_url, nonce=response.nonce, error=error)
            if type_url not in PARTLY_APPLIED:
                return [nack]
            good = {n: b for n, b in updates.items() if n not in self.reject}
            return [nack, *self._hold(type_url, good, removed)]
        self.versions[type_url] = getattr(response, "version_info", "") or "d"
        out = self._hold(type_url, updates, removed)
        ack = self._request(type_url, nonce=response.nonce)
        return [ack, *out]

    def _hold(self, type_url: str, updates: dict[str, bytes], removed: set[str]) -> list[bytes]:
        held = self.held.setdefault(type_url, {})
        added = set(updates) - set(held)
        held.update(updates)
        for name in removed:
            if held.pop(name, None) is not None:
                self.removals.append((type_url, name))
        return self._apply(type_url, set(updates), removed, added)

    def _apply(
        self, type_url: str, updated: set[str], removed: set[str], added: set[str]
    ) -> list[bytes]:
        out: list[bytes] = []
        if type_url == CDS:
            for name in removed:
                self.warming.discard(name)
                users = self._named_by_config()
                if name in users:
                    self.violations.append(f"cluster {name} removed while {users[name]} names it")
            # A new EDS cluster warms until its endpoints arrive; an updated one warms too, but
            # its old version serves meanwhile, as in Envoy: no request meets it.
            fresh = {n for n in added if _is_eds(self.held[CDS][n])}
            self.warming |= fresh - set(self.held.get(EDS, {}))
            wanted = {n for n in self.held[CDS] if _is_eds(self.held[CDS][n])}
            out += self._subscribe(EDS, wanted)
            if LDS not in self.subscribed and LDS not in self.held:
                self.subscribed[LDS] = set()
                out.append(self._request(LDS, first=True))
        elif type_url == EDS:
            self.warming -= updated
        elif type_url == LDS:
            tables = set()
            for body in self.held[LDS].values():
                tables |= listener_refs(body).route_tables
            out += self._subscribe(RDS, tables)
        self._check()
        return out

    def _subscribe(self, type_url: str, wanted: set[str]) -> list[bytes]:
        current = self.subscribed.setdefault(type_url, set())
        if wanted == current:
            return []
        added = sorted(wanted - current)
        self.subscribed[type_url] = set(wanted)
        # Envoy drops what it stops watching: a route table no listener names, the endpoints of
        # a cluster it no longer has.
        held = self.held.get(type_url, {})
        for name in sorted(current - wanted):
            held.pop(name, None)
        if self.delta:
            request = DeltaDiscoveryRequest(type_url=type_url)
            request.resource_names_subscribe.extend(added)
            request.resource_names_unsubscribe.extend(sorted(current - wanted))
            return [request.SerializeToString()]
        return [self._request(type_url)]

    def _named_by_config(self) -> dict[str, str]:
        named: dict[str, str] = {}
        for name, body in self.held.get(LDS, {}).items():
            for cluster in listener_refs(body).clusters:
                named.setdefault(cluster, f"listener {name}")
        for name, body in self.held.get(RDS, {}).items():
            table = RouteConfiguration()
            Any.FromString(body).Unpack(table)
            for cluster in _table_clusters(table):
                named.setdefault(cluster, f"route table {name}")
        for name, body in self.held.get(SRDS, {}).items():
            scope = ScopedRouteConfiguration()
            Any.FromString(body).Unpack(scope)
            for cluster in _table_clusters(scope.route_configuration):
                named.setdefault(cluster, f"caller route {name}")
        return named

    def _check(self) -> None:
        clusters = self.held.get(CDS, {})
        for cluster, user in self._named_by_config().items():
            if cluster not in clusters and cluster.startswith("outbound|"):
                self.violations.append(f"{user} names {cluster}, which Envoy does not have")
            elif cluster in self.warming:
                self.violations.append(f"{user} names {cluster}, which is still warming")


def _table_clusters(table: RouteConfiguration) -> set[str]:
    return {
        c for vhost in table.virtual_hosts for route in vhost.routes for c in route_clusters(route)
    }


def _name(type_url: str, body: bytes) -> str:
    """Field 1 of every resource type here (name, or cluster_name for EDS)."""
    message = _MESSAGES[type_url]()
    Any.FromString(body).Unpack(message)
    return message.cluster_name if type_url == EDS else message.name


_MESSAGES = {
    CDS: Cluster,
    EDS: ClusterLoadAssignment,
    LDS: Listener,
    RDS: RouteConfiguration,
    SRDS: ScopedRouteConfiguration,
}


@dataclass
class Loop:
    """Envoy, one xdsproxy stream and one Istiod connection, run until nothing moves."""

    envoy: ModelEnvoy
    stream: SotwStream | DeltaStream
    istiod: SotwConnection | DeltaConnection
    to_proxy: list[bytes] = field(default_factory=list)  # from Envoy
    from_istiod: list[bytes] = field(default_factory=list)

    def run(self, limit: int = 10_000) -> None:
        for _ in range(limit):
            if self.to_proxy:
                self.handle(self.stream.receive_downstream(self.to_proxy.pop(0)))
            elif self.from_istiod:
                self.handle(receive_upstream(self.stream, self.from_istiod.pop(0)))
            else:
                return
        raise AssertionError("the loop never settled")

    def handle(self, events) -> None:
        for event in events:
            if isinstance(event, SendDownstream):
                self.to_proxy += self.envoy.on_response(event.payload)
            elif isinstance(event, SendUpstream | AckedHere):
                self.from_istiod += self.istiod.receive(event.payload)

    def push(self, snapshot) -> None:
        """Istiod pushes a new generation of the mesh."""
        self.from_istiod += self.istiod.push(snapshot)
        self.run()


class GrpcLoop:
    """The model Envoy on a real gRPC ADS stream (to xdsproxy or to Istiod itself): each
    response it gets, it applies and answers, as Envoy would."""

    def __init__(self, envoy: ModelEnvoy, port: int) -> None:
        self.envoy = envoy
        self.port = port
        self.responses = 0
        self.ended: asyncio.Event = asyncio.Event()
        self._client: AdsClient | None = None
        self._task: asyncio.Task | None = None

    def start(self, requests: list[bytes] | None = None) -> "GrpcLoop":
        """A fresh Envoy's first request, or `requests` (a reconnect's)."""
        self.ended.clear()
        self._client = AdsClient(self.port, self.envoy.delta)
        self._task = asyncio.create_task(self._run(self._client, requests or self.envoy.connect()))
        return self

    async def _run(self, client: AdsClient, requests: list[bytes]) -> None:
        try:
            for request in requests:
                await client.send(request)
            while (data := await client.call.read()) is not grpc.aio.EOF:
                self.responses += 1
                for out in self.envoy.on_response(data):
                    await client.send(out)
        except grpc.aio.AioRpcError:
            pass  # the stream ended: Envoy keeps what it holds
        finally:
            self.ended.set()

    async def quiet(self, seconds: float = 0.5, timeout: float = 30.0) -> None:
        """Until no response has come for `seconds`."""
        async with asyncio.timeout(timeout):
            while True:
                seen = self.responses
                await asyncio.sleep(seconds)
                if self.responses == seen:
                    return

    async def reconnect(self, port: int | None = None) -> None:
        """What Envoy does when its stream ends: a new one, re-requesting all it holds."""
        await self.close()
        self.port = port or self.port
        self.start(self.envoy.reconnect())

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
        if self._task is not None:
            await asyncio.wait({self._task}, timeout=5)
