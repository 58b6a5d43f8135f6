"""Reading the dynamic part of a real Envoy's /config_dump, for comparisons."""

from typing import Any

_SECTIONS = {
    "ClustersConfigDump": ("clusters", "dynamic_active_clusters", "cluster", "name"),
    "ListenersConfigDump": ("listeners", "dynamic_listeners", "active_state", "name"),
    "RoutesConfigDump": ("routes", "dynamic_route_configs", "route_config", "name"),
    "EndpointsConfigDump": (
        "endpoints",
        "dynamic_endpoint_configs",
        "endpoint_config",
        "cluster_name",
    ),
}


def dynamic_config(dump: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """kind -> resource name -> (version, resource), without timestamps."""
    out: dict[str, dict[str, Any]] = {kind: {} for kind, *_ in _SECTIONS.values()}
    for section in dump["configs"]:
        spec = _SECTIONS.get(section["@type"].rsplit(".", 1)[-1])
        if spec is None:
            continue
        kind, key, inner, name_key = spec
        for entry in section.get(key, []):
            resource = entry.get(inner)
            if resource is None:
                continue
            if inner == "active_state":
                version, resource = resource.get("version_info"), resource["listener"]
            else:
                version = entry.get("version_info")
            out[kind][resource[name_key]] = (version, resource)
    return out


def counts(dump: dict[str, Any]) -> dict[str, int]:
    return {kind: len(items) for kind, items in dynamic_config(dump).items()}
