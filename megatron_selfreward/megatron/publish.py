"""Directories that appear whole or not at all: written in a hidden staging directory beside
the target, then published by one rename.

Used by every writer of a model directory: the GGUF import, HF <-> Megatron conversion, and
Megatron checkpoints (where every rank writes into the same staging directory and rank 0
publishes after a barrier). A failure removes the staging directory, so nothing half-written
is ever found under the target's name; `latest_checkpoint` and stage manifests never see one.
(Single files: `io.atomic_write_*`.)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from megatron_selfreward.io import fsync_path
from megatron_selfreward.megatron.parallel import process_rank

__all__ = ["refuse_existing", "staged_directory"]


def _fsync_tree(directory: Path) -> None:
    """Flush every file below `directory` and the directories themselves, so that the rename
    publishes data, not holes."""
    for root, _, files in os.walk(directory):
        for name in files:
            fsync_path(Path(root) / name)
        fsync_path(Path(root))


def _occupied(path: Path) -> bool:
    return path.exists() and not (path.is_dir() and not any(path.iterdir()))


def refuse_existing(target: Path, overwrite: bool) -> None:
    """FileExistsError unless `target` is absent, an empty directory, or to be overwritten."""
    if _occupied(target) and not overwrite:
        raise FileExistsError(f"{target} already exists and is not empty (pass overwrite=True / "
                              "--overwrite to replace it)")


def _publish(staging: Path, target: Path, overwrite: bool) -> None:
    refuse_existing(target, overwrite)  # it may have appeared while we wrote
    if _occupied(target):
        # A rename cannot replace a non-empty directory: move the old one aside first.
        retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
        os.replace(target, retired / target.name)
        os.replace(staging, target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        if target.exists():
            target.rmdir()
        os.replace(staging, target)
    fsync_path(target.parent)


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def staged_directory(target: str | os.PathLike[str], *, overwrite: bool = False,
                     collective: bool = False, sync_files: bool = True) -> Iterator[Path]:
    """Yield a staging directory beside `target`; rename it to `target` on success.

    overwrite: replace an existing non-empty `target` (else FileExistsError, before anything is
    written and again at the end). collective: every rank of the torch.distributed world calls
    this and writes into the same staging directory (it must be on a file system they share);
    rank 0 publishes once all are done. sync_files: fsync what was written before the rename
    (off where the writer syncs its own files, as torch's checkpoint writer does).
    """
    target = Path(target)
    refuse_existing(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Same parent: a rename is atomic only within one file system.
    if collective:
        staging = target.parent / f".{target.name}.partial"  # a name every rank agrees on
        if process_rank() == 0:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
        _barrier()
    else:
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        yield staging
        if collective:
            _barrier()
        if process_rank() == 0:
            if sync_files:
                _fsync_tree(staging)
            os.chmod(staging, 0o755)  # mkdtemp makes it private
            _publish(staging, target, overwrite)
        if collective:
            _barrier()
    except BaseException:
        if process_rank() == 0 or not collective:
            shutil.rmtree(staging, ignore_errors=True)
        raise
