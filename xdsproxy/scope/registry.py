"""Every workload's scope, and the static patterns each gets: the rules file's (by namespace
and the labels its sidecars report) and the store's (a LazyScope's `spec.hosts`). Pure: the
runtime re-pushes the workloads a change returns."""

from xdsproxy.model import WorkloadKey
from xdsproxy.scope.rules import Rules
from xdsproxy.scope.scope import HostPattern, Scope


class Scopes:
    def __init__(self, rules: Rules | None = None) -> None:
        self.rules = rules or Rules()
        self.by_workload: dict[WorkloadKey, Scope] = {}
        self._labels: dict[WorkloadKey, dict[str, str]] = {}
        self._stored: dict[WorkloadKey, tuple[HostPattern, ...]] = {}

    def get(self, key: WorkloadKey, labels: dict[str, str] | None = None) -> Scope:
        """The workload's scope, created empty the first time; `labels` (a sidecar's, on
        connecting) choose the rules that apply."""
        scope = self.by_workload.get(key)
        if scope is None:
            scope = self.by_workload[key] = Scope(key)
        if labels is not None:
            self._labels[key] = labels
            self._apply_static(scope)
        return scope

    def labels_of(self, key: WorkloadKey) -> dict[str, str]:
        """The pod labels a sidecar of the workload reported (empty until one connects)."""
        return dict(self._labels.get(key, {}))

    def set_rules(self, rules: Rules) -> list[WorkloadKey]:
        """New rules (the file changed); the workloads whose static patterns changed. A scope
        they narrow loses those hosts unless learned."""
        self.rules = rules
        return [scope.key for scope in list(self.by_workload.values()) if self._apply_static(scope)]

    def set_stored(self, key: WorkloadKey, patterns: tuple[HostPattern, ...]) -> bool:
        """A LazyScope's static hosts; True when the workload's scope changed."""
        self._stored[key] = patterns
        return self._apply_static(self.get(key))

    def _apply_static(self, scope: Scope) -> bool:
        before = scope.version
        from_rules = self.rules.patterns_for(scope.key.namespace, self._labels.get(scope.key, {}))
        scope.set_static(tuple(dict.fromkeys(from_rules + self._stored.get(scope.key, ()))))
        return scope.version != before
