"""The xDS type URLs xdsproxy knows by name; every other type URL is carried opaquely."""

from typing import Final

_PREFIX: Final = "type.googleapis.com/"

CLUSTER: Final = _PREFIX + "envoy.config.cluster.v3.Cluster"
ENDPOINT: Final = _PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER: Final = _PREFIX + "envoy.config.listener.v3.Listener"
ROUTE: Final = _PREFIX + "envoy.config.route.v3.RouteConfiguration"
SCOPED_ROUTE: Final = _PREFIX + "envoy.config.route.v3.ScopedRouteConfiguration"
SECRET: Final = _PREFIX + "envoy.extensions.transport_sockets.tls.v3.Secret"
EXTENSION_CONFIG: Final = _PREFIX + "envoy.config.core.v3.TypedExtensionConfig"
NAME_TABLE: Final = _PREFIX + "istio.networking.nds.v1.NameTable"

# Every type here keeps its resource name in field 1 (string), which lets the wire layer read
# names without decoding the resource; any other type passes untouched (docs/protocol.md R24).
NAMED_TYPES: Final = frozenset(
    {CLUSTER, ENDPOINT, LISTENER, ROUTE, SCOPED_ROUTE, SECRET, EXTENSION_CONFIG}
)

# Types whose empty first request subscribes to nothing, by the xDS spec. Every other type,
# Istio's own (NDS, ProxyConfig, ...) included, takes an empty first request as a wildcard
# subscription: Istiod's rule (pilot/pkg/xds, IsWildcardTypeURL), which its agent relies on
# when it asks NDS and PCDS with empty requests (docs/protocol.md R16).
NOT_WILDCARD_TYPES: Final = frozenset({SECRET, ENDPOINT, ROUTE, EXTENSION_CONFIG})


def is_wildcard_type(type_url: str) -> bool:
    return type_url not in NOT_WILDCARD_TYPES


# Istiod's push order, which keeps Envoy from warming against missing dependencies.
PUSH_ORDER: Final = (CLUSTER, ENDPOINT, LISTENER, ROUTE)
_RANK: Final = {type_url: rank for rank, type_url in enumerate(PUSH_ORDER)}


def push_order(type_urls: "set[str] | frozenset[str] | list[str]") -> list[str]:
    """Type URLs in Istiod's push order; other types after, in a stable order."""
    return sorted(type_urls, key=lambda t: (_RANK.get(t, len(_RANK)), t))


SHORT_NAMES: Final = {
    CLUSTER: "CDS",
    ENDPOINT: "EDS",
    LISTENER: "LDS",
    ROUTE: "RDS",
    SCOPED_ROUTE: "SRDS",
    SECRET: "SDS",
    EXTENSION_CONFIG: "ECDS",
    NAME_TABLE: "NDS",
}


def short_name(type_url: str) -> str:
    """A readable label for logs and metrics: 'CDS' rather than the full type URL."""
    return SHORT_NAMES.get(type_url, type_url.rsplit("/", 1)[-1])
