"""tasks.lifecycle.drop_stale_cache: after the run folder was deleted by hand, the cached results of flytekit's local
task cache that name its missing artifact folders are removed (their tasks run again) and nothing else is."""
from __future__ import annotations

import pytest
from diskcache import Cache

from tasks.lifecycle import drop_stale_cache


@pytest.fixture
def local_cache(tmp_path, monkeypatch):
    location = tmp_path / "local-cache"
    monkeypatch.setattr("flytekit.core.local_cache.CACHE_LOCATION", str(location))
    return location


def _literal(path) -> bytes:   # a serialized LiteralMap holds the folder's path as plain bytes (msgpack or a uri)
    return b"\x88\xa6folder\x81\xa4path\xd91" + str(path).encode() + b"\xacontent_hash"


def test_only_entries_naming_missing_artifact_folders_are_removed(tmp_path, local_cache):
    root = tmp_path / "runs"
    kept = root / "artifacts" / "curate" / "0123abcd"
    kept.mkdir(parents=True)
    with Cache(str(local_cache)) as cache:
        cache["present"] = _literal(kept)
        cache["missing"] = _literal(root / "artifacts" / "compress" / "c81efab2250db779")
        cache["inside_missing"] = _literal(root / "artifacts" / "train" / "stage1-9f" / "step_00000010")
        cache["other_project"] = _literal(tmp_path / "elsewhere" / "artifacts" / "compress" / "gone")
        cache["not_bytes"] = 7
    note = drop_stale_cache(root)
    assert note is not None and note.startswith("note: removed 2 cached result(s)") and "make clean-runs" in note
    with Cache(str(local_cache)) as cache:
        assert sorted(cache.iterkeys()) == ["not_bytes", "other_project", "present"]
    assert drop_stale_cache(root) is None   # nothing left to repair


def test_no_cache_no_change(tmp_path, local_cache):
    assert drop_stale_cache(tmp_path / "runs") is None
    assert not local_cache.exists()          # the check creates no cache
