"""Deterministic batches from a LatentDataset folder (format: docs/artifacts.md, read with ``common.latents``).

``LatentSplit(root, split, top_fraction, quality, selection)`` is the rows of one split that the stage's data
selection takes (``common.selection``: resolutions, frame counts with 1 = images, aspect ratios; an empty selection
of the split is an error naming the missing buckets), optionally only the best fraction of them by the stage's
``QualityRanking`` (``quality_keys``), and stacks them into ``Batch``es; ``PairSplit(root)`` is the pairs
of a PreferencePairs folder (``common.pairs``) for Flow-DPO, batched as ``PairBatch``es (winners, then their
losers); ``StepSampler`` says which rows (pairs) each step and rank takes.

Quality ranking (``top_fraction`` < 1, SFT): the weighted sum of per-column z-scores over the split of ``score``
(curation's), ``aesthetic``, ``motion`` (closeness to the middle of curation's motion band in log space,
-|log m - (log lo + log hi)/2|, the band from meta.json's "curation"), ``sharpness`` (log) and ``caption_length``
(words of the caption). A clip with an unknown (NaN) value in a weighted column ranks last; clip_id breaks ties.
With one weighted column its own values rank (a z-score would only rescale them), so the default (score alone)
keeps exactly the clips and order of a plain score ranking.

Batches are a pure function of (seed, step, dp_rank), so a resumed run sees exactly the batches it would have seen.
With gradient accumulation (``stage.micro_batches`` = M) the trainer builds the sampler for dp*M ranks and gives
micro-batch m of DP rank r the rank r*M+m.

Schedule (``StepSampler``): samples are grouped by ``latent_shape`` (the bucket); a micro-batch never mixes shapes.
Epoch e shuffles each bucket with ``numpy.random.default_rng([seed, e, bucket])`` and cuts it into micro-batches
(``micro_batch_size`` clips, or ``tokens_per_micro_batch // tokens per clip`` with a token budget; the last one
wraps around). The epoch's micro-batches are shuffled with ``default_rng([seed, e])`` and stably sorted by token
count, and consecutive runs of ``data_parallel`` of them form the steps (the last step repeats its smallest
micro-batches): sorting then grouping is the split that minimises the token spread between the DP ranks of a step,
so ranks holding different buckets do about the same work. The steps are shuffled with ``default_rng([seed, e,
2**32])``; step s is step ``s % n`` of epoch ``s // n`` (n steps per epoch, the same every epoch) and DP rank r
takes micro-batch r of it. Every sample is seen once per epoch (plus the wrap-around repeats).

Prefetch (``Prefetcher``): the trainer builds step s+1's micro-batches (reading their latents, drawing their
flow-matching inputs) in one background thread while step s computes. The inputs are a pure function of (seed,
step), so they are the same whichever thread makes them: the losses are bitwise those without prefetch.

Streaming: each rank reads only the samples of its own micro-batches; shards are opened lazily (memory-mapped by
``safe_open``) the first time one of their samples is needed, so a rank never touches shards it does not use.
"""
from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Generic, List, Optional, Tuple, TypeVar

import numpy as np
import torch

from common.config import DataSelection, QualityRanking
from common.latents import CURATION, INDEX, META, LatentReader
from common.selection import bucket_counts, describe, missing_buckets, select

QUALITY_COLUMNS = ("score", "aesthetic", "motion", "sharpness", "caption_length")


@dataclass
class Batch:
    clip_ids: List[str]
    latents_BCTHW: torch.Tensor     # float32, normalised latents
    text_BLD: torch.Tensor          # float32 text-encoder features, padded as stored
    text_mask_BL: torch.Tensor      # bool, True = real token

    def to(self, device: torch.device) -> "Batch":
        return Batch(self.clip_ids, self.latents_BCTHW.to(device), self.text_BLD.to(device),
                     self.text_mask_BL.to(device))


@dataclass
class PairBatch(Batch):
    """B preference pairs as one batch of 2B clips: rows [0, B) the winners, [B, 2B) their losers (same order)."""
    pair_ids: List[str] = field(default_factory=list)
    weight_B: torch.Tensor = field(default_factory=lambda: torch.ones(0))   # each pair's loss weight

    def to(self, device: torch.device) -> "PairBatch":
        return PairBatch(self.clip_ids, self.latents_BCTHW.to(device), self.text_BLD.to(device),
                         self.text_mask_BL.to(device), self.pair_ids, self.weight_B.to(device))


def quality_keys(df: Any, quality: QualityRanking, meta: Dict[str, Any], where: Path | str = INDEX) -> Any:
    """The ranking key of every row of ``df`` (an index DataFrame): higher is better, NaN = unknown (ranks last).
    One weighted column: its own values; several: the weighted sum of their z-scores over ``df``'s rows (NaN
    propagates). A weight > 0 on a column the index lacks is an error naming it and the fix."""
    weights = {c: float(getattr(quality, c)) for c in QUALITY_COLUMNS if getattr(quality, c) > 0}
    terms = {c: _quality_term(df, c, meta, where) for c in weights}
    if len(terms) == 1:
        return next(iter(terms.values()))
    total = 0.0
    for c, w in weights.items():
        x = terms[c]
        mean, std = x.mean(skipna=True), x.std(ddof=0, skipna=True)
        z = (x - mean) / std if std > 0 else x * 0.0   # a constant column ranks nobody (NaN stays NaN)
        total = total + w * z
    return total


def _quality_term(df: Any, column: str, meta: Dict[str, Any], where: Path | str) -> Any:
    source = "caption" if column == "caption_length" else column
    if source not in df.columns:
        raise ValueError(f"quality.{column} > 0 but {where} has no '{source}' column (a LatentDataset written before "
                         "the compress stage recorded curation's scores): re-run the compress stage, or set "
                         f"quality.{column}: 0")
    if column == "caption_length":
        return df["caption"].map(lambda c: float(len(c.split())) if isinstance(c, str) else math.nan)
    x = df[column].astype(float)
    if column == "score" or column == "aesthetic":
        return x
    x = np.log(x.where(x > 0))   # log scale; non-positive values unknown
    if column == "sharpness":
        return x
    band = meta.get(CURATION) or {}
    if "motion_min" not in band or "motion_max" not in band:
        raise ValueError(f"quality.motion > 0 but {Path(where).parent / META} has no '{CURATION}' motion band "
                         "(motion_min, motion_max): re-run the compress stage on a ClipManifest whose summary.json "
                         "has curation's config, or set quality.motion: 0")
    middle = 0.5 * (math.log(band["motion_min"]) + math.log(band["motion_max"]))
    return -(x - middle).abs()


class LatentSplit:
    """The rows of one split of a LatentDataset folder, optionally only the best ``top_fraction`` by the
    ``quality`` ranking (default: curation's score), sorted by clip id: ``clip_ids``, ``shapes`` (latent
    [C,T,H,W]), ``scores``, ``load(i)`` and ``batch(indices)`` of row indices. ``reader`` is the folder's
    ``LatentReader`` (``meta``, ``vae_spatial_downsample``)."""

    def __init__(self, root: str | Path, split: str = "train", top_fraction: float = 1.0,
                 quality: Optional[QualityRanking] = None, selection: Optional[DataSelection] = None,
                 stage_name: str = ""):
        self.reader = LatentReader(root)
        self.root, self.meta = self.reader.root, self.reader.meta
        if not 0.0 < top_fraction <= 1.0:
            raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
        df = self.reader.index
        df = df[df["split"] == split]
        if df.empty:
            raise ValueError(f"{self.root / INDEX}: the '{split}' split is empty; nothing to train on")
        sel = selection or DataSelection()
        where = f"{self.root / INDEX}"
        missing = missing_buckets(df, sel, where)
        if missing:
            who = f"stage '{stage_name}'" if stage_name else "the data selection"
            raise ValueError(f"{who}: data ({describe(sel)}) has no '{split}' sample for {', '.join(missing)} in "
                             f"{where} (it holds {bucket_counts(df)}); change the stage's data selection or "
                             "curate.resolutions / curate.bucket_frames / curate.keyframes")
        df = df[select(df, sel, where)]
        if top_fraction < 1.0:   # best first; unknown (NaN) last; clip_id breaks ties so the choice is reproducible
            key = quality_keys(df, quality or QualityRanking(), self.meta, self.root / INDEX)
            df = df.assign(_score=key.astype(float).fillna(-math.inf)).sort_values(
                ["_score", "clip_id"], ascending=[False, True], kind="stable")
        keep = max(1, math.ceil(len(df) * top_fraction))
        df = df.iloc[:keep].sort_values("clip_id", kind="stable")
        self.clip_ids: List[str] = df["clip_id"].tolist()
        self.shapes: List[Tuple[int, ...]] = [self.reader.latent_shape(c) for c in self.clip_ids]
        self.scores: List[float] = df["score"].astype(float).tolist()
        # each row's resolution bucket ("" = a dataset without resolution names), for the per-step metrics
        self.resolution_of: Dict[str, str] = dict(zip(self.clip_ids, df["resolution"].astype(str) if "resolution"
                                                       in df.columns else [""] * len(df)))

    def __len__(self) -> int:
        return len(self.clip_ids)

    def load(self, i: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(latent [C,T,H,W] float32, text [L,D] float32, text_mask [L] bool) of row i."""
        return self.reader.load(self.clip_ids[i])

    def batch(self, indices: List[int]) -> Batch:
        items = [self.load(i) for i in indices]
        return Batch([self.clip_ids[i] for i in indices], torch.stack([x[0] for x in items]),
                     torch.stack([x[1] for x in items]), torch.stack([x[2] for x in items]))


class PairSplit:
    """The preference pairs of a PreferencePairs folder (``common.pairs``: a LatentDataset + pairs.parquet), sorted
    by pair id: ``pair_ids``, ``winners``, ``losers``, ``weights``, ``shapes`` (the pair's latent shape, the bucket
    the sampler groups by) and ``batch(indices)`` of pair indices -> ``PairBatch``. Every pair of pairs.parquet is
    trained on. ``reader`` is the folder's ``LatentReader``."""

    def __init__(self, root: str | Path):
        from common.pairs import read_pairs

        self.reader = LatentReader(root)
        self.root, self.meta = self.reader.root, self.reader.meta
        table = read_pairs(self.root).sort_values("pair_id", kind="stable")
        self.pair_ids: List[str] = [str(p) for p in table["pair_id"]]
        self.winners: List[str] = [str(c) for c in table["winner"]]
        self.losers: List[str] = [str(c) for c in table["loser"]]
        self.weights: List[float] = [float(w) for w in table["weight"]]
        self.shapes: List[Tuple[int, ...]] = [self.reader.latent_shape(c) for c in self.winners]
        for p, w, l, s in zip(self.pair_ids, self.winners, self.losers, self.shapes):
            if self.reader.latent_shape(l) != s:
                raise ValueError(f"{self.root}: pair {p} has latent shapes {s} ({w}) and "
                                 f"{self.reader.latent_shape(l)} ({l}); winner and loser must share one shape")

    @property
    def clip_ids(self) -> List[str]:
        """The winners (one clip per pair: what ``shapes`` describes)."""
        return self.winners

    def __len__(self) -> int:
        return len(self.pair_ids)

    def batch(self, indices: List[int]) -> PairBatch:
        ids = [self.winners[i] for i in indices] + [self.losers[i] for i in indices]
        items = [self.reader.load(c) for c in ids]
        return PairBatch(ids, torch.stack([x[0] for x in items]), torch.stack([x[1] for x in items]),
                         torch.stack([x[2] for x in items]), [self.pair_ids[i] for i in indices],
                         torch.tensor([self.weights[i] for i in indices], dtype=torch.float32))


class StepSampler:
    """Sample indices for (step, dp_rank): see the module docstring for the schedule.

    ``shapes`` are the latent shapes (C, T, H, W); ``patch_size`` the DiT's, to count video tokens per clip.
    ``tokens_per_micro_batch`` > 0 sizes micro-batches per bucket (``max(1, budget // tokens)`` clips) instead of
    the fixed ``micro_batch_size``.
    """

    def __init__(self, shapes: List[Tuple[int, ...]], micro_batch_size: int, data_parallel: int, seed: int,
                 patch_size: Tuple[int, ...] = (1, 2, 2), tokens_per_micro_batch: int = 0):
        if micro_batch_size < 1 or data_parallel < 1 or tokens_per_micro_batch < 0:
            raise ValueError("micro_batch_size and data_parallel must be >= 1, tokens_per_micro_batch >= 0")
        if not shapes:
            raise ValueError("StepSampler: no samples")
        self.mbs, self.dp, self.seed = micro_batch_size, data_parallel, seed
        self.global_batch = micro_batch_size * data_parallel   # samples per step with a fixed micro-batch size
        buckets: Dict[Tuple[int, ...], List[int]] = {}
        for i, s in enumerate(shapes):
            buckets.setdefault(tuple(s), []).append(i)
        self.keys = sorted(buckets)
        self.buckets = [buckets[k] for k in self.keys]
        self.tokens_per_sample = [math.prod(k[-3:]) // math.prod(patch_size) for k in self.keys]
        self.bucket_mbs = [max(1, tokens_per_micro_batch // t) if tokens_per_micro_batch else micro_batch_size
                           for t in self.tokens_per_sample]
        micro = sum(math.ceil(len(b) / m) for b, m in zip(self.buckets, self.bucket_mbs))
        self.batches_per_epoch = math.ceil(micro / data_parallel)     # steps per epoch, the same every epoch
        self._cache: Tuple[int, List[List[Tuple[int, List[int]]]]] | None = None

    def _epoch(self, epoch: int) -> List[List[Tuple[int, List[int]]]]:
        """The epoch's steps, each ``dp`` micro-batches ``(tokens, indices)`` in DP-rank order."""
        if self._cache and self._cache[0] == epoch:
            return self._cache[1]
        micro: List[Tuple[int, List[int]]] = []
        for b, (members, mbs) in enumerate(zip(self.buckets, self.bucket_mbs)):
            perm = [members[j] for j in np.random.default_rng([self.seed, epoch, b]).permutation(len(members))]
            need = math.ceil(len(perm) / mbs) * mbs
            padded = [perm[j % len(perm)] for j in range(need)]           # wrap around: whole micro-batches
            micro += [(mbs * self.tokens_per_sample[b], padded[k:k + mbs]) for k in range(0, need, mbs)]
        shuffled = [micro[j] for j in np.random.default_rng([self.seed, epoch]).permutation(len(micro))]
        ordered = sorted(shuffled, key=lambda m: -m[0])                   # stable: ties stay shuffled
        steps = [ordered[k:k + self.dp] for k in range(0, len(ordered), self.dp)]
        last = steps[-1]
        steps[-1] = [last[j % len(last)] for j in range(self.dp)]         # repeat the smallest micro-batches
        order = np.random.default_rng([self.seed, epoch, 1 << 32]).permutation(len(steps))
        steps = [steps[j] for j in order]
        self._cache = (epoch, steps)
        return steps

    def _step(self, step: int) -> List[Tuple[int, List[int]]]:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return self._epoch(step // self.batches_per_epoch)[step % self.batches_per_epoch]

    def global_indices(self, step: int) -> List[int]:
        """All sample indices of ``step`` (0-based), in DP-rank order."""
        return [i for _, idx in self._step(step) for i in idx]

    def step_tokens(self, step: int) -> List[int]:
        """Video tokens of each DP rank's micro-batch at ``step``."""
        return [t for t, _ in self._step(step)]

    def indices(self, step: int, dp_rank: int) -> List[int]:
        if not 0 <= dp_rank < self.dp:
            raise ValueError(f"dp_rank {dp_rank} out of range for data_parallel={self.dp}")
        return self._step(step)[dp_rank][1]


T = TypeVar("T")


class Prefetcher(Generic[T]):
    """``make(step)`` for steps ``start, start+1, ... < end``, one step ahead in a background thread.

        batches = Prefetcher(lambda step: build(step), start, end, enabled=stage.prefetch)
        for step in range(start, end):
            micro = batches.get(step)   # waits for step's (made while step-1 computed); starts step+1's
        batches.close()

    ``make`` must be a pure function of the step (it is: inputs depend on (seed, step)) and must not touch what
    the training thread mutates. Its exceptions are raised by ``get``. ``enabled=False``: ``get`` calls ``make``
    in the caller's thread, nothing runs ahead."""

    def __init__(self, make: Callable[[int], T], start: int, end: int, enabled: bool = True):
        self.make, self.end = make, end
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch") if enabled else None
        self._ahead: Optional[Tuple[int, Future]] = None
        if self._pool is not None and start < end:
            self._ahead = (start, self._pool.submit(make, start))

    def get(self, step: int) -> T:
        if self._ahead is not None and self._ahead[0] == step:
            item = self._ahead[1].result()
        else:   # prefetch off, or a step out of order
            item = self.make(step)
        self._ahead = None
        if self._pool is not None and step + 1 < self.end:
            self._ahead = (step + 1, self._pool.submit(self.make, step + 1))
        return item

    def close(self) -> None:
        """Drop the step made ahead (if any) and stop the thread."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._ahead = None
