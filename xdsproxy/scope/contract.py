"""The contract between a lazy sidecar, the lazy egress and the learner, owned here once.

A scoped sidecar's catch-all route and its tunnel add the `x-xdsproxy-*` headers below (who
calls, and where the call was going); the egress moves them into dynamic metadata under
`METADATA_NAMESPACE`, strips them, and logs the metadata with every entry; `learn.records`
reads them back. A placeholder cluster hands its service to the tunnel listener as metadata
under `TUNNEL_METADATA`. The egress is the node whose labels carry `EGRESS_ROLE_LABEL:
EGRESS_ROLE`. A name changed here changes it for all three."""

SOURCE_NAMESPACE = "x-xdsproxy-source-namespace"
SOURCE_WORKLOAD = "x-xdsproxy-source-workload"
ORIGINAL_DST = "x-xdsproxy-original-dst"
ORIGINAL_PORT = "x-xdsproxy-original-port"
LAZY_HEADERS = (SOURCE_NAMESPACE, SOURCE_WORKLOAD, ORIGINAL_DST, ORIGINAL_PORT)

METADATA_NAMESPACE = "xdsproxy"
TUNNEL_METADATA = "xdsproxy.tunnel"

EGRESS_ROLE_LABEL = "xdsproxy.io/role"
EGRESS_ROLE = "lazy-egress"


def is_egress(labels: dict[str, str]) -> bool:
    """A lazy egress node: it holds the whole mesh and streams the access logs learned from."""
    return labels.get(EGRESS_ROLE_LABEL) == EGRESS_ROLE
