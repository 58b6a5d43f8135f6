"""`xdsproxy status`: a proxy-status table read from the debug endpoint, in the manner of
`istioctl proxy-status`."""

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

TYPES = ("CDS", "EDS", "LDS", "RDS")


class StatusError(RuntimeError):
    pass


def fetch(address: str, path: str) -> Any:
    url = f"http://{address}{path}"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("error", exc.reason)
        except json.JSONDecodeError:
            message = exc.reason
        raise StatusError(f"{url}: {message}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise StatusError(f"cannot reach the debug endpoint at {address}: {exc}") from None


def _size(count: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(count) < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} GB"


def saved(row: dict[str, Any]) -> tuple[int, int]:
    """(bytes upstream, bytes pushed) over the four main types."""
    upstream = sum(row["types"].get(t, {}).get("upstream", {}).get("bytes", 0) for t in TYPES)
    pushed = sum(row["types"].get(t, {}).get("pushed", {}).get("bytes", 0) for t in TYPES)
    return upstream, pushed


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
        for line in [header, *rows]
    ]
    return "\n".join(lines)


def render_nodes(rows: list[dict[str, Any]]) -> str:
    body = []
    for row in rows:
        types = row["types"]
        upstream, pushed = saved(row)
        cds = types.get("CDS", {})
        share = f" ({1 - pushed / upstream:.0%})" if upstream else ""
        body.append(
            [
                row["node"],
                row["workload"] or "-",
                row["protocol"],
                *(types[t]["state"] if t in types else "-" for t in TYPES),
                f"{cds.get('pushed', {}).get('resources', 0)}/"
                f"{cds.get('upstream', {}).get('resources', 0)}",
                _size(upstream - pushed) + share,
            ]
        )
    header = ["NODE", "WORKLOAD", "XDS", *TYPES, "CLUSTERS", "SAVED"]
    if not body:
        return "no sidecars connected"
    egress = sum(row.get("role") == "egress" for row in rows)
    note = f"lazy egress nodes connected here: {egress}"
    if not egress:
        note += " (first requests to services out of scope fail unless another replica has one)"
    return _table(header, body) + "\n\n" + note


def render_node(row: dict[str, Any]) -> str:
    lines = [
        f"node:      {row['node']}",
        f"workload:  {row['workload'] or '-'}",
        f"protocol:  {row['protocol']}",
        f"connected: {row['connected_since']}",
        "",
    ]
    per_type = []
    for name, t in sorted(row["types"].items()):
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
    lines.append(
        _table(
            [
                "TYPE",
                "STATE",
                "UPSTREAM",
                "PUSHED",
                "UP BYTES",
                "PUSHED BYTES",
                "VERSION",
                "LAST NACK",
            ],
            per_type,
        )
    )
    dependencies = [
        [d["host"], str(d["port"] or "*"), d["origin"], d.get("last_seen", "")]
        for d in row.get("dependencies", [])
    ]
    if dependencies:
        lines += ["", _table(["DEPENDENCY", "PORT", "ORIGIN", "LAST SEEN"], dependencies)]
    return "\n".join(lines)


def status(address: str, node: str | None, as_json: bool) -> str:
    if node:
        row = fetch(address, f"/debug/nodes/{urllib.parse.quote(node, safe='')}")
        return json.dumps(row, indent=1) if as_json else render_node(row)
    rows = fetch(address, "/debug/nodes")
    return json.dumps(rows, indent=1) if as_json else render_nodes(rows)
