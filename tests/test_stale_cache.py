"""tasks.lifecycle.stale_cache_warning: a local run whose run folder was deleted by hand while flytekit's local task
cache still points into it is told the fix (``make clean-runs``) before a task fails inside flytekit."""
from __future__ import annotations

import pytest
from diskcache import Cache

from tasks.lifecycle import stale_cache_warning


@pytest.fixture
def local_cache(tmp_path, monkeypatch):
    location = tmp_path / "local-cache"
    monkeypatch.setattr("flytekit.core.local_cache.CACHE_LOCATION", str(location))
    return location


def test_deleted_run_folder_with_cached_results_is_warned(tmp_path, local_cache):
    with Cache(str(local_cache)) as cache:
        cache["a"], cache["b"] = 1, 2
    warning = stale_cache_warning(tmp_path / "runs")
    assert warning is not None and "holds 2 results" in warning and "make clean-runs" in warning
    assert str(tmp_path / "runs" / "artifacts") in warning


def test_no_warning_when_artifacts_exist(tmp_path, local_cache):
    with Cache(str(local_cache)) as cache:
        cache["a"] = 1
    (tmp_path / "runs" / "artifacts").mkdir(parents=True)
    assert stale_cache_warning(tmp_path / "runs") is None


def test_no_warning_without_cached_results(tmp_path, local_cache):
    assert stale_cache_warning(tmp_path / "runs") is None
    assert not local_cache.exists()          # the check creates no cache
    Cache(str(local_cache)).close()          # an empty cache
    assert stale_cache_warning(tmp_path / "runs") is None
