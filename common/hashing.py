"""The project's sha256 hashes, in one place: content hashes of artifacts, cache keys and code versions.

Every hash is a lowercase sha256 hex digest; ``n`` keeps its first ``n`` hex digits (64 = the whole digest), for
ids and keys that are read by people or used in folder names.

    from common.hashing import code_version, sha256_bytes, sha256_dir, sha256_file, sha256_json

    sha256_file("clip.mp4", n=16)                     # the file's bytes, streamed
    sha256_bytes(pixels.tobytes(), b"0:17:1", n=16)    # the concatenation of byte strings
    sha256_dir("manifest", exclude=("summary.json",))  # a folder: relative path + file hash of every file, sorted
    sha256_json([config_dict, upstream_hash], n=16)    # a JSON-serialisable value, as canonical JSON
    code_version("tasks/curate", "common")             # the *.py source of packages (paths from the repo root)
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict, Iterable, List

REPO_ROOT = Path(__file__).resolve().parent.parent
_CHUNK = 1 << 20


def _hex(h, n: int) -> str:
    if not 1 <= n <= 64:
        raise ValueError(f"n is the number of hex digits kept, 1..64 (64 = the whole sha256), got {n}")
    return h.hexdigest()[:n]


def sha256_bytes(*parts: bytes, n: int = 64) -> str:
    """sha256 of the concatenation of ``parts``."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return _hex(h, n)


def sha256_file(path: str | Path, n: int = 64) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return _hex(h, n)


def sha256_dir(path: str | Path, n: int = 64, exclude: Iterable[str] = ()) -> str:
    """sha256 over ``<relative path>\\0<sha256 of the file>\\n`` of every file under ``path``, sorted by relative path;
    ``exclude`` lists relative paths (posix, e.g. "summary.json", "vae/config.json") left out."""
    root, skip = Path(path), set(exclude)
    if not root.is_dir():
        raise NotADirectoryError(f"sha256_dir: {root} is not a folder")
    h = hashlib.sha256()
    for rel, p in sorted((q.relative_to(root).as_posix(), q) for q in root.rglob("*") if q.is_file()):
        if rel not in skip:
            h.update(f"{rel}\0{sha256_file(p)}\n".encode())
    return _hex(h, n)


def sha256_json(value: object, n: int = 64) -> str:
    """sha256 of ``value`` as canonical JSON (sorted keys, no spaces; non-JSON leaves such as paths as ``str``).
    Hash several values as one list: ``sha256_json([a, b])``."""
    blob = json.dumps(value, sort_keys=True, default=str, separators=(",", ":")).encode()
    return sha256_bytes(blob, n=n)


def _source_files(*paths: str | Path, exclude: Iterable[str] = ()) -> List[Path]:
    """The *.py files of ``paths`` (folders are searched recursively, relative paths start at the repo root), sorted
    by path, without those whose repo-relative path is in ``exclude``."""
    skip = set(exclude)
    files = set()
    for p in paths:
        p = REPO_ROOT / p
        if not p.exists():
            raise FileNotFoundError(f"code_version: {p} does not exist (paths are relative to {REPO_ROOT})")
        files |= set(p.rglob("*.py")) if p.is_dir() else {p}
    return sorted(f for f in files if f.relative_to(REPO_ROOT).as_posix() not in skip)


def code_version(*paths: str | Path, n: int = 12, exclude: Iterable[str] = ()) -> str:
    """Version of the code in ``paths`` (see ``_source_files``): sha256 over ``<repo-relative path>\\0<bytes>`` of
    every source file, so editing, adding or renaming one changes it. Task cache versions and the curation store
    keys use it."""
    h = hashlib.sha256()
    for f in _source_files(*paths, exclude=exclude):
        h.update(f.relative_to(REPO_ROOT).as_posix().encode() + b"\0" + f.read_bytes())
    return _hex(h, n)


def _module_file(name: str) -> Path | None:
    """The repository file of a dotted module name (a module or a package's __init__.py), or None."""
    base = REPO_ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(*modules: str) -> List[str]:
    """``modules`` and every repository module they import, directly or through others, at module level or inside
    functions (AST, nothing is imported), sorted. Third-party imports are left out."""
    import ast

    seen: Dict[str, Path] = {}
    todo = list(modules)
    while todo:
        name = todo.pop()
        path = _module_file(name)
        if name in seen or path is None:
            if path is None and name in modules:
                raise ModuleNotFoundError(f"imported_modules: {name} is not a module of {REPO_ROOT}")
            continue
        seen[name] = path
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                todo += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                todo += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return sorted(seen)


def module_code_version(*modules: str, n: int = 12) -> str:
    """``code_version`` of the files of ``imported_modules(*modules)``: a task's cache version that changes when any
    repository module the task runs changes (``module_code_version("tasks.compress.task")``; a task that launches a
    program in another process names its entry module too, e.g. ``"trainer.train"``)."""
    files = [_module_file(m) for m in imported_modules(*modules)]
    return code_version(*(f.relative_to(REPO_ROOT) for f in files if f is not None), n=n)
