"""The PreferencePairs format: a LatentDataset folder (``common.latents``) whose clips are the videos of preference
pairs, plus ``pairs.parquet`` saying which clip won over which.

    write_pairs(folder, [{"pair_id": "p0", "winner": "c1", "loser": "c1-reverse", "caption": "a cat",
                          "source": "auto:reverse"}])
    pairs = read_pairs(folder)          # DataFrame with PAIR_COLUMNS, checked against the folder's index.parquet

A PreferencePairs folder lives in the latent space of the LatentDataset it was built from: ``PairsWriter`` copies
that dataset's VAE, text encoder and null text into it and its meta.json repeats the dataset's VAE identity and latent
statistics (plus ``latent_dataset_hash``), so the folder is self-contained and the trainer reads it with LatentReader.

    w = PairsWriter(folder, dataset_dir)     # a LatentWriter + the dataset's vae/, text_encoder/, null_text
    w.add("c1", latent, text, mask, caption="a cat"); w.add("c1-reverse", flipped, text, mask, caption="a cat")
    meta = w.finish(rows, summary)           # pairs.parquet, summary.json, index.parquet, meta.json (content hash)

Both clips of a pair share the prompt (their text features are the prompt's encoding) and one latent shape (one
bucket), so a Flow-DPO step noises them with the same noise and timestep. ``source`` says where a pair came from:
"human" (a labelled table, resolved as docs/artifacts.md describes) or "auto:<kind>" (a held-in clip against a
corrupted copy of it: "shuffle", "reverse", "noise"). ``weight`` scales the pair's loss (1.0 by default). Extra
columns (per-dimension labels, absolute judgements) are kept for audit and ignored by the trainer.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any, Dict, List

import torch

from common.latents import NULL_TEXT, TEXT_DIR, VAE_DIR, LatentReader, LatentWriter

PAIRS, SUMMARY = "pairs.parquet", "summary.json"
PAIR_COLUMNS = ("pair_id", "winner", "loser", "caption", "source", "weight")


def write_pairs(root: str | Path, rows: List[Dict[str, Any]]) -> Path:
    """Write ``pairs.parquet`` into a LatentDataset folder (after its clips); ``weight`` defaults to 1.0."""
    import pandas as pd

    root = Path(root)
    if not rows:
        raise ValueError(f"write_pairs: no pairs for {root} (nothing to train the preference stage on)")
    table = pd.DataFrame([{"weight": 1.0, **r} for r in rows])
    missing = [c for c in PAIR_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"write_pairs: rows lack {missing} (columns: {', '.join(PAIR_COLUMNS)})")
    extra = [c for c in table.columns if c not in PAIR_COLUMNS]
    table = table[list(PAIR_COLUMNS) + extra]
    table.to_parquet(root / PAIRS, index=False)
    return root / PAIRS


def read_pairs(root: str | Path):
    """The pairs of a PreferencePairs folder as a DataFrame; every winner and loser must be a clip of its index."""
    import pandas as pd

    from common.latents import INDEX

    root = Path(root)
    path = root / PAIRS
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {root} is not a PreferencePairs folder (build one with the "
                                "preference-pairs task, or point the preference stage at its output)")
    table = pd.read_parquet(path)
    missing = [c for c in PAIR_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}")
    if table.empty:
        raise ValueError(f"{path}: no pairs")
    index = pd.read_parquet(root / INDEX, columns=["clip_id", "latent_shape"])
    shapes = {c: tuple(int(v) for v in s) for c, s in zip(index["clip_id"], index["latent_shape"])}
    unknown = sorted((set(table["winner"]) | set(table["loser"])) - set(shapes))
    if unknown:
        raise ValueError(f"{path}: pairs name clips that are not in {INDEX}: {unknown[:5]}")
    if table["pair_id"].duplicated().any():
        raise ValueError(f"{path}: duplicate pair_id values")
    bad = [p for p, w, l in zip(table["pair_id"], table["winner"], table["loser"]) if w == l or shapes[w] != shapes[l]]
    if bad:
        raise ValueError(f"{path}: pairs {bad[:5]} have winner == loser or two latent shapes (a pair is two clips of "
                         "one bucket)")
    weights = table["weight"].astype(float)
    if not (weights > 0).all() or not weights.map(math.isfinite).all():
        raise ValueError(f"{path}: weights must be finite and > 0")
    return table


class PairsWriter:
    """Writes one PreferencePairs folder in the latent space of the LatentDataset at ``dataset_dir``: its vae/,
    text_encoder/ (when copied there) and null_text are copied in; ``add`` clips (each once), then ``finish``."""

    def __init__(self, root: str | Path, dataset_dir: str | Path, shard_size: int = 64) -> None:
        self.root = Path(root)
        self.dataset = LatentReader(dataset_dir)
        self.writer = LatentWriter(self.root, shard_size)   # refuses a folder that is not empty
        src = self.dataset.root
        for name in (VAE_DIR, TEXT_DIR):
            if (src / name).is_dir():
                shutil.copytree(src / name, self.root / name)
        if (src / NULL_TEXT).is_file():
            shutil.copy2(src / NULL_TEXT, self.root / NULL_TEXT)
        self.clips: set = set()

    def add(self, clip_id: str, latent_CTHW: torch.Tensor, text_LD: torch.Tensor, text_mask_L: torch.Tensor,
            caption: str = "", score: float = float("nan"), source_hash: str = "") -> None:
        """One clip of the pairs (normalised latent in the dataset's space, its prompt's text features), split
        "train"; a clip already added is skipped (a video may be in several pairs)."""
        if clip_id in self.clips:
            return
        self.clips.add(clip_id)
        # clones: the clips of a pair share one text tensor, and safetensors refuses tensors that share memory
        self.writer.add(clip_id, latent_CTHW.clone(), text_LD.clone(), text_mask_L.clone(), split="train",
                        caption=caption, score=score, bucket="x".join(map(str, latent_CTHW.shape)),
                        source_hash=source_hash)

    def finish(self, rows: List[Dict[str, Any]], summary: Dict[str, Any]) -> Dict[str, Any]:
        """Write pairs.parquet (``write_pairs``), summary.json, index.parquet and meta.json: the dataset's "vae",
        "text_encoder", "latent_mean", "latent_std", its content hash as "latent_dataset_hash", and "pairs" (the
        summary). The content hash covers every file, pairs and summary included. Returns meta.json's dict."""
        write_pairs(self.root, rows)
        (self.root / SUMMARY).write_text(json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
        ds = self.dataset.meta
        meta: Dict[str, Any] = {k: ds[k] for k in ("vae", "text_encoder", "latent_mean", "latent_std") if k in ds}
        meta.update(latent_dataset_hash=ds.get("content_hash", ""), pairs=summary)
        return self.writer.finish(meta)
