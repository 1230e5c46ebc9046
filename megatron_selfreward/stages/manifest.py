"""Stage manifests: a stage is done when its manifest exists and its fingerprint still matches.

The manifest is written last, by atomic rename, next to the stage's main output
(`responses.jsonl` -> `responses.manifest.json`). It holds the stage name, the fingerprint
(content hashes of the inputs + the config values the stage depends on), record counts and
timings. A rerun with the same fingerprint skips the stage; any change re-runs it.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from megatron_selfreward.io import atomic_write_json, sha256_file


def manifest_path(output: Path) -> Path:
    """`iter1/responses.jsonl` -> `iter1/responses.manifest.json`; `models/M0` -> `models/M0.manifest.json`."""
    return output.parent / f"{output.name.split('.')[0]}.manifest.json"


def _hash_input(path: Path) -> str:
    if path.is_dir():
        digest = hashlib.sha256()
        for child in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(str(child.relative_to(path)).encode())
            digest.update(sha256_file(child).encode())
        return digest.hexdigest()
    return sha256_file(path)


def listing_digest(directory: Path) -> str:
    """Names, sizes and modification times of a directory's files: cheap even for 140 GB."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(directory)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def fingerprint(inputs: dict[str, Path], params: dict[str, Any]) -> dict[str, Any]:
    return {
        "inputs": {name: _hash_input(Path(p)) for name, p in sorted(inputs.items())},
        "params": json.loads(json.dumps(params, sort_keys=True, default=str)),
    }


def is_done(output: Path, fp: dict[str, Any]) -> bool:
    path = manifest_path(output)
    if not path.is_file() or not output.exists():
        return False
    try:
        return json.loads(path.read_text()).get("fingerprint") == fp
    except json.JSONDecodeError:
        return False  # a damaged manifest means "not done": the stage reruns


def write_manifest(output: Path, stage: str, fp: dict[str, Any], counts: dict[str, Any],
                   started: float, extra: dict[str, Any] | None = None) -> Path:
    path = manifest_path(output)
    atomic_write_json(path, {
        "stage": stage,
        "output": output.name,
        "fingerprint": fp,
        "counts": counts,
        "wall_time_s": round(time.time() - started, 3),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(extra or {}),
    })
    return path
