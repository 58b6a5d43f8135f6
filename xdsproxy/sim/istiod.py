"""Istiod's side of one ADS connection, as pure protocol logic (no gRPC, no asyncio).

Behaviour copied from Istiod (pilot/pkg/xds): a new nonce per response; a request whose nonce is
not the last one sent for its type is ignored as stale; an ACK gets no answer unless it changes
the requested names; a NACK is recorded and not answered; wildcard CDS/LDS are answered even
when empty; versions look like `2026-11-22T10:00:00Z/42`; pushes go in the order CDS, EDS, LDS,
RDS; Delta resources carry an empty version, as Istiod's do. A Delta full push resends every
watched resource, changed or not, as Istiod's generators do outside their few incremental paths
(pilot/pkg/xds/delta.go: without `usedDelta`, everything generated is sent); an incremental EDS
push and a subscription change send only what they touch.
"""

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

from envoy.service.discovery.v3.discovery_pb2 import DeltaDiscoveryRequest, DiscoveryRequest
from google.protobuf.message import DecodeError, Message

from xdsproxy.istio.envoyconfig import pack
from xdsproxy.istio.node import IstioNode, NodeIdError, parse_node
from xdsproxy.sim import envoyconfig
from xdsproxy.sim.mesh import Mesh
from xdsproxy.wire import lean, typeurls
from xdsproxy.wire.codec import encode_delta_resource, encode_delta_response, encode_sotw_response


class IstiodError(Exception):
    """Ends the stream with a gRPC status, as Istiod does for a bad node or request."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Snapshot:
    """Serialized resources for one mesh generation, shared by every connection."""

    def __init__(
        self, mesh: Mesh, epoch: str, bind_address: str | None, proxy_protocol: bool = False
    ) -> None:
        self.mesh = mesh
        self.generation = mesh.generation
        self.version = f"{epoch}/{mesh.generation}"
        self.bind_address = bind_address
        self.proxy_protocol = proxy_protocol
        self._cache: dict[tuple[str, object], dict[str, bytes]] = {}
        self._wrapped: dict[tuple[str, object], dict[str, bytes]] = {}
        self._regions: dict[tuple, bytes] = {}

    def resources(self, type_url: str, node: IstioNode) -> dict[str, bytes]:
        """Name -> serialized Any, in Istiod's order, for what this node may see of the type."""
        key = self._key(type_url, node)
        if key is None:
            return {}
        cached = self._cache.get(key)
        if cached is None:
            cached = self._cache[key] = self._build(*key)
        return cached

    def region(self, type_url: str, node: IstioNode, names: tuple[str, ...], delta: bool) -> bytes:
        """The encoded `resources` field of a response carrying `names`: every node that is
        sent the same names shares one encoding, as Istiod shares its generated config, so
        the simulator's cost per response is a splice rather than a re-encode."""
        key = self._key(type_url, node)
        region_key = (key, names, delta)
        region = self._regions.get(region_key)
        if region is None:
            available = self.resources(type_url, node)
            if delta:
                wrapped = self._wrapped.setdefault(key, {})  # type: ignore[arg-type]
                bodies = [
                    wrapped.get(n) or wrapped.setdefault(n, encode_delta_resource(n, available[n]))
                    for n in names
                ]
            else:
                bodies = [available[n] for n in names]
            # `resources` is field 2 of both envelopes, encoded alike.
            region = lean.SotwResponse(resources=bodies).SerializeToString()
            if len(self._regions) >= 64:
                self._regions.clear()
            self._regions[region_key] = region
        return region

    def _key(self, type_url: str, node: IstioNode) -> tuple[str, object] | None:
        if type_url in (typeurls.CLUSTER, typeurls.ENDPOINT):
            return type_url, None
        if type_url == typeurls.LISTENER:
            return type_url, self._listener_ports(node)
        if type_url == typeurls.ROUTE:
            return type_url, node.namespace
        return None

    def with_endpoints(self, mesh: Mesh, fqdns: set[str]) -> "Snapshot":
        """The next generation after an endpoint-only change of `fqdns`: everything but their
        load assignments is carried over, so a change costs what it touches, not the mesh."""
        following = Snapshot(
            mesh, self.version.split("/")[0], self.bind_address, self.proxy_protocol
        )
        following._cache = dict(self._cache)
        following._wrapped = dict(self._wrapped)
        key = (typeurls.ENDPOINT, None)
        if key in self._cache:
            changed = Mesh(services={f: mesh.services[f] for f in fqdns if f in mesh.services})
            assignments = {a.cluster_name: pack(a) for a in envoyconfig.build_endpoints(changed)}
            following._cache[key] = {**self._cache[key], **assignments}
            following._wrapped[key] = {
                n: b for n, b in self._wrapped.get(key, {}).items() if n not in assignments
            }
        return following

    def _listener_ports(self, node: IstioNode) -> envoyconfig.ListenerPorts:
        config = node.proxy_config
        return envoyconfig.ListenerPorts(
            address=self.bind_address,
            outbound=int(config.get("proxyListenPort", 15001)),
            inbound=int(config.get("proxyInboundListenPort", 15006)),
            proxy_protocol=self.proxy_protocol,
        )

    def _build(self, type_url: str, key: object) -> dict[str, bytes]:
        if type_url == typeurls.CLUSTER:
            messages = [(c.name, c) for c in envoyconfig.build_clusters(self.mesh)]
        elif type_url == typeurls.ENDPOINT:
            messages = [(a.cluster_name, a) for a in envoyconfig.build_endpoints(self.mesh)]
        elif type_url == typeurls.LISTENER:
            assert isinstance(key, envoyconfig.ListenerPorts)
            messages = [(x.name, x) for x in envoyconfig.build_listeners(self.mesh, key)]
        else:
            assert isinstance(key, str)
            messages = [(r.name, r) for r in envoyconfig.build_routes(self.mesh, key)]
        return {name: pack(message) for name, message in messages}


@dataclass(slots=True)
class _Watch:
    nonce: str = ""
    names: tuple[str, ...] = ()
    wildcard: bool = False
    subscribed: set[str] = field(default_factory=set)
    sent: dict[str, bytes] = field(default_factory=dict)  # Delta: what the client holds
    nacks: int = 0
    acked: str = ""  # the newest nonce the client ACKed (Istiod's NonceAcked)


def epoch() -> str:
    """The time part of Istiod's version strings."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class _Connection:
    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self.node: IstioNode | None = None
        self.watches: dict[str, _Watch] = {}
        self.pushes = 0

    def _identify(self, request: Message) -> IstioNode:
        if self.node is None:
            if not request.HasField("node"):
                raise IstiodError("INVALID_ARGUMENT", "missing node information")
            try:
                self.node = parse_node(request.node)
            except NodeIdError as exc:
                raise IstiodError("INVALID_ARGUMENT", str(exc)) from None
        return self.node

    def synced(self) -> bool:
        """Every watched type has ACKed its newest response (`istioctl proxy-status`: SYNCED)."""
        return all(w.acked == w.nonce for w in self.watches.values())

    def _ordered(self) -> list[str]:
        return typeurls.push_order(list(self.watches))

    @staticmethod
    def _nonce() -> str:
        return str(uuid.uuid4())


class SotwConnection(_Connection):
    def receive(self, data: bytes) -> list[bytes]:
        try:
            request = DiscoveryRequest.FromString(data)
        except DecodeError as exc:
            raise IstiodError("INVALID_ARGUMENT", f"malformed request: {exc}") from None
        self._identify(request)
        type_url = request.type_url
        watch = self.watches.get(type_url)
        names = tuple(request.resource_names)
        if not names and not typeurls.is_wildcard_type(type_url):
            # Istiod's shouldUnsubscribe: a request naming nothing of a type that is no
            # wildcard drops the watch and is never answered (Envoy sends one for RDS after
            # losing its last route table).
            self.watches.pop(type_url, None)
            return []
        if watch is None or not request.response_nonce:
            watch = self.watches[type_url] = _Watch(names=names)
            return [self._respond(type_url, watch)]
        if request.response_nonce != watch.nonce:
            return []  # stale
        if request.HasField("error_detail"):
            watch.nacks += 1
            return []
        watch.acked = request.response_nonce
        if names != watch.names:
            # Istiod answers a subscription change with the newly subscribed resources only,
            # and a change that only removes names not at all (pushXds, `req.Delta`).
            before = set(watch.names)
            added = tuple(name for name in names if name not in before)
            watch.names = names
            return [self._respond(type_url, watch, added)] if added else []
        return []

    def push(self, snapshot: Snapshot) -> list[bytes]:
        self.snapshot = snapshot
        return [self._respond(t, self.watches[t]) for t in self._ordered()]

    def push_endpoints(self, snapshot: Snapshot, clusters: frozenset[str]) -> list[bytes]:
        """Istiod's incremental EDS push: only the changed load assignments this node watches
        (SotW allows a partial EDS response; Envoy keeps the others)."""
        self.snapshot = snapshot
        watch = self.watches.get(typeurls.ENDPOINT)
        if watch is None:
            return []
        changed = tuple(name for name in watch.names if name in clusters)
        return [self._respond(typeurls.ENDPOINT, watch, changed)] if changed else []

    def _respond(self, type_url: str, watch: _Watch, only: tuple[str, ...] | None = None) -> bytes:
        assert self.node is not None
        available = self.snapshot.resources(type_url, self.node)
        if only is not None:
            names = tuple(name for name in only if name in available)
        elif typeurls.is_wildcard_type(type_url) and not watch.names:
            names = tuple(available)
        else:
            names = tuple(name for name in watch.names if name in available)
        watch.nonce = self._nonce()
        self.pushes += 1
        region = self.snapshot.region(type_url, self.node, names, delta=False)
        head = encode_sotw_response(self.snapshot.version, "", "", ())
        return b"".join((head, region, encode_sotw_response("", type_url, watch.nonce, ())))


class DeltaConnection(_Connection):
    def receive(self, data: bytes) -> list[bytes]:
        try:
            request = DeltaDiscoveryRequest.FromString(data)
        except DecodeError as exc:
            raise IstiodError("INVALID_ARGUMENT", f"malformed request: {exc}") from None
        self._identify(request)
        type_url = request.type_url
        watch = self.watches.get(type_url)
        if watch is None:
            watch = self.watches[type_url] = _Watch()
            subscribe = set(request.resource_names_subscribe)
            watch.wildcard = "*" in subscribe or (
                not subscribe and typeurls.is_wildcard_type(type_url)
            )
            watch.subscribed = subscribe - {"*"}
            # The client says what it already holds; Istiod resends everything anyway and
            # removes what no longer exists.
            watch.sent = {name: b"" for name in request.initial_resource_versions}
            return self._respond(type_url, watch, always=True)
        if request.response_nonce and request.response_nonce != watch.nonce:
            return []  # stale
        if request.HasField("error_detail"):
            watch.nacks += 1
            return []
        if request.response_nonce:
            watch.acked = request.response_nonce
        added = set(request.resource_names_subscribe) - watch.subscribed
        for name in request.resource_names_unsubscribe:
            watch.subscribed.discard(name)
            watch.sent.pop(name, None)
        watch.subscribed |= added
        if added:
            return self._respond(type_url, watch, always=False)
        return []

    def push(self, snapshot: Snapshot) -> list[bytes]:
        self.snapshot = snapshot
        out: list[bytes] = []
        for type_url in self._ordered():
            out += self._respond(type_url, self.watches[type_url], always=False, resend=True)
        return out

    def push_endpoints(self, snapshot: Snapshot, clusters: frozenset[str]) -> list[bytes]:
        """Istiod's incremental EDS push: only the changed load assignments this node watches."""
        self.snapshot = snapshot
        watch = self.watches.get(typeurls.ENDPOINT)
        if watch is None:
            return []
        return self._respond(typeurls.ENDPOINT, watch, always=False, only=clusters)

    def _respond(
        self,
        type_url: str,
        watch: _Watch,
        always: bool,
        only: frozenset[str] | None = None,
        resend: bool = False,
    ) -> list[bytes]:
        assert self.node is not None
        available = self.snapshot.resources(type_url, self.node)
        if only is not None:
            names = sorted(n for n in only if watch.wildcard or n in watch.subscribed)
            wanted = {n: available[n] for n in names if n in available}
            removed = sorted(n for n in names if n in watch.sent and n not in available)
        else:
            if watch.wildcard:
                wanted = available
            else:
                wanted = {n: available[n] for n in sorted(watch.subscribed) if n in available}
            removed = sorted(n for n in watch.sent if n not in wanted)
        sent = watch.sent
        if resend:
            changed = wanted
        else:
            changed = {n: body for n, body in wanted.items() if sent.get(n) != body}
        if not (changed or removed or always):
            return []
        for name in removed:
            del sent[name]
        sent.update(changed)
        watch.nonce = self._nonce()
        self.pushes += 1
        region = self.snapshot.region(type_url, self.node, tuple(changed), delta=True)
        head = encode_delta_response(self.snapshot.version, "", "", ())
        tail = encode_delta_response("", type_url, watch.nonce, (), removed)
        return [b"".join((head, region, tail))]
