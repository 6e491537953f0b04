"""Deterministic batches from a LatentDataset folder (format: docs/artifacts.md), read directly.

Batches are a pure function of (seed, step, dp_rank), so a resumed run sees exactly the batches it would have seen.

Schedule: samples are grouped by ``latent_shape`` (the bucket); a micro-batch never mixes shapes. Epoch e shuffles
each bucket with ``numpy.random.default_rng([seed, e, bucket])``, pads it by wrapping around to a multiple of the
global batch G = micro_batch_size * data_parallel, cuts it into global batches of G, and shuffles the order of all
global batches with ``default_rng([seed, e])``. Step s is global batch ``s % n`` of epoch ``s // n`` (n = global
batches per epoch, the same for every epoch); DP rank r takes entries ``[r*mbs, (r+1)*mbs)``. The DP ranks' samples
in one step are disjoint whenever the bucket holds at least G clips (a smaller bucket has to repeat clips).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch


@dataclass
class Batch:
    clip_ids: List[str]
    latents_BCTHW: torch.Tensor     # float32, normalised latents
    text_BLD: torch.Tensor          # float32 text-encoder features, padded as stored
    text_mask_BL: torch.Tensor      # bool, True = real token

    def to(self, device: torch.device) -> "Batch":
        return Batch(self.clip_ids, self.latents_BCTHW.to(device), self.text_BLD.to(device),
                     self.text_mask_BL.to(device))


class LatentDataset:
    """The rows of one split of a LatentDataset folder, optionally only the best-scored ``top_fraction``."""

    def __init__(self, root: str | Path, split: str = "train", top_fraction: float = 1.0):
        import pandas as pd

        self.root = Path(root)
        index_path = self.root / "index.parquet"
        if not self.root.is_dir():
            raise FileNotFoundError(f"latents dir not found: {self.root} (expected a LatentDataset folder written by "
                                    "the compress stage)")
        if not index_path.is_file():
            raise FileNotFoundError(f"{index_path} not found: {self.root} is not a LatentDataset folder")
        if not 0.0 < top_fraction <= 1.0:
            raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
        df = pd.read_parquet(index_path)
        need = {"clip_id", "shard", "split", "latent_shape", "score"}
        if need - set(df.columns):
            raise ValueError(f"{index_path}: missing columns {sorted(need - set(df.columns))}")
        df = df[df["split"] == split]
        if df.empty:
            raise ValueError(f"{index_path}: the '{split}' split is empty; nothing to train on")
        # best first; NaN scores last; clip_id breaks ties so the choice is reproducible
        df = df.assign(_score=df["score"].astype(float).fillna(-math.inf)).sort_values(
            ["_score", "clip_id"], ascending=[False, True], kind="stable")
        keep = max(1, math.ceil(len(df) * top_fraction))
        df = df.iloc[:keep].sort_values("clip_id", kind="stable")
        self.clip_ids: List[str] = df["clip_id"].tolist()
        self.shards: List[str] = df["shard"].tolist()
        self.shapes: List[Tuple[int, ...]] = [tuple(int(v) for v in s) for s in df["latent_shape"]]
        self.scores: List[float] = df["score"].astype(float).tolist()
        self._handles: Dict[str, object] = {}
        meta = self.root / "meta.json"
        self.meta = json.loads(meta.read_text()) if meta.is_file() else {}

    def __len__(self) -> int:
        return len(self.clip_ids)

    def _shard(self, name: str):
        from safetensors import safe_open

        if name not in self._handles:
            path = self.root / name
            if not path.is_file():
                raise FileNotFoundError(f"shard {path} listed in index.parquet is missing")
            self._handles[name] = safe_open(str(path), framework="pt")
        return self._handles[name]

    def load(self, i: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(latent [C,T,H,W] float32, text [L,D] float32, text_mask [L] bool) of sample i."""
        f, cid = self._shard(self.shards[i]), self.clip_ids[i]
        latent = f.get_tensor(f"{cid}/latent").float()
        if tuple(latent.shape) != self.shapes[i]:
            raise ValueError(f"{cid}: latent shape {tuple(latent.shape)} != index latent_shape {self.shapes[i]}")
        return latent, f.get_tensor(f"{cid}/text").float(), f.get_tensor(f"{cid}/text_mask").bool()

    def batch(self, indices: List[int]) -> Batch:
        items = [self.load(i) for i in indices]
        return Batch([self.clip_ids[i] for i in indices], torch.stack([x[0] for x in items]),
                     torch.stack([x[1] for x in items]), torch.stack([x[2] for x in items]))


class StepSampler:
    """Sample indices for (step, dp_rank): see the module docstring for the schedule."""

    def __init__(self, shapes: List[Tuple[int, ...]], micro_batch_size: int, data_parallel: int, seed: int):
        if micro_batch_size < 1 or data_parallel < 1:
            raise ValueError("micro_batch_size and data_parallel must be >= 1")
        self.mbs, self.dp, self.seed = micro_batch_size, data_parallel, seed
        self.global_batch = micro_batch_size * data_parallel
        buckets: Dict[Tuple[int, ...], List[int]] = {}
        for i, s in enumerate(shapes):
            buckets.setdefault(tuple(s), []).append(i)
        self.buckets = [buckets[k] for k in sorted(buckets)]
        self.batches_per_epoch = sum(math.ceil(len(b) / self.global_batch) for b in self.buckets)
        self._cache: Tuple[int, List[List[int]]] | None = None

    def _epoch(self, epoch: int) -> List[List[int]]:
        if self._cache and self._cache[0] == epoch:
            return self._cache[1]
        g = self.global_batch
        batches = []
        for b, members in enumerate(self.buckets):
            perm = [members[j] for j in np.random.default_rng([self.seed, epoch, b]).permutation(len(members))]
            need = math.ceil(len(perm) / g) * g
            padded = [perm[j % len(perm)] for j in range(need)]
            batches += [padded[k:k + g] for k in range(0, need, g)]
        order = np.random.default_rng([self.seed, epoch]).permutation(len(batches))
        batches = [batches[j] for j in order]
        self._cache = (epoch, batches)
        return batches

    def global_indices(self, step: int) -> List[int]:
        """All G sample indices of ``step`` (0-based), in DP-rank order."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return self._epoch(step // self.batches_per_epoch)[step % self.batches_per_epoch]

    def indices(self, step: int, dp_rank: int) -> List[int]:
        if not 0 <= dp_rank < self.dp:
            raise ValueError(f"dp_rank {dp_rank} out of range for data_parallel={self.dp}")
        return self.global_indices(step)[dp_rank * self.mbs:(dp_rank + 1) * self.mbs]
