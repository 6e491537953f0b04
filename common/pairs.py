"""The PreferencePairs format: a LatentDataset folder (``common.latents``) whose clips are the videos of preference
pairs, plus ``pairs.parquet`` saying which clip won over which.

    write_pairs(folder, [{"pair_id": "p0", "winner": "c1", "loser": "c1-reverse", "caption": "a cat",
                          "source": "auto:reverse"}])
    pairs = read_pairs(folder)          # DataFrame with PAIR_COLUMNS, checked against the folder's index.parquet

Both clips of a pair share the prompt (their text features are the prompt's encoding) and one latent shape (one
bucket), so a Flow-DPO step noises them with the same noise and timestep. ``source`` says where a pair came from:
"human" (a labelled table, resolved as docs/artifacts.md describes) or "auto:<kind>" (a held-in clip against a
corrupted copy of it: "shuffle", "reverse", "noise"). ``weight`` scales the pair's loss (1.0 by default). Extra
columns (per-dimension labels, absolute judgements) are kept for audit and ignored by the trainer.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

PAIRS = "pairs.parquet"
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
    clips = set(pd.read_parquet(root / INDEX, columns=["clip_id"])["clip_id"])
    unknown = sorted((set(table["winner"]) | set(table["loser"])) - clips)
    if unknown:
        raise ValueError(f"{path}: pairs name clips that are not in {INDEX}: {unknown[:5]}")
    if table["pair_id"].duplicated().any():
        raise ValueError(f"{path}: duplicate pair_id values")
    return table
