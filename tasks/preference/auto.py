"""Automatic preference pairs (``train.pairs.source: auto``): no human labels, so each pair is a real held-in clip
(winner) against a corrupted copy of its own latent (loser). The run says so: summary.json "labels": "auto" and a
printed line.

Losers are made in latent space (cheap: no decode, no re-encode; the corruption acts on the normalised latent the
DiT trains on):
- ``shuffle``: the latent frames permuted by a fixed, seeded, non-identity permutation (``shuffle_permutation``):
  temporal incoherence;
- ``reverse``: the latent frames in reverse order: motion played backwards;
- ``noise``: latent + ``noise_std`` * N(0, 1), seeded per clip: degraded detail.
Corruptions are cycled over the train clips in index order (clip i gets ``corruptions[i % len]``); ``max_pairs``
(> 0) keeps the first ones and counts the rest as dropped "over max_pairs". A clip with one latent frame cannot be
shuffled or reversed, and a clip whose latent frames are all equal is unchanged by them: those get "noise" and the
summary counts each such fallback. Both clips of a pair carry the winner's text features (one prompt).

Not implemented: the model's own sample as the loser (Diffusion-DPO / VideoDPO style on-policy pairs). It needs a
trained checkpoint before this task (pretrain -> sample -> pair -> DPO), i.e. a sampling node between training and
the pair task and a reward or human judge to order the samples; left for future work.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import torch

from common.config import PairsConfig
from common.hashing import sha256_json
from common.latents import LatentReader
from common.pairs import PairsWriter
from tasks.preference.labels import OVER_MAX_PAIRS

NOTE = ("labels auto: no human labels (train.pairs.source: auto); each pair is a held-in train clip against a copy of "
        "its latent corrupted in latent space ({kinds}); not a human preference")


def _seed(*parts: Any) -> int:
    return int(sha256_json(list(parts), n=15), 16)


def shuffle_permutation(num_frames: int, seed: int) -> List[int]:
    """A seeded permutation of range(num_frames) that is never the identity (num_frames >= 2)."""
    if num_frames < 2:
        raise ValueError(f"shuffle needs >= 2 latent frames, got {num_frames}")
    perm = torch.randperm(num_frames, generator=torch.Generator().manual_seed(seed)).tolist()
    if perm == list(range(num_frames)):
        perm = perm[1:] + perm[:1]   # rotate by one: every frame moves
    return perm


def corrupt(latent_CTHW: torch.Tensor, kind: str, noise_std: float, seed: int) -> torch.Tensor:
    """The loser made from a winner's normalised latent [C,T,H,W] (module docstring)."""
    if kind == "shuffle":
        return latent_CTHW[:, shuffle_permutation(latent_CTHW.shape[1], seed)].contiguous()
    if kind == "reverse":
        if latent_CTHW.shape[1] < 2:
            raise ValueError(f"reverse needs >= 2 latent frames, got {latent_CTHW.shape[1]}")
        return latent_CTHW.flip(1).contiguous()
    if kind == "noise":
        gen = torch.Generator().manual_seed(seed)
        return latent_CTHW + noise_std * torch.randn(latent_CTHW.shape, generator=gen)
    raise ValueError(f"unknown corruption {kind!r} (shuffle, reverse, noise)")


def plan(clip_ids: List[str], cfg: PairsConfig) -> Tuple[List[Tuple[str, str]], List[str]]:
    """-> ([(clip_id, requested corruption)] for the pairs, clip ids over ``max_pairs``)."""
    keep = clip_ids[:cfg.max_pairs] if cfg.max_pairs else clip_ids
    return [(c, cfg.corruptions[i % len(cfg.corruptions)]) for i, c in enumerate(keep)], clip_ids[len(keep):]


def run_auto_pairs(cfg: PairsConfig, latents_dir: Path, out_dir: Path,
                   progress: Callable[[str], None] = print) -> Dict[str, Any]:
    """Write the auto PreferencePairs folder for the train clips of ``latents_dir``; returns meta.json's dict."""
    reader = LatentReader(latents_dir)
    train = reader.primary_clip_ids("train")   # each clip once, at its largest resolution and full length
    if not train:
        raise ValueError(f"{latents_dir}: no train clips to build automatic preference pairs from")
    progress(NOTE.format(kinds=", ".join(dict.fromkeys(cfg.corruptions))))
    chosen, over = plan(train, cfg)
    writer = PairsWriter(out_dir, latents_dir)
    captions = dict(zip(reader.index["clip_id"], reader.index["caption"]))
    rows: List[Dict[str, Any]] = []
    used: Counter[str] = Counter()
    fallbacks: Counter[str] = Counter()
    for i, (clip_id, requested) in enumerate(chosen):
        latent, text, mask = reader.load(clip_id)
        kind, fallback = requested, ""
        if requested in ("shuffle", "reverse") and latent.shape[1] < 2:
            kind, fallback = "noise", f"{requested} -> noise: one latent frame"
        loser = corrupt(latent, kind, cfg.noise_std, _seed(cfg.seed, clip_id, kind))
        if torch.equal(loser, latent):   # equal latent frames: shuffling or reversing changes nothing
            kind, fallback = "noise", f"{requested} -> noise: latent frames all equal"
            loser = corrupt(latent, kind, cfg.noise_std, _seed(cfg.seed, clip_id, kind))
        if fallback:
            fallbacks[fallback] += 1
        used[kind] += 1
        caption = str(captions.get(clip_id) or "")
        loser_id = f"{clip_id}-{kind}"
        writer.add(clip_id, latent, text, mask, caption=caption)
        writer.add(loser_id, loser, text, mask, caption=caption)
        rows.append(dict(pair_id=f"auto{i:05d}", winner=clip_id, loser=loser_id, caption=caption,
                         source=f"auto:{kind}", weight=1.0, corruption=kind, requested=requested, fallback=fallback))
    summary = {
        "labels": "auto", "source": "auto", "rows": len(train), "pairs": len(rows), "dropped": len(over),
        "reasons": {OVER_MAX_PAIRS: len(over)} if over else {}, "corruptions": dict(used),
        "fallbacks": dict(fallbacks), "noise_std": cfg.noise_std, "seed": cfg.seed, "max_pairs": cfg.max_pairs,
        "data_hash": reader.meta.get("content_hash", ""),
        "note": NOTE.format(kinds=", ".join(dict.fromkeys(cfg.corruptions))),
    }
    meta = writer.finish(rows, summary)
    progress(f"auto pairs: {len(rows)} from {len(train)} train clips ({', '.join(f'{k} {n}' for k, n in used.items())}"
             f"{'; fallbacks ' + ', '.join(f'{k}: {n}' for k, n in fallbacks.items()) if fallbacks else ''}"
             f"{f'; {len(over)} over max_pairs' if over else ''})")
    return meta
