"""Folders in object storage (MinIO / S3), complete or absent, through the ``minio`` client of ``common.storage``.

A remote run keeps its stage outputs (clips + manifest, latents, exported checkpoint weights) under
``tracking.artifact_uri`` ("" = local only, the default). A folder is uploaded object by object (files above
``part_size`` as multipart uploads), each object carrying its sha256 in its metadata (``x-amz-meta-sha256``), and
``<prefix>/_MANIFEST.json`` (relative path, size and sha256 of every file) is written LAST. A prefix without a
manifest is absent to every reader: an upload that was interrupted, is still running or gave up is never read.
A download verifies every file against the manifest and fills the destination folder only when all of them match.

    manifest = upload_folder("runs/artifacts/compress/ab12", "s3://bucket/run/compress/ab12", exclude=["*.tmp"])
    if folder_exists("s3://bucket/run/compress/ab12"):
        download_folder("s3://bucket/run/compress/ab12", "/scratch/latents")

    python -m common.objectstore upload LOCAL s3://bucket/prefix [--exclude PATTERN ...]
    python -m common.objectstore download s3://bucket/prefix LOCAL
    python -m common.objectstore ls s3://bucket/prefix        # the manifest, or "absent"

Faults: an unreachable endpoint, a dropped connection or a 5xx answer is retried with exponential backoff (0.5 s,
doubling, at most 8 s apart) for at most ``max_wait_s`` in total (default ``$VGEN_S3_MAX_WAIT_S``, else 120 s: a
30 s outage passes), then a ConnectionError says how long it tried and what to change. Re-uploading an object is
harmless (same key, same bytes); multipart uploads left under the prefix by an interrupted upload are aborted
before the manifest is written, and objects of an earlier upload to the same prefix that the new one does not
have are deleted (the old manifest goes first, so a reader never sees a mix). S3 settings and credentials: the
AWS_* environment variables (``common.storage``); they are never written into a manifest, a metadata field or a
log line.
"""
from __future__ import annotations

import argparse
import fnmatch
import functools
import hashlib
import io
import json
import os
import shutil
import sys
import time
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Dict, List, Optional, Sequence, TypeVar

from common.storage import parse_s3_uri, s3_client

MANIFEST = "_MANIFEST.json"
SHA_META = "sha256"                      # object metadata key (sent as x-amz-meta-sha256)
PART_SIZE = 64 * 1024 * 1024             # multipart part size (S3 allows 5 MiB .. 5 GiB)
MAX_WAIT_ENV = "VGEN_S3_MAX_WAIT_S"
DEFAULT_MAX_WAIT_S = 120.0
TRANSIENT_CODES = frozenset({"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout",
                             "RequestTimeTooSkewed"})
T = TypeVar("T")


class ChecksumError(OSError):
    """A downloaded object's sha256 differs from the folder's manifest."""


def max_wait_default() -> float:
    raw = os.environ.get(MAX_WAIT_ENV, "")
    try:
        return float(raw) if raw else DEFAULT_MAX_WAIT_S
    except ValueError:
        raise ValueError(f"{MAX_WAIT_ENV} must be a number of seconds, got '{raw}'") from None


def _transient(exc: BaseException) -> bool:
    import urllib3
    from minio.error import S3Error, ServerError

    if isinstance(exc, (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, ServerError):
        return exc.status_code >= 500
    return isinstance(exc, S3Error) and exc.code in TRANSIENT_CODES


def _endpoint() -> str:
    return os.environ.get("AWS_ENDPOINT_URL", "https://s3.amazonaws.com")


def with_retry(what: str, fn: Callable[[], T], max_wait_s: Optional[float] = None,
               log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)) -> T:
    """``fn()``, retried on transient S3 errors (see module docstring) for at most ``max_wait_s`` seconds in
    total; other errors propagate at once. One line is logged when the endpoint first fails and one when it is
    back."""
    budget = max_wait_default() if max_wait_s is None else max_wait_s
    start, delay, attempts = time.monotonic(), 0.5, 0
    while True:
        attempts += 1
        try:
            result = fn()
        except Exception as exc:   # noqa: BLE001 - classified just below
            if not _transient(exc):
                raise
            waited = time.monotonic() - start
            if waited + delay > budget:
                raise ConnectionError(
                    f"{what}: S3 endpoint {_endpoint()} still failing after {waited:.0f} s and {attempts} attempts "
                    f"({type(exc).__name__}: {str(exc)[:300]}); check the endpoint, or allow a longer outage with "
                    f"{MAX_WAIT_ENV}=<seconds> (now {budget:g})") from None
            if attempts == 1:
                log(f"objectstore: {what}: S3 endpoint {_endpoint()} failed ({type(exc).__name__}); retrying for "
                    f"up to {budget:g} s")
            time.sleep(delay)
            delay = min(delay * 2, 8.0)
            continue
        if attempts > 1:
            log(f"objectstore: {what}: endpoint back after {time.monotonic() - start:.1f} s, {attempts} attempts")
        return result


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _excluded(rel: str, patterns: Sequence[str]) -> bool:
    """``rel`` (posix, relative) matches a pattern, or lies in a folder that does (``optim`` excludes optim/...)."""
    parts = rel.split("/")
    candidates = [rel] + ["/".join(parts[:i]) for i in range(1, len(parts))]
    return any(fnmatch.fnmatchcase(c, p.rstrip("/")) for p in patterns for c in candidates)


def _local_files(root: Path, exclude: Sequence[str], files: Optional[Sequence[str]]) -> List[str]:
    if files is not None:
        rels = sorted(PurePosixPath(f).as_posix() for f in files)
        missing = [r for r in rels if not (root / r).is_file()]
        if missing:
            raise FileNotFoundError(f"upload of {root}: listed files not found: {missing[:5]}")
    else:
        rels = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    rels = [r for r in rels if not _excluded(r, exclude)]
    if MANIFEST in rels:
        raise ValueError(f"upload of {root}: it has a file named {MANIFEST}, the name reserved for the manifest; "
                         "rename it or exclude it")
    return rels


def _abort_stale_uploads(client, bucket: str, prefix: str) -> int:
    """Abort multipart uploads under ``prefix`` left by an interrupted upload; returns how many."""
    result = client._list_multipart_uploads(bucket, prefix=prefix, max_uploads=1000)
    n = 0
    for upload in result.uploads or []:
        client._abort_multipart_upload(bucket, upload.object_name, upload.upload_id)
        n += 1
    return n


def upload_folder(local: str | Path, uri: str, exclude: Sequence[str] = (), files: Optional[Sequence[str]] = None,
                  create_bucket: bool = True, part_size: int = PART_SIZE, max_wait_s: Optional[float] = None,
                  progress: Callable[[str], None] = lambda rel: None) -> dict:
    """Upload ``local`` (every file, or only ``files``: paths relative to it; minus ``exclude`` fnmatch patterns
    on the relative path or any of its folders) to ``s3://bucket/prefix``; the manifest last. Returns the
    manifest. ``progress(rel)`` is called after each object."""
    root = Path(local)
    if not root.is_dir():
        raise FileNotFoundError(f"upload_folder: local folder not found: {root}")
    bucket, prefix = parse_s3_uri(uri)
    if not prefix:
        raise ValueError(f"upload_folder: {uri} is a whole bucket; give a prefix (s3://{bucket}/<prefix>)")
    rels = _local_files(root, exclude, files)
    entries: List[Dict[str, Any]] = [{"path": r, "size": (root / r).stat().st_size, "sha256": sha256_file(root / r)}
                                     for r in rels]
    client = s3_client()
    base = f"s3://{bucket}/{prefix}"

    def ensure_bucket() -> None:
        if client.bucket_exists(bucket):
            return
        if not create_bucket:
            raise FileNotFoundError(f"S3 bucket '{bucket}' does not exist (uploading to {uri}); create it or pass "
                                    "create_bucket=True")
        client.make_bucket(bucket)

    with_retry(f"uploading to {uri}", ensure_bucket, max_wait_s)
    with_retry(f"uploading to {uri}", lambda: client.remove_object(bucket, prefix + MANIFEST), max_wait_s)
    with_retry(f"uploading to {uri}", lambda: _abort_stale_uploads(client, bucket, prefix), max_wait_s)
    for e in entries:
        key = prefix + e["path"]
        with_retry(f"uploading {base}{e['path']}",
                   functools.partial(client.fput_object, bucket, key, str(root / e["path"]),
                                     metadata={SHA_META: e["sha256"]}, part_size=part_size), max_wait_s)
        progress(e["path"])
    wanted = {prefix + e["path"] for e in entries} | {prefix + MANIFEST}

    def drop_others() -> None:
        for obj in client.list_objects(bucket, prefix=prefix, recursive=True):
            if obj.object_name not in wanted:
                client.remove_object(bucket, obj.object_name)

    with_retry(f"uploading to {uri}", drop_others, max_wait_s)
    with_retry(f"uploading to {uri}", lambda: _abort_stale_uploads(client, bucket, prefix), max_wait_s)
    manifest = {"format": 1, "files": entries, "total_bytes": sum(e["size"] for e in entries)}
    body = json.dumps(manifest, indent=1, sort_keys=True).encode()
    with_retry(f"uploading {base}{MANIFEST}",
               lambda: client.put_object(bucket, prefix + MANIFEST, io.BytesIO(body), len(body),
                                         content_type="application/json"), max_wait_s)
    return manifest


def read_manifest(uri: str, max_wait_s: Optional[float] = None) -> Optional[dict]:
    """The folder's manifest, or None when ``uri`` holds no complete folder (no manifest, no bucket)."""
    from minio.error import S3Error

    bucket, prefix = parse_s3_uri(uri)
    client = s3_client()

    def get() -> Optional[bytes]:
        try:
            response = client.get_object(bucket, prefix + MANIFEST)
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchBucket"):
                return None
            raise
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    raw = with_retry(f"reading {uri.rstrip('/')}/{MANIFEST}", get, max_wait_s)
    if raw is None:
        return None
    try:
        manifest = json.loads(raw)
        assert isinstance(manifest.get("files"), list)
    except (ValueError, AssertionError, AttributeError):
        raise ValueError(f"{uri.rstrip('/')}/{MANIFEST} is not a folder manifest; upload the folder again "
                         "(python -m common.objectstore upload ...)") from None
    return manifest


def folder_exists(uri: str, max_wait_s: Optional[float] = None) -> bool:
    """True when ``uri`` holds a complete folder (its manifest exists)."""
    return read_manifest(uri, max_wait_s) is not None


def download_folder(uri: str, local: str | Path, max_wait_s: Optional[float] = None,
                    progress: Callable[[str], None] = lambda rel: None) -> Path:
    """Download the complete folder at ``uri`` into ``local`` (replacing it), every file checked against the
    manifest; ``local`` appears only when all of them match. FileNotFoundError when there is no manifest,
    ChecksumError on a mismatch."""
    manifest = read_manifest(uri, max_wait_s)
    if manifest is None:
        raise FileNotFoundError(f"no complete folder at {uri}: {MANIFEST} is missing (the upload never finished, "
                                "is still running or gave up); upload it again (python -m common.objectstore "
                                "upload LOCAL URI) or check the URI")
    bucket, prefix = parse_s3_uri(uri)
    dest = Path(local)
    tmp = dest.with_name(f".tmp-{dest.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    client = s3_client()
    base = f"s3://{bucket}/{prefix}"
    try:
        for e in manifest["files"]:
            rel = PurePosixPath(e["path"])
            if rel.is_absolute() or ".." in rel.parts:
                raise ValueError(f"{base}{MANIFEST} lists '{rel}', which leaves the destination folder; refusing it")
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            key = prefix + e["path"]
            with_retry(f"downloading {base}{e['path']}",
                       functools.partial(client.fget_object, bucket, key, str(target),
                                         tmp_file_path=f"{target}.part"), max_wait_s)
            digest = sha256_file(target)
            if digest != e["sha256"]:
                raise ChecksumError(f"{base}{e['path']}: sha256 {digest[:16]}... but the manifest says "
                                    f"{e['sha256'][:16]}... (the object was changed or damaged after its upload); "
                                    "upload the folder again from its source")
            progress(e["path"])
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.objectstore", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("upload", help="upload a folder (manifest last)")
    up.add_argument("local")
    up.add_argument("uri")
    up.add_argument("--exclude", action="append", default=[], help="fnmatch pattern (repeatable)")
    down = sub.add_parser("download", help="download and verify a complete folder")
    down.add_argument("uri")
    down.add_argument("local")
    ls = sub.add_parser("ls", help="print the manifest of a folder, or 'absent'")
    ls.add_argument("uri")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "upload":
            m = upload_folder(args.local, args.uri, exclude=args.exclude)
            print(f"uploaded {len(m['files'])} files, {m['total_bytes']} bytes to {args.uri}")
        elif args.cmd == "download":
            print(f"downloaded {args.uri} to {download_folder(args.uri, args.local)}")
        else:
            found = read_manifest(args.uri)
            if found is None:
                print(f"absent: {args.uri} has no {MANIFEST}")
                return 1
            for e in found["files"]:
                print(f"{e['size']:>12}  {e['sha256'][:16]}  {e['path']}")
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
