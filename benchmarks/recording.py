"""What every benchmark records beside its numbers: package versions, and the results written
as JSON + markdown under benchmarks/results/."""

from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

RESULTS = Path(__file__).resolve().parent / "results"


def versions(*packages: str) -> dict[str, str]:
    """Python's version and each package's ("absent" when not installed)."""
    out = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def write_results(name: str, result: dict[str, Any], to_markdown: Callable[[dict[str, Any]], str],
                  directory: Path = RESULTS) -> str:
    """`<name>.json` and `<name>.md` in `directory`; returns the markdown."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    markdown = to_markdown(result)
    (directory / f"{name}.md").write_text(markdown)
    return markdown
