"""What compression reads of a ClipManifest folder: its kept clips (as pixels), and the hash of what it read.

Shared by the VAE fit (``vae_fit.py``) and the encoder (``encode.py``); no Flyte, no MLflow.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Dict, Iterator, Optional

import numpy as np
import pandas as pd
import torch

from common.hashing import sha256_file, sha256_json
from models.vae import CHUNK


def read_clip(path: str | Path, num_frames: int) -> torch.Tensor:
    """Decode the first ``num_frames`` frames of a video with PyAV -> x_3THW float32 in [-1, 1]."""
    import av
    from av.video.reformatter import VideoReformatter

    frames = []
    rgb = VideoReformatter()   # one converter for the clip: frame.to_ndarray(format=) builds one per frame (7x slower)
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            frames.append(rgb.reformat(frame, format="rgb24").to_ndarray())
            if len(frames) == num_frames:
                break
    if len(frames) < num_frames:
        raise ValueError(f"{path}: expected {num_frames} frames, decoded {len(frames)}")
    x_THW3 = torch.from_numpy(np.stack(frames))
    return x_THW3.permute(3, 0, 1, 2).float().div(127.5).sub(1.0).contiguous()


def read_kept(manifest_dir: Path) -> pd.DataFrame:
    """The manifest's kept clips, sorted by clip id (the order of the index and of every loop over clips)."""
    path = Path(manifest_dir) / "manifest.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"not a ClipManifest folder: {manifest_dir} has no manifest.parquet")
    df = pd.read_parquet(path)
    kept = df[df["status"] == "kept"].sort_values("clip_id").reset_index(drop=True)
    if kept.empty:
        raise ValueError(f"{path}: no clips with status 'kept' to compress")
    if kept["clip_id"].duplicated().any():
        raise ValueError(f"{path}: duplicate clip_id among kept clips")
    return kept


def clip_rows(kept: pd.DataFrame) -> pd.DataFrame:
    """The video clips among kept rows (a manifest written before images had no ``kind``: every row)."""
    if "kind" not in kept.columns:
        return kept
    return kept[kept["kind"].fillna("").isin(("", "clip"))]


def read_image(path: str | Path) -> torch.Tensor:
    """An image file (a curated image or key frame, PNG) -> x_31HW float32 in [-1, 1] (one frame)."""
    import cv2

    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"{path}: cannot decode the image")
    x_HW3 = torch.from_numpy(np.ascontiguousarray(bgr[..., ::-1]))
    return x_HW3.permute(2, 0, 1)[:, None].float().div(127.5).sub(1.0).contiguous()


def resize_pixels(x_3THW: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Center-crop to the aspect width/height and resize (area) pixels [3,T,H,W] in [-1, 1]: a clip at a lower
    resolution bucket, as curation cuts it (``tasks.curate.curate.center_crop_resize``). Same size: unchanged."""
    if tuple(x_3THW.shape[-2:]) == (height, width):
        return x_3THW
    from tasks.curate.curate import center_crop_resize

    frames_THW3 = x_3THW.permute(1, 2, 3, 0).numpy().astype(np.float32)
    out_THW3 = center_crop_resize(frames_THW3, height, width)
    return torch.from_numpy(np.ascontiguousarray(out_THW3)).permute(3, 0, 1, 2).contiguous()


def clip_file_hashes(manifest_dir: str | Path, kept: pd.DataFrame) -> Dict[str, str]:
    """{relative path: sha256 of the bytes} of the kept clip files."""
    return {str(p): sha256_file(Path(manifest_dir) / str(p)) for p in kept["path"]}


def manifest_hash(manifest_dir: str | Path, kept: pd.DataFrame, clip_hashes: Optional[Dict[str, str]] = None) -> str:
    """sha256 of {relative path: sha256} of manifest.parquet, summary.json (if any) and the kept clip files: what
    compression read of the ClipManifest folder. ``clip_hashes``: ``clip_file_hashes`` when already computed."""
    root = Path(manifest_dir)
    names = ["manifest.parquet"] + (["summary.json"] if (root / "summary.json").is_file() else [])
    files = {name: sha256_file(root / name) for name in names}
    return sha256_json({**files, **(clip_hashes if clip_hashes is not None else clip_file_hashes(root, kept))})


@contextlib.contextmanager
def deterministic() -> Iterator[None]:
    """Deterministic torch algorithms (warn only where none exists) for the body; the previous setting after."""
    prev, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=warn)


def replicate_first(x_3THW: torch.Tensor) -> torch.Tensor:
    """8k+1 frames -> 8(k+1) frames with frame 0 repeated 8 times (the layout VideoVAE.encode uses)."""
    if x_3THW.shape[1] % CHUNK == 1:
        x_3THW = torch.cat([x_3THW[:, :1].expand(-1, CHUNK - 1, -1, -1), x_3THW], dim=1)
    return x_3THW
