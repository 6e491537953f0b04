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


# `make test` runs the suite on 2 xdist workers (`-n 2 --dist loadgroup`): every module is one group (its
# module-scoped fixtures run once), except the modules that launch torchrun workers, which form one group ("torchrun")
# so that at most one multi-process stage of a test runs at a time next to the end-to-end module (which launches its
# own). Those two groups are the longest and start first.
TORCHRUN_MODULES = {"test_multinode", "test_preference_trainer", "test_task_mix", "test_trainer", "test_trainer_ckpt",
                    "test_trainer_ckpt_cp", "test_trainer_cp", "test_trainer_dist", "test_trainer_pp",
                    "test_trainer_sp"}
FIRST = ("torchrun", "test_pipeline_e2e")


def pytest_collection_modifyitems(config, items):
    def group(item) -> str:
        name = item.module.__name__.rsplit(".", 1)[-1]
        return "torchrun" if name in TORCHRUN_MODULES else name

    for item in items:
        item.add_marker(pytest.mark.xdist_group(group(item)))
    items.sort(key=lambda item: FIRST.index(group(item)) if group(item) in FIRST else len(FIRST))   # stable
