"""benchmarks/RESULTS.md: each benchmark owns one section and rewrites only that."""

from pathlib import Path

RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"


def update_section(lines: list[str], path: Path = RESULTS_MD) -> None:
    """Replace this benchmark's section of RESULTS.md, keeping the others."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    head = lines[0]
    if head in text:
        start = text.index(head)
        end = text.find("\n## ", start + 1)
        text = text[:start] + text[end + 1 :] if end != -1 else text[:start]
    path.write_text(text.rstrip() + "\n\n" + "\n".join(lines) + "\n")
