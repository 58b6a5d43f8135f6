"""What the lazy views read besides the upstream's types, by name.

A view declares, per type, every input its selection reads (`ResourceView.depends_on`): the
upstream's types by type URL, and these. When one changes, the runtime tells the streams whose
views read it (`inputs_changed`), and each recomputes only the types that declare it: a learn
recomputes a sidecar's CDS and RDS, not its EDS; a namespace's new route table recomputes the
egress's scoped routes, nothing else.
"""

SCOPE = "xdsproxy:scope"  # the workload's scope (learned and static dependencies)
FAIL_OPEN = "xdsproxy:fail-open"  # whether sidecars get Istio's full config (`failopen`)
TUNNEL = "xdsproxy:tunnel"  # whether the sidecar tunnels TCP (off once it NACKed the tunnel)
# The namespaces' unfiltered route tables (`scope.mesh.MeshTables`, versioned)
MESH_ROUTE_TABLES = "xdsproxy:mesh-route-tables"
