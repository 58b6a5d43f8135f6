"""Where benchmark figures go: `results/NAME.json` and one section each of `RESULTS.md`.

`XDSPROXY_BENCH_DIR` sends them elsewhere, so `make bench-quick` (run in CI, small sizes)
exercises every benchmark without overwriting the figures of a full run.
"""

import json
import os
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def out_dir() -> Path:
    return Path(os.environ.get("XDSPROXY_BENCH_DIR") or HERE)


def results_dir() -> Path:
    path = out_dir() / "results"
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_json(name: str, data: Any) -> Path:
    path = results_dir() / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def load_json(name: str) -> Any:
    path = results_dir() / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def update_section(lines: list[str], path: Path | None = None) -> None:
    """Replace this benchmark's section of RESULTS.md, keeping the others."""
    path = path or out_dir() / "RESULTS.md"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    head = lines[0]
    if head in text:
        start = text.index(head)
        end = text.find("\n## ", start + 1)
        text = text[:start] + text[end + 1 :] if end != -1 else text[:start]
    path.write_text(text.rstrip() + "\n\n" + "\n".join(lines) + "\n")
