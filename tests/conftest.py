"""Shared test setup: offline Hugging Face, repo root importable, Flyte's local cache isolated per session."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


# `make test` runs the suite on 2 xdist workers (`-n 2 --dist loadfile`: a module runs on one worker, so its
# module-scoped fixtures run once). The longest modules start first: the end-to-end module, then the ones that launch
# torchrun workers; the short ones fill in behind them.
FIRST = ("test_pipeline_e2e", "test_trainer_pp", "test_trainer_ckpt", "test_task_mix", "test_preference_trainer",
         "test_trainer_ckpt_cp", "test_trainer_sp", "test_trainer_dist", "test_trainer_cp", "test_multinode",
         "test_trainer")


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        name = item.module.__name__.rsplit(".", 1)[-1]
        return FIRST.index(name) if name in FIRST else len(FIRST)

    items.sort(key=rank)   # stable: the order inside a module and among the others is kept


def pytest_sessionfinish(session, exitstatus):
    """Stop inductor's compile-worker processes (tests/test_compile.py compiles in this process): an xdist worker
    leaves without running atexit handlers, and the pool's processes would outlive it."""
    if "torch._inductor.async_compile" in sys.modules:
        sys.modules["torch._inductor.async_compile"].shutdown_compile_workers()
