"""A directory appears whole or not at all (megatron_selfreward/megatron/publish.py): one helper for the
GGUF import, the HF <-> Megatron converters and Megatron checkpoints."""

from __future__ import annotations

import pytest

from megatron_selfreward.megatron.publish import staged_directory


def _debris(parent) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def test_published_only_when_complete(tmp_path):
    target = tmp_path / "model"
    with staged_directory(target) as staging:
        (staging / "sub").mkdir()
        (staging / "sub" / "w.bin").write_bytes(b"x")
        assert not target.exists()  # nothing under the target's name while writing
    assert (target / "sub" / "w.bin").read_bytes() == b"x" and not _debris(tmp_path)


def test_a_failure_leaves_nothing_and_keeps_the_old_directory(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old").write_text("kept")
    with pytest.raises(RuntimeError), staged_directory(target, overwrite=True) as staging:
        (staging / "half").write_text("?")
        raise RuntimeError("disk full")
    assert (target / "old").read_text() == "kept" and not _debris(tmp_path)


def test_existing_output_needs_overwrite(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    with staged_directory(target) as staging:  # an empty directory is not an output
        (staging / "a").write_text("1")
    with pytest.raises(FileExistsError, match="--overwrite"):
        with staged_directory(target):
            pass
    with staged_directory(target, overwrite=True) as staging:
        (staging / "b").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b"] and not _debris(tmp_path)


def test_one_appearing_meanwhile_is_not_clobbered(tmp_path):
    target = tmp_path / "model"
    with pytest.raises(FileExistsError):
        with staged_directory(target) as staging:
            (staging / "mine").write_text("1")
            target.mkdir()
            (target / "theirs").write_text("2")
    assert [p.name for p in target.iterdir()] == ["theirs"] and not _debris(tmp_path)
