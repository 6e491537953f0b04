"""Lineage of the artifacts (planned: a query CLI over the content hashes the artifacts carry).

The hash functions moved to ``common.hashing``; the two old names below remain only for tasks/train/task.py.
"""
from __future__ import annotations

from functools import partial

from common.hashing import sha256_dir, sha256_json

# TODO(rename): tasks/train/task.py still imports these two names; use common.hashing there and delete them.
hash_dir = partial(sha256_dir, n=16)


def hash_values(*values: object) -> str:
    return sha256_json(list(values), n=16)
