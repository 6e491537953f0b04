"""Curation report: counts per reason, score histograms and a contact sheet of kept and rejected clips.

``write_report(manifest_dir, out_dir)`` writes ``report.html`` (self-contained: images inlined as base64),
``histograms.png`` (matplotlib, Agg) and ``contact_sheet.png`` (OpenCV tiles of the clips' middle-frame thumbnails,
green border = kept, red = rejected, reason printed under the tile) into ``out_dir`` and returns the HTML. The Flyte
adapter shows the HTML as a Deck and logs the three files to MLflow. No Flyte or MLflow here.
"""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import List

import cv2
import numpy as np
import pandas as pd

SCORES = [("sharpness", True), ("brightness", False), ("motion", False), ("text_area", False), ("aesthetic", False)]
TILE_H, TILE_W, MAX_TILES = 72, 96, 24


def histograms(df: pd.DataFrame, path: Path, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = summary.get("config", {})
    bounds = {"sharpness": (cfg.get("sharpness_min"), cfg.get("sharpness_max")),
              "brightness": (cfg.get("brightness_min"), cfg.get("brightness_max")),
              "motion": (cfg.get("motion_min"), cfg.get("motion_max")), "text_area": (None, cfg.get("text_area_max")),
              "aesthetic": (cfg.get("aesthetic", {}).get("min_score"), None)}
    fig, axes = plt.subplots(1, len(SCORES), figsize=(3.2 * len(SCORES), 2.6))
    for ax, (name, log) in zip(axes, SCORES):
        for status, colour in (("kept", "tab:green"), ("rejected", "tab:red")):
            v = df.loc[df.status == status, name].dropna().to_numpy(float)
            if log:
                v = np.log10(np.maximum(v, 1e-3))
            if len(v):
                ax.hist(v, bins=20, alpha=0.6, color=colour, label=status)
        for b in bounds[name]:
            if b is not None:
                ax.axvline(np.log10(max(b, 1e-3)) if log else b, color="k", ls="--", lw=0.8)
        ax.set_title(f"log10 {name}" if log else name, fontsize=9)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=7)
    if summary.get("aesthetic_random"):
        axes[-1].set_title("aesthetic (RANDOM model)", fontsize=9, color="tab:red")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def contact_sheet(df: pd.DataFrame, thumbs: Path, path: Path) -> int:
    """Tile kept then rejected candidate clips (at most MAX_TILES); returns the number of tiles."""
    rows = pd.concat([df[df.status == "kept"], df[(df.status == "rejected") & (df.clip_id != "")]]).head(MAX_TILES)
    tiles: List[np.ndarray] = []
    for r in rows.itertuples():
        tile = np.full((TILE_H + 30, TILE_W, 3), 255, np.uint8)
        img = cv2.imread(str(thumbs / f"{r.clip_id}.png"))
        if img is not None:
            tile[:TILE_H] = cv2.resize(img, (TILE_W, TILE_H), interpolation=cv2.INTER_AREA)
        colour = (0, 160, 0) if r.status == "kept" else (0, 0, 200)
        cv2.rectangle(tile, (0, 0), (TILE_W - 1, TILE_H - 1), colour, 3)
        text = "kept" if r.status == "kept" else str(r.reason)
        for i, chunk in enumerate([text[:18], text[18:36]]):
            cv2.putText(tile, chunk, (2, TILE_H + 12 + 12 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.3, colour, 1, cv2.LINE_AA)
        tiles.append(tile)
    cols = 6
    while len(tiles) % cols or not tiles:
        tiles.append(np.full((TILE_H + 30, TILE_W, 3), 255, np.uint8))
    grid = np.vstack([np.hstack(tiles[i:i + cols]) for i in range(0, len(tiles), cols)])
    cv2.imwrite(str(path), grid)
    return len(rows)


def _img(path: Path) -> str:
    return f'<img src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}"/>'


def write_report(manifest_dir: str | Path, out_dir: str | Path) -> str:
    manifest_dir, out_dir = Path(manifest_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    df = pd.read_parquet(manifest_dir / "manifest.parquet")
    summary = json.loads((manifest_dir / "summary.json").read_text())
    histograms(df, out_dir / "histograms.png", summary)
    contact_sheet(df, manifest_dir / "thumbs", out_dir / "contact_sheet.png")
    counts = "".join(f"<tr><td>{k}</td><td>{summary[k]}</td></tr>" for k in
                     ("inputs", "kept", "rejected", "failed", "clips_kept", "clips_rejected", "processed", "reused"))
    reasons = "".join(f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>" for k, v in summary["reasons"].items())
    warn = ("<p><b>Aesthetic scores come from a randomly initialised model</b> "
            f"({html.escape(str(summary['aesthetic_model']))}): they are noise.</p>"
            ) if summary["aesthetic_random"] else ""
    page = (f"<h2>Curation</h2><p>inputs = kept + rejected + failed: {summary['inputs']} = {summary['kept']} + "
            f"{summary['rejected']} + {summary['failed']}</p>{warn}"
            f"<table border=1><tr><th>count</th><th>n</th></tr>{counts}</table>"
            f"<h3>Reasons (rows)</h3><table border=1><tr><th>reason</th><th>rows</th></tr>{reasons}</table>"
            f"<h3>Scores</h3>{_img(out_dir / 'histograms.png')}"
            f"<h3>Contact sheet (green kept, red rejected)</h3>{_img(out_dir / 'contact_sheet.png')}")
    (out_dir / "report.html").write_text(f"<html><body>{page}</body></html>\n")
    return page
