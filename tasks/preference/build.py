"""``run_pairs``: the pair stage without Flyte. ``train.pairs.source: auto`` builds automatic pairs (``auto.py``),
anything else is a pair table (``encode.py``). The task adapter (``task.py``) wraps it.

    meta = run_pairs(PairsConfig(), Path("runs/artifacts/compress/<key>"), Path("out"))
    meta["pairs"]["labels"], meta["pairs"]["pairs"], meta["content_hash"]
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Optional

from common.config import PairsConfig


def run_pairs(cfg: PairsConfig, latents_dir: Path, out_dir: Path, progress: Callable[[str], None] = print,
              work_dir: Optional[Path] = None) -> Dict[str, Any]:
    """Write the PreferencePairs folder for ``cfg`` from the LatentDataset ``latents_dir`` into the empty
    ``out_dir``; returns its meta.json (``["pairs"]`` is summary.json, ``["content_hash"]`` the folder's hash).
    ``work_dir`` holds downloads (S3 tables and videos) while it runs."""
    if cfg.source == "auto":
        from tasks.preference.auto import run_auto_pairs

        return run_auto_pairs(cfg, Path(latents_dir), Path(out_dir), progress)
    from tasks.preference.encode import run_human_pairs

    return run_human_pairs(cfg, Path(latents_dir), Path(out_dir), progress, work_dir)
