"""`xdsproxy config`: what one sidecar was pushed, as tables in the manner of `istioctl
proxy-config`, or how that differs from what Istiod sent it (`--diff`). Read from the admin
endpoint of the replica the sidecar is connected to."""

import urllib.parse
from typing import Any

from xdsproxy.debug.status import fetch, find_node, gather, table

KINDS = {"clusters": "CDS", "listeners": "LDS", "routes": "RDS", "endpoints": "EDS"}


def _cluster_row(name: str, resource: dict[str, Any]) -> list[str]:
    parts = name.split("|")
    if len(parts) == 4:
        direction, port, subset, fqdn = parts
    else:
        direction, port, subset, fqdn = "-", "-", "-", name
    kind = resource.get("type") or ("CUSTOM" if "cluster_type" in resource else "STATIC")
    return [fqdn or "-", port or "-", subset or "-", direction, kind]


def _listener_row(name: str, resource: dict[str, Any]) -> list[str]:
    socket = (resource.get("address") or {}).get("socket_address") or {}
    chains = len(resource.get("filter_chains") or []) + ("default_filter_chain" in resource)
    return [name, socket.get("address", "-"), str(socket.get("port_value", "-")), str(chains)]


def _route_row(name: str, resource: dict[str, Any]) -> list[str]:
    vhosts = resource.get("virtual_hosts") or []
    domains = [d for v in vhosts for d in v.get("domains") or []]
    shown = ", ".join(domains[:3]) + (f" (+{len(domains) - 3})" if len(domains) > 3 else "")
    return [name, str(len(vhosts)), shown or "-"]


def _endpoint_rows(name: str, resource: dict[str, Any]) -> list[list[str]]:
    rows = []
    for locality in resource.get("endpoints") or []:
        for lb in locality.get("lb_endpoints") or []:
            socket = ((lb.get("endpoint") or {}).get("address") or {}).get("socket_address") or {}
            address = f"{socket.get('address', '?')}:{socket.get('port_value', '?')}"
            rows.append([address, lb.get("health_status", "UNKNOWN"), name])
    return rows or [["-", "-", name]]


_HEADERS = {
    "clusters": ["SERVICE FQDN", "PORT", "SUBSET", "DIRECTION", "TYPE"],
    "listeners": ["NAME", "ADDRESS", "PORT", "CHAINS"],
    "routes": ["NAME", "VHOSTS", "DOMAINS"],
    "endpoints": ["ENDPOINT", "STATUS", "CLUSTER"],
}


def _rows(kind: str, name: str, resource: dict[str, Any]) -> list[list[str]]:
    if kind == "clusters":
        return [_cluster_row(name, resource)]
    if kind == "listeners":
        return [_listener_row(name, resource)]
    if kind == "routes":
        return [_route_row(name, resource)]
    return _endpoint_rows(name, resource)


def _matches(fqdn: str, kind: str, name: str, resource: dict[str, Any]) -> bool:
    """`--fqdn`: clusters and endpoints by service host, routes by a domain, listeners by
    name."""
    if kind in ("clusters", "endpoints"):
        return name.split("|")[-1] == fqdn or name == fqdn
    if kind == "routes":
        return any(
            d.split(":")[0] == fqdn or d == fqdn
            for v in resource.get("virtual_hosts") or []
            for d in v.get("domains") or []
        )
    return fqdn in name


def _resources(url: str, node: str, view: str, kind: str) -> dict[str, dict[str, Any]]:
    query = urllib.parse.urlencode({"node": node, "view": view, "type": KINDS[kind]})
    dump = fetch(url, f"/debug/config_dump?{query}")
    entries = next(iter(dump["types"].values()), [])
    return {e["name"]: e.get("resource") or {"opaque": e.get("opaque")} for e in entries}


def proxy_config(urls: list[str], kind: str, name: str, fqdn: str = "", diff: bool = False) -> str:
    fleet = gather(urls)
    row = find_node(fleet, name)
    url, node = fleet.source[row["node"]], row["node"]
    pushed = _resources(url, node, "pushed", kind)
    if fqdn:
        pushed = {n: r for n, r in pushed.items() if _matches(fqdn, kind, n, r)}
    if not diff:
        body = [line for n, r in sorted(pushed.items()) for line in _rows(kind, n, r)]
        return table(_HEADERS[kind], body) if body else f"no {kind} pushed to {node}"
    upstream = _resources(url, node, "upstream", kind)
    if fqdn:
        upstream = {n: r for n, r in upstream.items() if _matches(fqdn, kind, n, r)}
    body = []
    for resource_name in sorted(set(upstream) | set(pushed)):
        if resource_name not in pushed:
            change = "withheld"
        elif resource_name not in upstream:
            change = "added by xdsproxy"
        elif pushed[resource_name] != upstream[resource_name]:
            change = "rewritten"
        else:
            continue
        body.append([change, resource_name])
    summary = (
        f"{kind}: Istiod sent {len(upstream)}, xdsproxy pushed {len(pushed)}, {len(body)} differ"
    )
    return "\n".join([summary, "", table(["CHANGE", "NAME"], body)] if body else [summary])
