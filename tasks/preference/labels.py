"""The pair TABLE that annotation tools fill, and its resolution into preference pairs (docs/artifacts.md), no Flyte.

A table is a ``.parquet``, ``.csv`` or ``.jsonl`` file (a local path or an ``s3://`` URI), one row per comparison:

    prompt      the text both videos were made from (non-empty)
    video_a     a video: a path relative to the table's folder (or prefix on S3), an absolute path or an s3:// URI
    video_b     the other video
    <dim>       one column per ``train.pairs.dimensions`` (default visual_quality, motion_quality, text_alignment):
                "a", "b" or "tie" (case and surrounding spaces ignored)
    a_correct   optional absolute judgement of video_a: true/false (also 1/0, yes/no); missing or empty = true
    b_correct   the same for video_b
Other columns are ignored. A table missing a required column is refused as a whole (ValueError naming it).

Resolution of a row (``resolve_row``, pure), first match wins; every outcome has a readable ``reason`` and a
countable ``key`` (as ``tasks/curate/filters.py``):

    unreadable row    a malformed CSV/JSONL line, an empty prompt or video, a label that is not a/b/tie, a
                      correctness flag that is not a boolean
    both incorrect    a_correct and b_correct are both false
    tie               no dimension decided, or as many wins for a as for b (ties are ignored when counting)
    winner incorrect  the video that won more dimensions has a false correctness flag
    kept              winner = the video with more wins; a loser flagged incorrect keeps the pair (it strengthens it)
                      weight = |wins_a - wins_b| / number of dimensions  (1.0 = unanimous, 1/3 = won by one of three)

The encoding step (``tasks/preference/encode.py``) drops more rows for what only reading the videos can tell:
``missing video``, ``unreadable video``, ``video too short``, ``identical videos`` and ``over max_pairs``.
Nothing is silently lost: kept + dropped = rows, counted per key in the output's summary.json.

    rows = read_table(Path("labels.csv"))
    results = resolve_table(rows, ["visual_quality", "motion_quality", "text_alignment"])
    count_keys(results)                                  # {"tie": 2, "winner incorrect": 1}
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import posixpath
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from common.hashing import sha256_bytes, sha256_file, sha256_json
from common.storage import InputFile, fetch, is_s3

PREFERENCES = ("a", "b", "tie")
VIDEO_COLUMNS = ("video_a", "video_b")
CORRECT_COLUMNS = ("a_correct", "b_correct")
TABLE_SUFFIXES = (".parquet", ".csv", ".jsonl")
_TRUE, _FALSE = {"true", "t", "yes", "y", "1"}, {"false", "f", "no", "n", "0"}

# countable keys of the dropped rows
UNREADABLE_ROW = "unreadable row"
BOTH_INCORRECT = "both incorrect"
TIE = "tie"
WINNER_INCORRECT = "winner incorrect"
MISSING_VIDEO = "missing video"
UNREADABLE_VIDEO = "unreadable video"
SHORT_VIDEO = "video too short"
IDENTICAL_VIDEOS = "identical videos"
OVER_MAX_PAIRS = "over max_pairs"


@dataclass(frozen=True)
class TableRow:
    """One data row of a table: its 0-based position (header and blank lines not counted), its values by column, and
    ``error`` when the line could not be read as a record ("" when it could)."""
    row: int
    values: Dict[str, Any]
    error: str = ""


@dataclass(frozen=True)
class Resolution:
    """What became of one table row: ``kept`` with a winner and a weight, or dropped with ``reason`` (readable, names
    the values) and ``key`` (countable). The parsed fields are filled as far as the row could be read."""
    row: int
    kept: bool
    reason: str = ""
    key: str = ""
    winner: str = ""                  # "a" | "b"; "" when no side won
    weight: float = 0.0               # |wins_a - wins_b| / number of dimensions (kept rows)
    wins_a: int = 0
    wins_b: int = 0
    prompt: str = ""
    video_a: str = ""
    video_b: str = ""
    labels: Dict[str, str] = field(default_factory=dict)   # dimension -> "a" | "b" | "tie"
    a_correct: bool = True
    b_correct: bool = True

    @property
    def loser(self) -> str:
        return {"a": "b", "b": "a"}.get(self.winner, "")

    def video(self, side: str) -> str:
        """The video reference of side "a" or "b"."""
        return {"a": self.video_a, "b": self.video_b}[side]

    def correct(self, side: str) -> bool:
        return {"a": self.a_correct, "b": self.b_correct}[side]

    def drop(self, key: str, detail: str) -> "Resolution":
        """This row, dropped for ``key`` (a constant above) with the readable ``detail``."""
        return dataclasses.replace(self, kept=False, key=key, reason=f"{key}: {detail}", weight=0.0)


def _missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def _text(value: Any) -> Optional[str]:
    """A non-empty string, or None."""
    return None if _missing(value) or not isinstance(value, str) else value.strip()


def _preference(value: Any) -> Optional[str]:
    if not isinstance(value, str):
        return None
    v = value.strip().lower()
    return v if v in PREFERENCES else None


def _flag(value: Any) -> Optional[bool]:
    """A correctness flag: missing -> True (the default), a boolean form -> its value, anything else -> None."""
    if _missing(value):
        return True
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)) and int(value) in (0, 1):
        return bool(int(value))
    if isinstance(value, float) and value in (0.0, 1.0):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    return None


def resolve_row(row: TableRow, dimensions: Sequence[str]) -> Resolution:
    """The outcome of one table row (module docstring: the order of the checks, the weight)."""
    base = Resolution(row=row.row, kept=False)
    if row.error:
        return base.drop(UNREADABLE_ROW, row.error)
    v = row.values
    prompt, video_a, video_b = _text(v.get("prompt")), _text(v.get("video_a")), _text(v.get("video_b"))
    problems = [f"{name} is empty or not text"
                for name, x in (("prompt", prompt), ("video_a", video_a), ("video_b", video_b)) if x is None]
    labels: Dict[str, str] = {}
    for dim in dimensions:
        pref = _preference(v.get(dim))
        if pref is None:
            problems.append(f"{dim}={v.get(dim)!r} (expected a, b or tie)")
        else:
            labels[dim] = pref
    flags = {}
    for col in CORRECT_COLUMNS:
        ok = _flag(v.get(col))
        if ok is None:
            problems.append(f"{col}={v.get(col)!r} (expected true or false)")
        flags[col] = True if ok is None else ok
    wins_a = sum(p == "a" for p in labels.values())
    wins_b = sum(p == "b" for p in labels.values())
    parsed = dataclasses.replace(base, prompt=prompt or "", video_a=video_a or "", video_b=video_b or "",
                                 labels=labels, wins_a=wins_a, wins_b=wins_b, a_correct=flags["a_correct"],
                                 b_correct=flags["b_correct"])
    if problems:
        return parsed.drop(UNREADABLE_ROW, "; ".join(problems))
    if not parsed.a_correct and not parsed.b_correct:
        return parsed.drop(BOTH_INCORRECT, "a_correct and b_correct are both false")
    if wins_a == wins_b:
        return parsed.drop(TIE, f"{wins_a} win(s) each over {len(dimensions)} dimension(s) "
                                f"({', '.join(f'{d} {p}' for d, p in labels.items())})")
    winner = "a" if wins_a > wins_b else "b"
    decided = dataclasses.replace(parsed, winner=winner)
    if not decided.correct(winner):
        return decided.drop(WINNER_INCORRECT, f"{winner} preferred {max(wins_a, wins_b)}-{min(wins_a, wins_b)} "
                                              f"but {winner}_correct is false")
    return dataclasses.replace(decided, kept=True, weight=abs(wins_a - wins_b) / len(dimensions))


def resolve_table(rows: Sequence[TableRow], dimensions: Sequence[str]) -> List[Resolution]:
    """``resolve_row`` for every row, in table order."""
    if not dimensions:
        raise ValueError("train.pairs.dimensions must name at least one preference dimension")
    return [resolve_row(r, dimensions) for r in rows]


def count_keys(results: Sequence[Resolution]) -> Dict[str, int]:
    """Dropped rows per key, most frequent first."""
    return dict(Counter(r.key for r in results if not r.kept).most_common())


# ------------------------------------------------------------------------------------------------- reading tables

def _suffix(source: str) -> str:
    suffix = posixpath.splitext(source.rstrip("/"))[1].lower()
    if suffix not in TABLE_SUFFIXES:
        raise ValueError(f"train.pairs.source: a pair table must be a {', '.join(TABLE_SUFFIXES)} file (or 'auto'), "
                         f"got '{source}'")
    return suffix


def _check_columns(path: Path, columns: Sequence[str], dimensions: Sequence[str]) -> None:
    required = ["prompt", *VIDEO_COLUMNS, *dimensions]
    missing = [c for c in required if c not in set(columns)]
    if missing:
        raise ValueError(f"{path}: the pair table lacks columns {missing} (it needs prompt, video_a, video_b and one "
                         f"column per train.pairs.dimensions entry: {', '.join(dimensions)}; docs/artifacts.md)")


def _read_csv(path: Path) -> tuple[List[TableRow], List[str]]:
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        rows = []
        for i, record in enumerate(reader):
            error = ""
            if None in record:                              # more fields than the header
                fields = len(header) + len(record[None])
                error = f"line {reader.line_num}: {fields} fields, the header has {len(header)}"
            elif any(v is None for v in record.values()):   # fewer fields than the header
                error = f"line {reader.line_num}: fewer fields than the header's {len(header)}"
            rows.append(TableRow(i, {k: v for k, v in record.items() if k is not None}, error))
    return rows, header


def _read_jsonl(path: Path) -> tuple[List[TableRow], List[str]]:
    rows, columns = [], set()
    lines = [ln for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            rows.append(TableRow(i, {}, f"not JSON ({e.msg} at column {e.colno})"))
            continue
        if not isinstance(record, dict):
            rows.append(TableRow(i, {}, f"a JSON {type(record).__name__}, not an object"))
            continue
        columns |= set(record)
        rows.append(TableRow(i, record))
    return rows, sorted(columns)


def _read_parquet(path: Path) -> tuple[List[TableRow], List[str]]:
    import pandas as pd

    table = pd.read_parquet(path)
    return [TableRow(i, r) for i, r in enumerate(table.to_dict("records"))], list(table.columns)


def read_table(path: str | Path, dimensions: Sequence[str]) -> List[TableRow]:
    """The rows of a local table file (format by suffix); a table without a required column is refused."""
    path = Path(path)
    reader = {".csv": _read_csv, ".jsonl": _read_jsonl, ".parquet": _read_parquet}[_suffix(str(path))]
    if not path.is_file():
        raise FileNotFoundError(f"pair table not found: {path} (train.pairs.source)")
    rows, columns = reader(path)
    _check_columns(path, columns, dimensions)
    return rows


def fetch_uri(uri: str, dest_dir: Path) -> Path:
    """A local path for ``uri``: local files as they are (FileNotFoundError when absent), S3 objects downloaded into
    ``dest_dir`` under a name made from the URI's hash (FileNotFoundError for a missing object)."""
    if not is_s3(uri):
        path = Path(uri)
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found")
        return path
    name = sha256_bytes(uri.encode(), n=16) + posixpath.splitext(uri)[1].lower()
    return fetch(InputFile(uri, 0, name), dest_dir)


def video_uri(source: str, ref: str) -> str:
    """Where a table's video reference points: an s3:// URI or an absolute path as it is; otherwise relative to the
    table's folder (or its S3 prefix)."""
    if is_s3(ref) or Path(ref).is_absolute():
        return ref
    if is_s3(source):
        return posixpath.normpath(posixpath.join(posixpath.dirname(source), ref)).replace("s3:/", "s3://", 1)
    return str(Path(source).parent / ref)


def open_table(source: str, dimensions: Sequence[str], work_dir: Path) -> tuple[List[TableRow], str]:
    """Read the table at ``source`` (local or s3://, downloaded into ``work_dir``) -> (rows, sha256 of its bytes)."""
    _suffix(source)
    path = fetch_uri(source, work_dir) if is_s3(source) else Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"pair table not found: {source} (train.pairs.source)")
    return read_table(path, dimensions), sha256_file(path)


def _size(uri: str) -> int:
    """Bytes of a local file or an S3 object; -1 when it does not exist."""
    if not is_s3(uri):
        path = Path(uri)
        return path.stat().st_size if path.is_file() else -1
    from urllib.parse import urlparse

    from minio.error import S3Error

    from common.storage import s3_client

    parsed = urlparse(uri)
    try:
        return int(s3_client().stat_object(parsed.netloc, parsed.path.lstrip("/")).size or 0)
    except S3Error:
        return -1


def source_fingerprint(source: str, dimensions: Sequence[str], work_dir: Path) -> str:
    """What a cache key needs of a table: the sha256 of its bytes and the (reference, size) of every video it names,
    so editing the table or replacing a video changes it (like curation's input fingerprint); "" for "auto"."""
    if source == "auto":
        return ""
    rows, table_hash = open_table(source, dimensions, work_dir)
    refs = sorted({str(r.values.get(c)) for r in rows for c in VIDEO_COLUMNS if _text(r.values.get(c))})
    return sha256_json([table_hash, [(ref, _size(video_uri(source, ref))) for ref in refs]], n=16)
