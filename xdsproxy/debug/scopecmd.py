"""`xdsproxy scope why|add|forget|export`: explain, change and export workloads' scopes
through the replicas' admin endpoints. Reads ask every replica (each answers from what it
knows); writes go to one replica, whose store carries them to the others."""

import json
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import yaml

from xdsproxy.debug.status import StatusError, fetch, gather, name_of, workload_of


def _ask_all(urls: list[str], path: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Every replica's answer; the errors of those that gave none."""

    def ask(url: str) -> dict[str, Any] | StatusError:
        try:
            return fetch(url, path)
        except StatusError as exc:
            return exc

    with ThreadPoolExecutor(max_workers=min(8, len(urls))) as pool:
        answers = list(pool.map(ask, urls))
    good = [a for a in answers if not isinstance(a, StatusError)]
    errors = [str(a) for a in answers if isinstance(a, StatusError)]
    if not good:
        raise StatusError("; ".join(errors))
    return good, errors


def why(urls: list[str], name: str, service: str, as_json: bool) -> str:
    fleet = gather(urls)
    workload = workload_of(fleet, name)
    names = {row["node"]: name_of(row) for row in fleet.rows}
    query = urllib.parse.urlencode({"workload": workload, "service": service})
    answers, errors = _ask_all(urls, f"/debug/scope/why?{query}")
    if as_json:
        return json.dumps(answers, indent=1)
    # Replicas that say the same (reasons and how the clusters went) are shown once.
    groups: dict[str, list[dict[str, Any]]] = {}
    for answer in sorted(answers, key=lambda a: a["replica"]):
        key = json.dumps([(s["in_scope"], s["reasons"], s["clusters"]) for s in answer["services"]])
        groups.setdefault(key, []).append(answer)
    lines = []
    for same in groups.values():
        replicas = ", ".join(a["replica"] for a in same)
        pods = ", ".join(names.get(n, n) for a in same for n in a["sidecars"])
        sidecars = f" (sidecars connected there: {pods})" if pods else ""
        who = f"replica {replicas} sees" if len(same) == 1 else f"replicas {replicas} see"
        lines.append(f"{workload} as {who} it{sidecars}:")
        for entry in same[0]["services"]:
            state = "IN SCOPE" if entry["in_scope"] else "NOT IN SCOPE"
            lines.append(f"  {entry['service']}: {state}")
            lines += [f"    - {reason}" for reason in entry["reasons"]]
            lines += [f"    cluster {c}: {how}" for c, how in entry["clusters"].items()]
        if not same[0]["known"]:
            lines.append("  (Istiod has sent this replica no such service)")
    lines += [f"not answering: {e}" for e in errors]
    return "\n".join(lines)


def _target(urls: list[str], name: str) -> tuple[str, str]:
    """The workload, and the replica to write through: the one a sidecar of it is connected
    to (it has the services' names from Istiod), else the first that answers."""
    fleet = gather(urls)
    workload = workload_of(fleet, name)
    for row in fleet.rows:
        if row.get("workload") == workload:
            return workload, fleet.source[row["node"]]
    answering = [u for u in urls if not any(u in e for e in fleet.unreachable)]
    return workload, answering[0]  # gather raised if none answered


def change(urls: list[str], verb: str, name: str, service: str) -> str:
    workload, url = _target(urls, name)
    answer = fetch(url, f"/admin/scope/{verb}", "POST", {"workload": workload, "service": service})
    count = answer["added" if verb == "add" else "removed"]
    services = ", ".join(answer["services"]) or "nothing"
    done = "added" if verb == "add" else "forgot"
    return (
        f"{done} {count} of {services} for {workload} through {answer['replica']}; the store "
        "carries it to every replica"
    )


def export(urls: list[str], name: str | None) -> str:
    """Sidecar resources as YAML documents; a workload no replica knows the labels of is
    named in a comment, not exported."""
    workload = workload_of(gather(urls), name) if name else None
    path = "/debug/scope/export" + (
        f"?{urllib.parse.urlencode({'workload': workload})}" if workload else ""
    )
    answers, errors = _ask_all(urls, path)
    resources: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    for answer in answers:
        for resource in answer["resources"]:
            meta = resource["metadata"]
            resources.setdefault(f"{meta['namespace']}/{meta['name']}", resource)
        for entry in answer["skipped"]:
            skipped.setdefault(entry["workload"], entry["why"])
    notes = [f"# skipped {w}: {why}" for w, why in sorted(skipped.items()) if w not in resources]
    notes += [f"# not answering: {e}" for e in errors]
    documents = [yaml.safe_dump(r, sort_keys=False) for _, r in sorted(resources.items())]
    return "\n".join(notes + ["---\n" + d.rstrip() for d in documents])
