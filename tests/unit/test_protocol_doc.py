"""docs/protocol.md states each protocol rule once, numbered, with the tests that prove it: every
rule names at least one test, every test it names exists, and every rule is cited in the code."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "protocol.md").read_text()


def _rules() -> dict[str, str]:
    """Rule id -> its text, up to the next rule or heading."""
    parts = re.split(r"\*\*(R\d+)\.\*\*", DOC)
    return {
        rid: re.split(r"\n(?=- \*\*R|\*\*R|## )", text)[0]
        for rid, text in zip(parts[1::2], parts[2::2], strict=True)
    }


def _tests_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test")
    }


def test_rules_are_numbered_once_without_gaps_and_each_names_a_test() -> None:
    """Numbers are stable (code, notes and issues cite them): a new rule takes the next number
    and sits in its section, so numbers need not follow the page's order."""
    ids = re.findall(r"\*\*(R\d+)\.\*\*", DOC)
    assert len(ids) == len(set(ids)), "a rule number is used twice"
    rules = _rules()
    assert sorted(rules, key=lambda r: int(r[1:])) == [f"R{n}" for n in range(1, len(rules) + 1)]
    for rid, text in rules.items():
        assert "Proved by `tests/" in text, f"{rid} names no test"


def test_every_test_named_exists() -> None:
    named = re.findall(r"`(tests/[\w/]+\.py)(?:::(\w+))?`", DOC)
    assert len(named) > 30
    for path, test in named:
        module = ROOT / path
        assert module.is_file(), path
        if test:
            assert test in _tests_in(module), f"{path}::{test} does not exist"


def test_every_rule_is_cited_where_it_is_enforced() -> None:
    code = "\n".join(p.read_text() for p in (ROOT / "xdsproxy").rglob("*.py"))
    lists = re.findall(r"docs/protocol\.md (R\d+(?:, R\d+)*)", code)
    cited = {rule for found in lists for rule in found.split(", ")}
    missing = set(_rules()) - cited
    assert not missing, (
        f"rules cited nowhere in xdsproxy/: {sorted(missing, key=lambda r: int(r[1:]))}"
    )
