"""find_duplicates (multi-index over the hash bits) against find_duplicates_all_pairs (the reference): the same
kept clip and the same distance float for every duplicate, on random and adversarial hash sets."""
from __future__ import annotations

import random
from typing import List, Tuple

import pytest

from tasks.curate.dedup import (
    HashIndex,
    find_duplicates,
    find_duplicates_all_pairs,
    max_bit_distance,
)


def _hex(frames: List[int]) -> str:
    return "".join(f"{f:016x}" for f in frames)


def _flip(h: int, bits: int, rng: random.Random) -> int:
    for b in rng.sample(range(64), bits):
        h ^= 1 << b
    return h


def _clustered(rng: random.Random, n: int, frames: int, spread: int) -> List[Tuple[str, str]]:
    """Clips around a few centres, each frame ``0..spread`` bits away: many pairs near any threshold."""
    centres = [[rng.getrandbits(64) for _ in range(frames)] for _ in range(5)]
    out = []
    for _ in range(n):
        c = rng.choice(centres)
        out.append((f"c{rng.randrange(10 ** 6):06d}", _hex([_flip(f, rng.randint(0, spread), rng) for f in c])))
    return out


def test_max_bit_distance_is_the_float_threshold() -> None:
    for frames in (1, 2, 3, 5):
        for d in (-1.0, 0.0, 1 / 3, 0.5, 2.0, 7.999, 8, 8.3333333333333333, 21.5, 63.9):
            r = max_bit_distance(frames, d)
            assert all((s / frames <= d) == (s <= r) for s in range(64 * frames + 1)), (frames, d, r)


@pytest.mark.parametrize("max_distance", [0, 2, 8, 8.5, 13 / 3, 20, 40])
def test_same_as_all_pairs_clustered(max_distance: float) -> None:
    rng = random.Random(int(max_distance * 10))
    items = _clustered(rng, 250, 3, 14)
    fast, ref = find_duplicates(items, max_distance), find_duplicates_all_pairs(items, max_distance)
    assert fast == ref
    assert 0 < len(ref) < len(items) or max_distance in (0, 2, 40)


def test_same_as_all_pairs_random_with_planted_duplicates() -> None:
    rng = random.Random(1)
    items: List[Tuple[str, str]] = []
    for i in range(400):
        if items and rng.random() < 0.3:   # near an earlier clip: 0..12 bits per frame, around the threshold
            base = rng.choice(items)[1]
            frames = [_flip(int(base[j:j + 16], 16), rng.randint(0, 12), rng) for j in range(0, 48, 16)]
        else:
            frames = [rng.getrandbits(64) for _ in range(3)]
        items.append((f"id{i}", _hex(frames)))
    ref = find_duplicates_all_pairs(items, 8)
    assert find_duplicates(items, 8) == ref and len(ref) > 30


def test_ties_mixed_lengths_and_odd_inputs() -> None:
    rng = random.Random(2)
    base = [rng.getrandbits(64) for _ in range(3)]
    # two kept clips at the same distance from a later one: the smaller clip_id wins, not the first kept
    a, b = _hex([base[0] ^ 0b1111, base[1], base[2]]), _hex([base[0] ^ (0b1111 << 40), base[1], base[2]])
    items = [("z", a), ("y", b), ("q", _hex(base))]
    assert find_duplicates(items, 1.34) == find_duplicates_all_pairs(items, 1.34) == {"q": ("y", 8 / 6)}
    # frame counts 0..4 (images, short clips, an empty hash) compared on their common prefix; repeated ids
    mixed = []
    for i in range(300):
        k = rng.choice([0, 1, 1, 2, 3, 3, 4])
        src = base + [rng.getrandbits(64)] if rng.random() < 0.6 else [rng.getrandbits(64) for _ in range(4)]
        mixed.append((f"m{i % 280}", _hex([_flip(f, rng.randint(0, 10), rng) for f in src[:k]])))
    for d in (0, 3, 5.5, 8, 63.5, 64, 100, -1):
        assert find_duplicates(mixed, d) == find_duplicates_all_pairs(mixed, d), d
    # not hex frame hashes: the reference path, same answer
    odd = [("a", "0" * 16), ("b", "0" * 15 + "1"), ("c", "0" * 17)]
    assert find_duplicates(odd, 8) == find_duplicates_all_pairs(odd, 8)


def test_index_is_exact_at_every_radius() -> None:
    """Pigeonhole: every hash within the radius is found, whatever band/flip layout the cost estimate picks."""
    rng = random.Random(3)
    for prefix, radius, expected in [(1, 0, 10), (1, 7, 10 ** 5), (3, 24, 10), (3, 24, 10 ** 5), (2, 90, 100),
                                     (1, 63, 100)]:
        index = HashIndex(prefix, radius, expected)
        base = rng.getrandbits(64 * prefix)
        bits = range(64 * prefix)
        values = [base ^ sum(1 << b for b in rng.sample(bits, rng.randint(0, min(radius + 3, len(bits)))))
                  for _ in range(200)]
        for slot, v in enumerate(values):
            index.add(v, slot)
        for q in values[:20] + [base]:
            want = sorted((s, (v ^ q).bit_count()) for s, v in enumerate(values) if (v ^ q).bit_count() <= radius)
            assert sorted(index.search(q)) == want
