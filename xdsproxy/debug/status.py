"""`xdsproxy status`: one row per sidecar across every replica, in the manner of `istioctl
proxy-status`, read from each replica's admin endpoint (`--admin-listen`).

Replicas are given as `--debug ADDR` (repeatable: HOST:PORT or a URL), or found from the
xdsproxy Service's EndpointSlices with the official Kubernetes client (`--service NS/NAME`).
"""

import http.client
import json
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

# The order `istioctl proxy-status` uses; other types follow, by name.
_FIRST_TYPES = ("CDS", "LDS", "EDS", "RDS", "ECDS")
ADMIN_PORT_NAME = "http-admin"


class StatusError(RuntimeError):
    pass


def admin_url(address: str) -> str:
    """`127.0.0.1:15015`, `:15015` or `http://host:port/` -> `http://host:port`."""
    text = address.strip()
    if "://" not in text:
        text = "http://" + (("127.0.0.1" + text) if text.startswith(":") else text)
    parsed = urllib.parse.urlsplit(text)
    if parsed.scheme not in ("http", "https") or not parsed.hostname or parsed.port is None:
        raise StatusError(f"--debug {address!r}: give HOST:PORT or http://HOST:PORT")
    return f"{parsed.scheme}://{parsed.netloc}{parsed.path.rstrip('/')}"


def fetch(url: str, path: str, method: str = "GET", body: object = None) -> Any:
    """One JSON request to an admin endpoint; errors name the URL and what it said."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url + path, data=data, method=method, headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("error", exc.reason)
        except json.JSONDecodeError:
            message = exc.reason
        raise StatusError(f"{url}{path}: {message}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StatusError(f"cannot reach the admin endpoint at {url}: {reason}") from None
    except (http.client.HTTPException, json.JSONDecodeError):
        raise StatusError(
            f"{url} is not an xdsproxy admin endpoint (--admin-listen, default port 15015)"
        ) from None


def replicas_from_service(service: str, default_port: int, api: Any = None) -> list[str]:
    """Each ready endpoint of the Service `NS/NAME`, at its EndpointSlice port named
    `http-admin`, else `default_port`."""
    from kubernetes import client, config
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    from xdsproxy.store.kubernetes import api_client

    namespace, slash, name = service.partition("/")
    if not slash or not namespace or not name:
        raise StatusError(f"--service {service!r}: give NAMESPACE/NAME, e.g. istio-system/xdsproxy")
    try:
        slices = client.DiscoveryV1Api(api or api_client()).list_namespaced_endpoint_slice(
            namespace, label_selector=f"kubernetes.io/service-name={name}"
        )
    except (ApiException, HTTPError, OSError, config.ConfigException) as exc:
        status = getattr(exc, "status", None)
        raise StatusError(
            f"--service {service}: cannot list its EndpointSlices "
            f"({f'HTTP {status}' if status else exc}); or give each replica with --debug"
        ) from None
    urls = []
    for item in slices.items:
        ports = {p.name: p.port for p in item.ports or () if p.name}
        port = ports.get(ADMIN_PORT_NAME, default_port)
        for endpoint in item.endpoints or ():
            if endpoint.conditions is not None and endpoint.conditions.ready is False:
                continue
            for address in endpoint.addresses[:1]:
                host = f"[{address}]" if ":" in address else address
                urls.append(f"http://{host}:{port}")
    if not urls:
        raise StatusError(f"--service {service}: no ready endpoint in its EndpointSlices")
    return sorted(set(urls))


@dataclass(frozen=True)
class Fleet:
    """Every replica's rows, with the admin URL each came from; replicas that did not answer
    are listed, not fatal."""

    rows: list[dict[str, Any]]
    source: dict[str, str]  # node id -> admin URL
    unreachable: list[str]


def gather(urls: list[str]) -> Fleet:
    def read(url: str) -> tuple[str, list[dict[str, Any]] | StatusError]:
        try:
            return url, fetch(url, "/debug/nodes")
        except StatusError as exc:
            return url, exc

    with ThreadPoolExecutor(max_workers=min(8, len(urls))) as pool:
        answers = list(pool.map(read, urls))
    rows, source, unreachable = [], {}, []
    for url, answer in answers:
        if isinstance(answer, StatusError):
            unreachable.append(str(answer))
            continue
        for row in answer:
            rows.append(row)
            source[row["node"]] = url
    if not rows and len(unreachable) == len(urls):
        raise StatusError("; ".join(unreachable))
    return Fleet(sorted(rows, key=lambda r: (name_of(r), r["replica"])), source, unreachable)


def name_of(row: dict[str, Any]) -> str:
    """`pod.namespace` as istioctl shows it, else the node id."""
    return row.get("pod") or row["node"]


def find(fleet: Fleet, name: str) -> dict[str, Any]:
    """A sidecar by node id, `pod.namespace` or pod name (when only one namespace has it)."""
    for test in (
        lambda r: r["node"] == name,
        lambda r: r.get("pod") == name,
        lambda r: (r.get("pod") or "").split(".", 1)[0] == name,
    ):
        found = [r for r in fleet.rows if test(r)]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            choices = ", ".join(name_of(r) for r in found)
            raise StatusError(f"{name!r} names several sidecars ({choices}); give pod.namespace")
    replicas = len(set(fleet.source.values()))
    raise StatusError(f"no sidecar named {name!r} is connected to the {replicas} replica(s) read")


def find_node(fleet: Fleet, name: str) -> dict[str, Any]:
    """A sidecar as `find` names it, or the first connected sidecar of a workload
    `NAMESPACE/NAME`."""
    if "/" in name and "~" not in name:
        rows = [r for r in fleet.rows if r.get("workload") == name and r["role"] == "sidecar"]
        if rows:
            return rows[0]
        raise StatusError(f"no sidecar of workload {name} is connected to the replicas read")
    return find(fleet, name)


def workload_of(fleet: Fleet, name: str) -> str:
    """`NAMESPACE/NAME` as given, or the workload of the sidecar `name` names."""
    if "/" in name and "~" not in name:
        return name
    workload = find(fleet, name).get("workload")
    if not workload:
        raise StatusError(f"{name!r} is not an Istio sidecar: it has no workload")
    return workload


def _size(count: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(count) < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} GB"


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
        for line in [header, *rows]
    ]
    return "\n".join(lines)


def type_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The types any shown sidecar subscribes to, in istioctl's order, then by name."""
    seen = {name for row in rows for name in row["types"]}
    return [t for t in _FIRST_TYPES if t in seen] + sorted(seen - set(_FIRST_TYPES))


def render_fleet(fleet: Fleet) -> str:
    rows = fleet.rows
    notes = [f"not answering: {why}" for why in fleet.unreachable]
    if not rows:
        return "\n".join(["no sidecars connected", *notes])
    types = type_columns(rows)
    body = []
    for row in rows:
        saved = row["saved"]
        upstream = sum(t["upstream"]["bytes"] for t in row["types"].values())
        share = f" ({saved['bytes'] / upstream:.0%})" if upstream else ""
        withheld = f"{saved['clusters']} clusters, {_size(saved['bytes'])}{share}"
        body.append(
            [
                name_of(row),
                *(row["types"][t]["state"] if t in row["types"] else "-" for t in types),
                row["replica"],
                row["istiod"] or "-",
                row["istio_version"] or "-",
                "- (holds the whole mesh)" if row.get("role") == "egress" else withheld,
            ]
        )
    header = ["NAME", *types, "REPLICA", "ISTIOD", "VERSION", "SAVED"]
    egress = sum(row.get("role") == "egress" for row in rows)
    notes.append(f"lazy egress nodes connected: {egress}")
    if not egress:
        notes[-1] += " (first requests to services out of scope fail until one connects)"
    return table(header, body) + "\n\n" + "\n".join(notes)


def render_node(row: dict[str, Any]) -> str:
    lines = [
        f"name:      {name_of(row)}",
        f"node:      {row['node']}",
        f"workload:  {row['workload'] or '-'}",
        f"replica:   {row['replica']}",
        f"istiod:    {row['istiod'] or '-'}",
        f"version:   {row['istio_version'] or '-'}",
        f"protocol:  {row['protocol']}",
        f"connected: {row['connected_since']}",
        "",
    ]
    per_type = []
    for name in type_columns([row]):
        t = row["types"][name]
        per_type.append(
            [
                name,
                t["state"],
                str(t["upstream"]["resources"]),
                str(t["pushed"]["resources"]),
                _size(t["upstream"]["bytes"]),
                _size(t["pushed"]["bytes"]),
                t["pushed"]["version"] or "-",
                (t["last_nack"] or "")[:60],
            ]
        )
    header = ["TYPE", "STATE", "UPSTREAM", "PUSHED", "UP BYTES", "PUSHED BYTES", "VERSION"]
    lines.append(table([*header, "LAST NACK"], per_type))
    dependencies = [
        [d["host"], str(d["port"] or "*"), d["origin"], d.get("last_seen", "")]
        for d in row.get("dependencies", [])
    ]
    if dependencies:
        lines += ["", table(["DEPENDENCY", "PORT", "ORIGIN", "LAST SEEN"], dependencies)]
    return "\n".join(lines)


def status(urls: list[str], name: str | None, as_json: bool) -> str:
    fleet = gather(urls)
    if name:
        row = find(fleet, name)
        url = fleet.source[row["node"]]
        detail = fetch(url, f"/debug/nodes/{urllib.parse.quote(row['node'], safe='')}")
        return json.dumps(detail, indent=1) if as_json else render_node(detail)
    return json.dumps(fleet.rows, indent=1) if as_json else render_fleet(fleet)
