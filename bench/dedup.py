"""Near-duplicate search at scale: ``find_duplicates`` (multi-index) vs ``find_duplicates_all_pairs`` (reference).

    .venv/bin/python bench/dedup.py                  # 100k clips, ~1.5 min on 2 cores -> bench/results/dedup_cpu.json
    .venv/bin/python bench/dedup.py --clips 20000 --subset 1000

The clips are synthetic 3-frame pHashes (curation's NUM_FRAMES): 60% independent random hashes, 30% siblings of
2,000 scene centres (8..20 bits per frame from the centre, so siblings are 16..40 bits apart: near the threshold,
many candidates, mostly not duplicates) and 10% near-copies of an earlier clip (0..10 bits per frame). The index
runs on all of them. The all-pairs reference is O(N * kept): it runs on the first ``--subset`` clips (where both
must agree exactly), and its time for all clips is EXTRAPOLATED from its time per comparison there times the number
of comparisons it would make on all clips (sum over clips of the kept clips before it, known from the index run).
Prints the load first, then both times side by side and ``speedup``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.config import CurateConfig  # noqa: E402
from tasks.curate.dedup import find_duplicates, find_duplicates_all_pairs  # noqa: E402


def make_hashes(n: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 2 ** 63, size=(n, 3), dtype=np.int64).astype(np.uint64) * np.uint64(2) \
        + rng.integers(0, 2, size=(n, 3)).astype(np.uint64)
    centres = frames[:2000].copy()
    kind = rng.random(n)

    def flips(count: np.ndarray) -> np.ndarray:   # one random mask with count[i, j] bits per frame
        order = rng.random((len(count), 3, 64)).argsort(-1)
        on = order < count[..., None]
        return (on.astype(np.uint64) << np.arange(64, dtype=np.uint64)).sum(-1, dtype=np.uint64)

    sib = np.flatnonzero((kind >= 0.6) & (kind < 0.9))
    frames[sib] = centres[rng.integers(0, len(centres), len(sib))] ^ flips(rng.integers(8, 21, (len(sib), 3)))
    near = np.flatnonzero(kind >= 0.9)
    near = near[near > 0]
    src = (rng.random(len(near)) * near).astype(np.int64)   # an earlier clip
    frames[near] = frames[src] ^ flips(rng.integers(0, 11, (len(near), 3)))
    return [(f"clip{i:06d}", "".join(f"{int(v):016x}" for v in row)) for i, row in enumerate(frames)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=100_000)
    ap.add_argument("--subset", type=int, default=2000, help="clips the all-pairs reference runs on")
    args = ap.parse_args()
    load_before = os.getloadavg()
    print(f"load average {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f} on {os.cpu_count()} cpus")
    max_distance = CurateConfig().dedup_max_distance
    items = make_hashes(args.clips)
    t0 = time.perf_counter()
    fast = find_duplicates(items, max_distance)
    t_index = time.perf_counter() - t0
    kept_before, comparisons = 0, 0   # the comparisons the reference would make: every clip x the kept before it
    for cid, _ in items:
        comparisons += kept_before
        kept_before += cid not in fast
    sub = items[:args.subset]
    t0 = time.perf_counter()
    ref_sub = find_duplicates_all_pairs(sub, max_distance)
    t_sub = time.perf_counter() - t0
    fast_sub = find_duplicates(sub, max_distance)
    sub_kept, sub_comparisons = 0, 0
    for cid, _ in sub:
        sub_comparisons += sub_kept
        sub_kept += cid not in ref_sub
    t_all_pairs = t_sub / sub_comparisons * comparisons
    load_after = os.getloadavg()
    result = {
        "clips": args.clips, "max_distance": max_distance, "duplicates": len(fast), "index_s": t_index,
        "all_pairs_subset_clips": len(sub), "all_pairs_subset_s": t_sub, "subset_equal": fast_sub == ref_sub,
        "all_pairs_comparisons": comparisons, "all_pairs_s_extrapolated": t_all_pairs,
        "speedup": t_all_pairs / t_index, "load_avg_before": load_before[0], "load_avg_after": load_after[0],
        "cpus": os.cpu_count(),
    }
    print(f"{'clips':>8} {'index s':>10} {'all-pairs s (extrapolated)':>28} {'speedup':>9}")
    print(f"{args.clips:>8} {t_index:>10.2f} {t_all_pairs:>28.0f} {t_all_pairs / t_index:>9.0f}")
    print(f"all-pairs measured on the first {len(sub)} clips ({t_sub:.2f} s, {sub_comparisons} comparisons) and "
          f"extrapolated to {comparisons} comparisons; index == all-pairs there: {fast_sub == ref_sub}; "
          f"{len(fast)} duplicates in {args.clips} clips; load average after {load_after[0]:.2f}")
    out = Path(__file__).resolve().parent / "results" / "dedup_cpu.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"speedup {result['speedup']:.0f}")


if __name__ == "__main__":
    main()
