"""Deterministic batches from a LatentDataset folder (format: docs/artifacts.md, read with ``common.latents``).

``LatentSplit(root, split, top_fraction)`` is the rows of one split (optionally only the best-scored fraction) and
stacks them into ``Batch``es; ``StepSampler`` says which rows each step and rank takes.

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

Streaming: each rank reads only the samples of its own micro-batches; shards are opened lazily (memory-mapped by
``safe_open``) the first time one of their samples is needed, so a rank never touches shards it does not use.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch

from common.latents import INDEX, LatentReader


@dataclass
class Batch:
    clip_ids: List[str]
    latents_BCTHW: torch.Tensor     # float32, normalised latents
    text_BLD: torch.Tensor          # float32 text-encoder features, padded as stored
    text_mask_BL: torch.Tensor      # bool, True = real token

    def to(self, device: torch.device) -> "Batch":
        return Batch(self.clip_ids, self.latents_BCTHW.to(device), self.text_BLD.to(device),
                     self.text_mask_BL.to(device))


class LatentSplit:
    """The rows of one split of a LatentDataset folder, optionally only the best-scored ``top_fraction``, sorted by
    clip id: ``clip_ids``, ``shapes`` (latent [C,T,H,W]), ``scores``, ``load(i)`` and ``batch(indices)`` of row
    indices. ``reader`` is the folder's ``LatentReader`` (``meta``, ``vae_spatial_downsample``)."""

    def __init__(self, root: str | Path, split: str = "train", top_fraction: float = 1.0):
        self.reader = LatentReader(root)
        self.root, self.meta = self.reader.root, self.reader.meta
        if not 0.0 < top_fraction <= 1.0:
            raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
        df = self.reader.index
        df = df[df["split"] == split]
        if df.empty:
            raise ValueError(f"{self.root / INDEX}: the '{split}' split is empty; nothing to train on")
        # best first; NaN scores last; clip_id breaks ties so the choice is reproducible
        df = df.assign(_score=df["score"].astype(float).fillna(-math.inf)).sort_values(
            ["_score", "clip_id"], ascending=[False, True], kind="stable")
        keep = max(1, math.ceil(len(df) * top_fraction))
        df = df.iloc[:keep].sort_values("clip_id", kind="stable")
        self.clip_ids: List[str] = df["clip_id"].tolist()
        self.shapes: List[Tuple[int, ...]] = [self.reader.latent_shape(c) for c in self.clip_ids]
        self.scores: List[float] = df["score"].astype(float).tolist()

    def __len__(self) -> int:
        return len(self.clip_ids)

    def load(self, i: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(latent [C,T,H,W] float32, text [L,D] float32, text_mask [L] bool) of row i."""
        return self.reader.load(self.clip_ids[i])

    def batch(self, indices: List[int]) -> Batch:
        items = [self.load(i) for i in indices]
        return Batch([self.clip_ids[i] for i in indices], torch.stack([x[0] for x in items]),
                     torch.stack([x[1] for x in items]), torch.stack([x[2] for x in items]))


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
