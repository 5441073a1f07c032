"""Writing files and folders atomically: under a temporary name, synced, then renamed.

A reader (or a resumed run) sees the old version or the new one, never half of one.
"""

from __future__ import annotations

import errno
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def partial_path(path: Path) -> Path:
    """The temporary sibling that ``path`` is written under before it is published."""
    return path.with_name(f".partial-{path.name}")


def publish(partial: Path, path: Path) -> None:
    """Sync ``partial`` (a file, or a folder tree) to disk and rename it onto ``path``."""
    if partial.is_dir():
        for file in sorted(partial.rglob("*")):  # an image folder's files are a level down
            _fsync(file)
    _fsync(partial)
    os.replace(partial, path)
    _fsync(path.parent)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write; publish it as ``path`` only if the block succeeds."""
    partial = partial_path(path)
    try:
        yield partial
        publish(partial, path)
    finally:
        if partial.is_dir():
            shutil.rmtree(partial, ignore_errors=True)
        else:
            partial.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as partial:
        partial.write_text(text)


def _fsync(path: Path) -> None:
    """Flush a file, or a folder's entries, to disk; some file systems cannot sync folders."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    except OSError as error:
        if not (path.is_dir() and error.errno in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES)):
            raise
    finally:
        os.close(descriptor)
