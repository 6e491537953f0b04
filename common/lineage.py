"""Content hashes: every artifact carries its own hash and the hashes of its inputs; that chain is the lineage."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

_CHUNK = 1 << 20


def hash_file(path: str | Path, n: int = 16) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()[:n]


def hash_dir(path: str | Path, n: int = 16, exclude: Iterable[str] = ()) -> str:
    """Hash of a folder: relative paths and contents of every file, in sorted order (names in ``exclude`` skipped)."""
    root = Path(path)
    skip = set(exclude)
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file() and q.name not in skip):
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        h.update(hash_file(p, 64).encode())
    return h.hexdigest()[:n]


def hash_values(*values: object, n: int = 16) -> str:
    """Hash of JSON-serialisable values (configs, other hashes): the key of a derived artifact."""
    blob = json.dumps(values, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:n]
