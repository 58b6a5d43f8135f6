"""Static scope rules (`--rules FILE`): hosts a workload gets whether or not it was seen using them.

```yaml
default:                       # every workload in the mesh
  - istio-system/*
namespaces:                    # every workload of a namespace
  shop:
    - "*/payments.billing.svc.cluster.local"
workloads:                     # workloads chosen by namespace and labels
  - namespace: shop
    labels: {app: frontend}
    hosts:
      - reviews.shop.svc.cluster.local:9080
```

A host is `ns/*` (a whole namespace), `*/FQDN` or `ns/FQDN` (glob allowed in FQDN), a bare
`FQDN`, or `FQDN:PORT`. Static rules never age. A bad file stops start-up (or, on reload, keeps
the rules in force) with the file name and line of the first error; patterns that can never
match are errors. `docs/rules.md` has the format with examples.
"""

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from xdsproxy.scope.scope import HostPattern


class RulesError(ValueError):
    pass


@dataclass(frozen=True)
class WorkloadRule:
    namespace: str
    labels: dict[str, str]
    hosts: tuple[HostPattern, ...]


@dataclass(frozen=True)
class Rules:
    default: tuple[HostPattern, ...] = ()
    namespaces: dict[str, tuple[HostPattern, ...]] = field(default_factory=dict)
    workloads: tuple[WorkloadRule, ...] = ()
    # `file:line: why` for entries that load but are likely a mistake (`*`: the whole mesh).
    warnings: tuple[str, ...] = ()

    def patterns_for(self, namespace: str, labels: dict[str, str]) -> tuple[HostPattern, ...]:
        found = list(self.default) + list(self.namespaces.get(namespace, ()))
        for rule in self.workloads:
            if rule.namespace == namespace and all(
                labels.get(k) == v for k, v in rule.labels.items()
            ):
                found.extend(rule.hosts)
        return tuple(dict.fromkeys(found))


def _where(source: str, node: yaml.Node) -> str:
    return f"{source}:{node.start_mark.line + 1}"


def _mapping(node: yaml.Node, source: str, what: str) -> list[tuple[yaml.ScalarNode, yaml.Node]]:
    if not isinstance(node, yaml.MappingNode):
        raise RulesError(f"{_where(source, node)}: {what} must be a mapping")
    return node.value


def _hosts(node: yaml.Node, source: str, warnings: list[str]) -> tuple[HostPattern, ...]:
    if not isinstance(node, yaml.SequenceNode):
        raise RulesError(f"{_where(source, node)}: hosts must be a list")
    patterns = []
    for item in node.value:
        if not isinstance(item, yaml.ScalarNode) or not item.value.strip():
            raise RulesError(f"{_where(source, item)}: a host must be a non-empty string")
        try:
            pattern = HostPattern.parse(item.value).written_at(_where(source, item))
        except ValueError as exc:
            raise RulesError(f"{_where(source, item)}: {exc}") from None
        if pattern.whole_mesh:
            warnings.append(
                f"{_where(source, item)}: {item.value!r} puts the whole mesh in scope, "
                "as if xdsproxy were not there"
            )
        patterns.append(pattern)
    return tuple(patterns)


def _workload(node: yaml.Node, source: str, warnings: list[str]) -> WorkloadRule:
    fields = {key.value: (key, value) for key, value in _mapping(node, source, "a workload rule")}
    for name, (key, _) in fields.items():
        if name not in ("namespace", "labels", "hosts"):
            raise RulesError(f"{_where(source, key)}: unknown key {name!r} in a workload rule")
    for required in ("namespace", "hosts"):
        if required not in fields:
            raise RulesError(f"{_where(source, node)}: a workload rule needs {required!r}")
    labels: dict[str, str] = {}
    if "labels" in fields:
        for key, value in _mapping(fields["labels"][1], source, "labels"):
            if not isinstance(value, yaml.ScalarNode):
                raise RulesError(f"{_where(source, value)}: a label value must be a string")
            labels[key.value] = value.value
    namespace = fields["namespace"][1]
    if not isinstance(namespace, yaml.ScalarNode) or not namespace.value:
        raise RulesError(f"{_where(source, namespace)}: namespace must be a string")
    return WorkloadRule(namespace.value, labels, _hosts(fields["hosts"][1], source, warnings))


def parse_rules(text: str, source: str = "<rules>") -> Rules:
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise RulesError(
            f"{source}{line}: not valid YAML: {getattr(exc, 'problem', exc)}"
        ) from None
    if root is None:
        return Rules()
    default: tuple[HostPattern, ...] = ()
    namespaces: dict[str, tuple[HostPattern, ...]] = {}
    workloads: list[WorkloadRule] = []
    warnings: list[str] = []
    for key, value in _mapping(root, source, "the rules file"):
        if key.value == "default":
            default = _hosts(value, source, warnings)
        elif key.value == "namespaces":
            for ns, hosts in _mapping(value, source, "namespaces"):
                namespaces[ns.value] = _hosts(hosts, source, warnings)
        elif key.value == "workloads":
            if not isinstance(value, yaml.SequenceNode):
                raise RulesError(f"{_where(source, value)}: workloads must be a list")
            workloads.extend(_workload(item, source, warnings) for item in value.value)
        else:
            raise RulesError(
                f"{_where(source, key)}: unknown key {key.value!r} "
                "(expected default, namespaces or workloads)"
            )
    return Rules(default, namespaces, tuple(workloads), tuple(warnings))


def load_rules(path: Path) -> Rules:
    try:
        text = path.read_text()
    except OSError as exc:
        raise RulesError(f"{path}: {exc.strerror}") from None
    return parse_rules(text, str(path))
