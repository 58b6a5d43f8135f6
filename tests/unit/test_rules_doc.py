"""docs/rules.md: every example loads, and what it says is refused is refused."""

import re
from pathlib import Path

import pytest

from xdsproxy.istio.names import ServicePort
from xdsproxy.scope.rules import RulesError, load_rules, parse_rules

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "rules.md"


def _examples() -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", DOC.read_text(), re.S)


def test_the_doc_has_examples() -> None:
    assert len(_examples()) >= 2


@pytest.mark.parametrize("index", range(len(_examples())))
def test_every_example_in_the_doc_loads_without_warnings(index: int) -> None:
    rules = parse_rules(_examples()[index], f"docs/rules.md example {index}")
    assert rules.default or rules.namespaces or rules.workloads
    assert rules.warnings == ()


def test_the_shipped_example_loads() -> None:
    rules = load_rules(ROOT / "deploy" / "examples" / "rules.yaml")
    assert rules.patterns_for("bookinfo", {"app": "productpage"})


def test_the_doc_examples_mean_what_the_doc_says() -> None:
    rules = parse_rules(_examples()[1])
    canary = rules.patterns_for("checkout", {"app": "api", "track": "canary"})

    def covered(host: str, port: int) -> bool:
        return any(p.matches(ServicePort(host, port)) for p in canary)

    assert covered("card.payments.svc.cluster.local", 80)
    assert covered("ledger.finance.svc.cluster.local", 5432)
    assert not covered("ledger.finance.svc.cluster.local", 80)
    assert covered("stock.inventory.svc.cluster.local", 8080)
    assert not any(
        p.matches(ServicePort("stock.inventory.svc.cluster.local", 8080))
        for p in rules.patterns_for("checkout", {"app": "api"})
    )


@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        ("svc:http", "not 1-65535"),
        ("svc.ns.svc.cluster.local:0", "not 1-65535"),
        ("svc:70000", "not 1-65535"),
        ("a/b/c", "must look like"),
        ("8080", "names no host"),
        (":8080", "names no host"),
    ],
)
def test_patterns_that_can_never_match_are_refused_with_file_and_line(
    pattern: str, why: str
) -> None:
    with pytest.raises(RulesError) as error:
        parse_rules(f"default:\n  - istio-system/*\n  - '{pattern}'\n", "rules.yaml")
    assert str(error.value).startswith("rules.yaml:3:") and why in str(error.value)


@pytest.mark.parametrize("pattern", ["*", "*/*"])
def test_the_whole_mesh_loads_with_a_warning_naming_the_line(pattern: str) -> None:
    rules = parse_rules(f"namespaces:\n  shop:\n    - '{pattern}'\n", "rules.yaml")
    assert rules.namespaces["shop"][0].whole_mesh
    assert len(rules.warnings) == 1 and rules.warnings[0].startswith("rules.yaml:3:")
    assert "whole mesh" in rules.warnings[0]
