"""The 805 AlpacaEval instructions (paper 6.1) as an evaluation prompt set.

They ship only in the *sdist* of ``alpaca-eval==0.6.6`` (``example/outputs.json``; the wheel
leaves them out), so the first call downloads that tarball with pip, reads the one JSON member
straight out of it (nothing is extracted to disk, so hostile member names cannot escape), and
caches the prompts as ``alpaca_eval.jsonl``; later calls read the cache only.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from megatron_selfreward.io import read_records, write_jsonl
from megatron_selfreward.records import Prompt

__all__ = [
    "ALPACA_EVAL_VERSION",
    "ALPACA_EVAL_COUNT",
    "CACHE_FILE",
    "AlpacaEvalError",
    "download_command",
    "prompts_from_sdist",
    "load_alpaca_eval",
]

ALPACA_EVAL_VERSION = "0.6.6"
ALPACA_EVAL_COUNT = 805
CACHE_FILE = "alpaca_eval.jsonl"
_MEMBER = PurePosixPath("example/outputs.json")
_MAX_MEMBER_BYTES = 64 << 20  # the real file is ~0.5 MB; refuse anything absurd
_PIP_TIMEOUT_S = 600


class AlpacaEvalError(RuntimeError):
    """The AlpacaEval prompts could not be obtained or are not what we expect."""


def download_command(dest: str | Path) -> list[str]:
    """The pip command (argument list) that fetches the sdist into ``dest``."""
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            "--disable-pip-version-check", f"alpaca-eval=={ALPACA_EVAL_VERSION}", "-d", str(dest)]


def _find_member(tar: tarfile.TarFile) -> tarfile.TarInfo:
    # sdists hold one top-level directory ("alpaca_eval-0.6.6/"); accept exactly
    # <top>/example/outputs.json as a regular file: no links, no "..".
    for member in tar.getmembers():
        parts = PurePosixPath(member.name).parts
        if len(parts) == 3 and PurePosixPath(*parts[1:]) == _MEMBER and ".." not in parts:
            if not member.isfile():
                raise AlpacaEvalError(f"{member.name} in the sdist is not a regular file")
            if member.size > _MAX_MEMBER_BYTES:
                raise AlpacaEvalError(f"{member.name} in the sdist is {member.size} bytes; expected ~0.5 MB")
            return member
    raise AlpacaEvalError(f"the sdist has no <package>/{_MEMBER}; is it alpaca-eval {ALPACA_EVAL_VERSION}?")


def _prompts_from_entries(entries: object, origin: str) -> list[Prompt]:
    if not isinstance(entries, list) or len(entries) != ALPACA_EVAL_COUNT:
        got = len(entries) if isinstance(entries, list) else type(entries).__name__
        raise AlpacaEvalError(f"{origin}: expected a list of {ALPACA_EVAL_COUNT} entries, got {got}")
    prompts = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("instruction"), str) \
                or not entry["instruction"].strip() or not isinstance(entry.get("dataset"), str):
            raise AlpacaEvalError(f"{origin}: entry {i} lacks a non-empty 'instruction' or a 'dataset' string")
        prompts.append(Prompt(prompt_id=f"alpaca_eval-{i:03d}", text=entry["instruction"],
                              source="alpaca_eval", meta={"dataset": entry["dataset"]}))
    return prompts


def prompts_from_sdist(sdist: str | Path) -> list[Prompt]:
    """The 805 prompts read from an ``alpaca_eval-0.6.6.tar.gz`` already on disk."""
    try:
        with tarfile.open(sdist, "r:*") as tar:
            member = _find_member(tar)
            raw = tar.extractfile(member)
            assert raw is not None  # isfile() was checked
            entries = json.loads(raw.read().decode("utf-8"))
    except (tarfile.TarError, OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AlpacaEvalError(f"{sdist}: cannot read {_MEMBER}: {err}") from err
    return _prompts_from_entries(entries, f"{sdist}:{_MEMBER}")


def _download_sdist(dest: Path) -> Path:
    cmd = download_command(dest)
    hint = (f"Run where PyPI is reachable:\n  {' '.join(download_command('DIR')[2:])}\n"
            f"then pass DIR/alpaca_eval-{ALPACA_EVAL_VERSION}.tar.gz as sdist=..., "
            f"or copy a {CACHE_FILE} made elsewhere into the cache directory.")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise AlpacaEvalError(f"pip download of alpaca-eval {ALPACA_EVAL_VERSION} failed: {err}\n{hint}") from err
    if proc.returncode != 0:
        raise AlpacaEvalError(
            f"pip download of alpaca-eval {ALPACA_EVAL_VERSION} exited {proc.returncode}:\n"
            f"{proc.stderr.strip()[-2000:]}\n{hint}"
        )
    found = sorted(dest.glob("alpaca*eval-*.tar.gz"))
    if len(found) != 1:
        raise AlpacaEvalError(f"pip download left {[p.name for p in dest.iterdir()]} in {dest}; expected one sdist")
    return found[0]


def load_alpaca_eval(cache_dir: str | Path, sdist: str | Path | None = None) -> list[Prompt]:
    """The 805 AlpacaEval prompts (``prompt_id`` alpaca_eval-000..804, ``meta.dataset`` = origin).

    Uses ``cache_dir/alpaca_eval.jsonl`` if present; otherwise reads ``sdist`` if given, else
    downloads it with pip, and writes the cache atomically.
    """
    cache = Path(cache_dir) / CACHE_FILE
    if cache.is_file():
        prompts = read_records(cache, Prompt)
        if len(prompts) != ALPACA_EVAL_COUNT:
            raise AlpacaEvalError(f"{cache}: holds {len(prompts)} prompts, expected {ALPACA_EVAL_COUNT}; delete it to rebuild")
        return prompts
    if sdist is not None:
        prompts = prompts_from_sdist(sdist)
    else:
        with tempfile.TemporaryDirectory(prefix="alpaca_eval_sdist_") as tmp:
            prompts = prompts_from_sdist(_download_sdist(Path(tmp)))
    write_jsonl(cache, prompts)
    return prompts
