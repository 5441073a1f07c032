"""Atomic writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from mmkit.files import atomic_path, write_text_atomic


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(path) as partial:
            partial.write_text("half")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_a_folder_is_published_whole(tmp_path):
    with atomic_path(tmp_path / "step_00000005") as partial:
        partial.mkdir()
        (partial / "model.safetensors").write_bytes(b"weights")
        assert not (tmp_path / "step_00000005").exists()
    assert (tmp_path / "step_00000005" / "model.safetensors").read_bytes() == b"weights"


def test_file_systems_that_cannot_sync_folders_still_get_the_file(tmp_path, monkeypatch):
    real_fsync = os.fsync

    def fsync(descriptor: int) -> None:  # what some network and FUSE mounts answer for folders
        if stat.S_ISDIR(os.fstat(descriptor).st_mode):
            raise OSError(errno.EINVAL, "Invalid argument")
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", fsync)
    write_text_atomic(tmp_path / "recipe.toml", "[run]\n")
    assert (tmp_path / "recipe.toml").read_text() == "[run]\n"


def test_a_file_that_cannot_be_synced_is_not_published(tmp_path, monkeypatch):
    def fsync(descriptor: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match="Input/output error"):
        write_text_atomic(tmp_path / "summary.json", "{}")
    assert list(tmp_path.iterdir()) == []


def test_a_folder_trees_nested_files_are_synced_before_it_is_published(tmp_path, monkeypatch):
    synced, real_fsync = set(), os.fsync

    def fsync(descriptor: int) -> None:
        synced.add(os.fstat(descriptor).st_ino)
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", fsync)
    with atomic_path(tmp_path / "train") as partial:  # an image folder: a class folder per label
        (partial / "cat").mkdir(parents=True)
        (partial / "cat" / "0.jpg").write_bytes(b"jpeg")
    assert (tmp_path / "train" / "cat" / "0.jpg").stat().st_ino in synced
