"""Files that appear complete or not at all.

A file is written under a temporary name beside its final one and renamed into place with
``os.replace``, which is atomic within one filesystem: a reader, or a job killed mid-write, sees the
old file or the new one, never a part. Temporary names start with ``.tmp-`` and carry the writer's
pid, so two writers never share one, and whoever owns a directory can clear what an interrupted
writer left (``TMP_PATTERN``).
"""
from __future__ import annotations

import os
from pathlib import Path

TMP_PATTERN = ".tmp-*"


def tmp_sibling(path: Path) -> Path:
    """The temporary name under which ``path`` is built before it is renamed into place."""
    return path.with_name(f".tmp-{path.name}-{os.getpid()}")


def fsync(path: Path) -> None:
    """Flush a file's or a directory's data (a directory: the names it holds) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    tmp = tmp_sibling(path)
    tmp.write_text(text)
    fsync(tmp)
    os.replace(tmp, path)
