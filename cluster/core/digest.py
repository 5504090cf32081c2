"""Content digests of files and directory trees: datasets, adapters.

A directory's digest covers every file's path relative to it and its bytes, in sorted order, so
renaming, adding, removing or changing any file changes it; a file's covers its bytes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection
from pathlib import Path


def tree_sha256(path: str | Path, exclude: Collection[str] = ()) -> str:
    """sha256 of the file at `path`, or of every file under the directory at `path` except those
    whose path relative to it is in `exclude`."""
    path = Path(path)
    digest = hashlib.sha256()
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*") if p.is_file() and str(p.relative_to(path)) not in exclude
        )
    else:
        files = [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode())
        with file.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
