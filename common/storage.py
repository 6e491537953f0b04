"""Input/output storage: a local folder or ``s3://bucket/prefix`` (read and written with the ``minio`` client).

Listing rules (``list_inputs``), applied to every file under the root, recursively, sorted by relative name:
- documentation is skipped: dotfiles and anything under a dot-folder, and files whose name starts with README,
  ATTRIBUTION or LICENSE (case-insensitive);
- ``<stem>.txt`` next to a video or an image ``<stem>.<ext>`` (ext in VIDEO_EXTENSIONS or IMAGE_EXTENSIONS,
  case-insensitive) is its caption sidecar, not an input (``InputFile.caption_uri``);
- every other file is an input, including other ``.txt`` files: an image extension makes it an image input, anything
  else is a video input (deciding whether it is one is the decoder's job).

S3 settings come from the environment: AWS_ENDPOINT_URL (e.g. http://127.0.0.1:9000; an https URL means TLS;
default https://s3.amazonaws.com), AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (both required), AWS_SESSION_TOKEN
(optional), AWS_REGION (default us-east-1). Errors: FileNotFoundError for a missing folder, bucket or an empty
prefix; ValueError for a malformed URI or missing credentials; ConnectionError when the endpoint cannot be reached;
OSError for other S3 errors.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Dict, List, Literal, Tuple
from urllib.parse import urlparse

VIDEO_EXTENSIONS = frozenset({".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".ts", ".flv",
                              ".wmv", ".3gp"})
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp"})   # image inputs (curated as one-frame samples)
DOC_PREFIXES = ("README", "ATTRIBUTION", "LICENSE")


@dataclass(frozen=True)
class InputFile:
    """One input: ``uri`` (local path or s3://...), size in bytes, ``name`` relative to the listed root (posix)."""
    uri: str
    size: int
    name: str
    caption_uri: str = ""   # the sidecar <stem>.txt, "" when there is none


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def parse_s3_uri(uri: str) -> Tuple[str, str]:
    """``s3://bucket/a/b`` -> ("bucket", "a/b/"); the prefix is treated as a folder ("" for the whole bucket)."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"not an s3://bucket/prefix URI: '{uri}'")
    prefix = parsed.path.strip("/")
    return parsed.netloc, f"{prefix}/" if prefix else ""


def s3_client():
    """A ``minio.Minio`` client configured from the AWS_* environment variables (see module docstring)."""
    import certifi
    import urllib3
    from minio import Minio

    endpoint = os.environ.get("AWS_ENDPOINT_URL", "https://s3.amazonaws.com")
    parsed = urlparse(endpoint)
    if parsed.scheme not in ("http", "https") or not parsed.netloc or parsed.path.strip("/"):
        raise ValueError(f"AWS_ENDPOINT_URL must look like http(s)://host[:port], got '{endpoint}'")
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if not key or not secret:
        raise ValueError(f"S3 access to {endpoint} needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                         "in the environment")
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=5.0, read=120.0), cert_reqs="CERT_REQUIRED",
        ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        retries=urllib3.Retry(total=3, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]))
    return Minio(parsed.netloc, access_key=key, secret_key=secret, session_token=os.environ.get("AWS_SESSION_TOKEN"),
                 secure=parsed.scheme == "https", region=os.environ.get("AWS_REGION", "us-east-1"), http_client=http)


class _S3:
    """Context manager turning minio/urllib3 errors into the errors listed in the module docstring."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> "_S3":
        return self

    def __exit__(self, exc_type, exc, tb) -> Literal[False]:
        if exc is None or isinstance(exc, (FileNotFoundError, ValueError)):
            return False
        import urllib3
        from minio.error import S3Error

        if isinstance(exc, urllib3.exceptions.HTTPError):
            endpoint = os.environ.get("AWS_ENDPOINT_URL", "https://s3.amazonaws.com")
            raise ConnectionError(f"{self.what}: cannot reach S3 endpoint {endpoint}: {exc}") from None
        if isinstance(exc, S3Error):
            if exc.code in ("NoSuchBucket", "NoSuchKey"):
                raise FileNotFoundError(f"{self.what}: {exc.code}: {exc.message}") from None
            raise OSError(f"{self.what}: S3 error {exc.code}: {exc.message}") from None
        return False


def _is_doc(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return any(p.startswith(".") for p in parts) or parts[-1].upper().startswith(DOC_PREFIXES)


def classify(names: List[str]) -> Tuple[List[str], Dict[str, str]]:
    """Split relative file names into (inputs, {video name: caption sidecar name}); documentation is dropped."""
    names = sorted(n for n in names if not _is_doc(n))
    videos_by_stem: Dict[str, List[str]] = {}
    for n in names:
        p = PurePosixPath(n)
        if p.suffix.lower() in VIDEO_EXTENSIONS | IMAGE_EXTENSIONS:
            videos_by_stem.setdefault(str(p.with_suffix("")), []).append(n)
    captions: Dict[str, str] = {}
    for n in names:
        p = PurePosixPath(n)
        if p.suffix.lower() == ".txt":
            for video in videos_by_stem.get(str(p.with_suffix("")), []):
                captions[video] = n
    sidecars = set(captions.values())
    return [n for n in names if n not in sidecars], captions


def _list_local(root_uri: str) -> List[InputFile]:
    root = Path(root_uri[len("file://"):] if root_uri.startswith("file://") else root_uri)
    if not root.exists():
        raise FileNotFoundError(f"input folder not found: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"input URI must be a folder or s3://bucket/prefix, got file {root}")
    sizes = {p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*") if p.is_file()}
    inputs, captions = classify(list(sizes))
    return [InputFile(str(root / n), sizes[n], n, str(root / captions[n]) if n in captions else "") for n in inputs]


def _list_s3(uri: str) -> List[InputFile]:
    bucket, prefix = parse_s3_uri(uri)
    client = s3_client()
    with _S3(f"listing {uri}"):
        if not client.bucket_exists(bucket):
            raise FileNotFoundError(f"S3 bucket '{bucket}' does not exist (listing {uri})")
        sizes = {o.object_name[len(prefix):]: int(o.size or 0)
                 for o in client.list_objects(bucket, prefix=prefix, recursive=True)
                 if not o.is_dir and not o.object_name.endswith("/")}
    if not sizes:
        raise FileNotFoundError(f"no objects under {uri}")
    inputs, captions = classify(list(sizes))
    base = f"s3://{bucket}/{prefix}"
    return [InputFile(base + n, sizes[n], n, base + captions[n] if n in captions else "") for n in inputs]


def list_inputs(uri: str) -> List[InputFile]:
    """Inputs under a local folder or ``s3://bucket/prefix``, sorted by relative name (rules in module docstring)."""
    return _list_s3(uri) if is_s3(uri) else _list_local(str(uri))


def fetch(item: InputFile, dest_dir: str | Path) -> Path:
    """Local path of ``item``: local inputs are returned as they are, S3 objects are downloaded into ``dest_dir``."""
    if not is_s3(item.uri):
        path = Path(item.uri)
        if not path.is_file():
            raise FileNotFoundError(f"input file not found: {path}")
        return path
    bucket, key = _split_object_uri(item.uri)
    dest = Path(dest_dir) / item.name
    if ".." in PurePosixPath(item.name).parts or PurePosixPath(item.name).is_absolute():
        raise ValueError(f"refusing to download {item.uri}: its name '{item.name}' leaves the destination folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _S3(f"downloading {item.uri}"):
        s3_client().fget_object(bucket, key, str(dest))
    return dest


def _split_object_uri(uri: str) -> Tuple[str, str]:
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc or not parsed.path.strip("/"):
        raise ValueError(f"not an s3://bucket/key object URI: '{uri}'")
    return parsed.netloc, parsed.path.lstrip("/")


def read_text(uri: str) -> str:
    """Text content (UTF-8, undecodable bytes replaced) of a local file or an S3 object."""
    if not is_s3(uri):
        return Path(uri).read_bytes().decode("utf-8", errors="replace")
    bucket, key = _split_object_uri(uri)
    with _S3(f"reading {uri}"):
        response = s3_client().get_object(bucket, key)
        try:
            return response.read().decode("utf-8", errors="replace")
        finally:
            response.close()
            response.release_conn()


def upload_dir(local_dir: str | Path, s3_uri: str, create_bucket: bool = False) -> List[str]:
    """Upload every file under ``local_dir`` to ``s3_uri`` keeping relative paths; returns the object URIs."""
    root = Path(local_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"upload_dir: local folder not found: {root}")
    bucket, prefix = parse_s3_uri(s3_uri)
    client = s3_client()
    uploaded = []
    with _S3(f"uploading {root} to {s3_uri}"):
        if not client.bucket_exists(bucket):
            if not create_bucket:
                raise FileNotFoundError(f"S3 bucket '{bucket}' does not exist (uploading to {s3_uri})")
            client.make_bucket(bucket)
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            key = prefix + path.relative_to(root).as_posix()
            client.fput_object(bucket, key, str(path))
            uploaded.append(f"s3://{bucket}/{key}")
    return uploaded
