"""Human preference pairs: a resolved pair table (``labels.py``) -> a PreferencePairs folder, encoded with the
LatentDataset's own VAE and text encoder, so the pairs live in the latent space the model trains in.

The clip geometry is the dataset's bucket: the most common latent shape [C, T, h, w] of its train clips (index order
breaks ties), i.e. ``8 (T - 1) + 1`` frames (compress encodes 8k+1-frame clips) of ``h * s`` x ``w * s`` pixels
(``s`` = the VAE's spatial downsampling). Each video is decoded with the curation decoder (``tasks/curate/decode``:
PyAV, constant frame rate), trimmed to its first clip-length frames, center-cropped to the bucket's
aspect and resized (``tasks.curate.curate.center_crop_resize``), scaled to [-1, 1], encoded (posterior mode, as the
compress stage does) and normalised with the dataset's statistics (``LatentReader.normalize``). Winner and loser
therefore always have the dataset's latent shape. Prompts are encoded with the dataset's text encoder.

A clip is one (video content, prompt): its id is sha256(video bytes, prompt)[:16], so a video compared in several
pairs under one prompt is decoded and stored once. Rows are dropped here for: ``missing video`` (no such file or S3
object), ``unreadable video`` (the decoder's reason: empty, not a video, truncated, ...), ``video too short`` (fewer
frames than the clip length), ``identical videos`` (a and b have the same bytes), ``over max_pairs``.
"""
from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from common.config import PairsConfig
from common.hashing import sha256_bytes, sha256_file
from common.latents import LatentReader
from common.pairs import PairsWriter
from tasks.preference.labels import (
    IDENTICAL_VIDEOS,
    MISSING_VIDEO,
    OVER_MAX_PAIRS,
    SHORT_VIDEO,
    UNREADABLE_VIDEO,
    Resolution,
    count_keys,
    fetch_uri,
    open_table,
    resolve_table,
    video_uri,
)

DROPPED = "dropped.jsonl"
PROMPT_CACHE = 64   # prompts whose text features are kept (consecutive rows often share one)
CHUNK = 8   # pixel frames per latent frame after the first (the VAE's temporal downsampling; clips are 8k+1 frames)


def dataset_bucket(reader: LatentReader) -> Tuple[int, ...]:
    """The most common latent shape [C, T, h, w] among the train clips (index order breaks ties)."""
    shapes = [reader.latent_shape(c) for c in reader.primary_clip_ids("train")]
    if not shapes:
        raise ValueError(f"{reader.root}: no train clips, so no bucket to encode the pair videos at")
    counts = Counter(shapes)
    return max(counts, key=lambda s: (counts[s], -shapes.index(s)))


def clip_geometry(latent_shape: Tuple[int, ...], spatial_downsample: int) -> Tuple[int, int, int]:
    """Latent [C, T, h, w] -> pixel clip (frames, height, width): 8 (T - 1) + 1 frames of h*s x w*s."""
    _, t, h, w = latent_shape
    return CHUNK * (t - 1) + 1, h * spatial_downsample, w * spatial_downsample


class VideoError(Exception):
    """A pair video that cannot be used: ``key`` is one of the countable keys of ``labels``."""

    def __init__(self, key: str, detail: str) -> None:
        self.key, self.detail = key, detail
        super().__init__(f"{key}: {detail}")


def load_pixels(path: Path, frames: int, height: int, width: int) -> torch.Tensor:
    """First ``frames`` frames of a video, center-cropped and resized to height x width -> x_3THW in [-1, 1]."""
    from tasks.curate.curate import center_crop_resize
    from tasks.curate.decode import DecodeError, read_video

    try:
        frames_THWC, _, _ = read_video(path, max_frames=frames)
    except DecodeError as e:
        raise VideoError(MISSING_VIDEO if e.kind == DecodeError.MISSING else UNREADABLE_VIDEO, str(e)) from None
    if len(frames_THWC) < frames:
        raise VideoError(SHORT_VIDEO, f"{len(frames_THWC)} < {frames} frames")
    frames_THWC = center_crop_resize(frames_THWC[:frames], height, width)
    x_THW3 = torch.from_numpy(np.ascontiguousarray(frames_THWC))
    return x_THW3.permute(3, 0, 1, 2).float().div(127.5).sub(1.0).contiguous()


class PairEncoder:
    """The dataset's VAE and text encoder; files are fetched and hashed once, prompts encoded once."""

    def __init__(self, reader: LatentReader, work_dir: Path, source: str) -> None:
        self.reader, self.work_dir, self.source = reader, work_dir, source
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.latent_shape = dataset_bucket(reader)
        self.frames, self.height, self.width = clip_geometry(self.latent_shape, reader.vae_spatial_downsample)
        self._vae: Any = None
        self._text: Any = None
        self._files: Dict[str, Tuple[Path, str]] = {}            # uri -> (local path, sha256 of the bytes)
        self._errors: Dict[str, VideoError] = {}                  # uri or file hash -> why it cannot be used
        self._prompts: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}

    def file(self, ref: str) -> Tuple[Path, str]:
        """Local path and content hash of a table's video reference (VideoError "missing video")."""
        uri = video_uri(self.source, ref)
        if uri in self._errors:
            raise self._errors[uri]
        if uri not in self._files:
            try:
                path = fetch_uri(uri, self.work_dir)
            except FileNotFoundError as e:
                self._errors[uri] = VideoError(MISSING_VIDEO, f"{ref}: {e}")
                raise self._errors[uri] from None
            self._files[uri] = (path, sha256_file(path))
        return self._files[uri]

    def latent(self, path: Path, file_hash: str) -> torch.Tensor:
        """The normalised latent [C, T, h, w] of a video file, in the dataset's space (VideoError when unusable; a
        file found unusable once is not decoded again). Latents are not kept: the caller writes each clip once."""
        if file_hash in self._errors:
            raise self._errors[file_hash]
        try:
            x_3THW = load_pixels(path, self.frames, self.height, self.width)
        except VideoError as e:
            self._errors[file_hash] = e
            raise
        if self._vae is None:
            self._vae = self.reader.load_vae().to(self.device)
        with torch.no_grad():
            z = self._vae.encode(x_3THW[None].to(self.device)).mode()[0].cpu()
        latent = self.reader.normalize(z).float()
        if tuple(latent.shape) != self.latent_shape:
            raise ValueError(f"{path}: encoded to latent {list(latent.shape)}, the dataset's bucket is "
                             f"{list(self.latent_shape)}")
        return latent

    def prompt(self, text: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """(text_LD, mask_L) of a prompt, with the dataset's text encoder."""
        if text not in self._prompts:
            if len(self._prompts) >= PROMPT_CACHE:   # bounded: T5-XXL features are ~5 MB per prompt
                self._prompts.pop(next(iter(self._prompts)))
            if self._text is None:
                self._text = self.reader.load_text_encoder().to(self.device)
            feats, mask = self._text.encode([text])
            self._prompts[text] = (feats[0], mask[0])
        return self._prompts[text]


def _pair_row(r: Resolution, winner_id: str, loser_id: str, dimensions: List[str]) -> Dict[str, Any]:
    side = {r.winner: "winner", r.loser: "loser", "tie": "tie"}
    return dict(pair_id=f"row{r.row:05d}", winner=winner_id, loser=loser_id, caption=r.prompt, source="human",
                weight=r.weight, table_row=r.row, winner_side=r.winner, video_winner=r.video(r.winner),
                video_loser=r.video(r.loser), wins_winner=max(r.wins_a, r.wins_b), wins_loser=min(r.wins_a, r.wins_b),
                loser_correct=r.correct(r.loser), **{f"pref_{d}": side[r.labels[d]] for d in dimensions})


def run_human_pairs(cfg: PairsConfig, latents_dir: Path, out_dir: Path, progress: Callable[[str], None] = print,
                    work_dir: Optional[Path] = None) -> Dict[str, Any]:
    """Write the PreferencePairs folder for the pair table ``cfg.source``; returns meta.json's dict."""
    reader = LatentReader(latents_dir)
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        rows, table_hash = open_table(cfg.source, cfg.dimensions, Path(tmp))
        results = resolve_table(rows, cfg.dimensions)
        enc = PairEncoder(reader, Path(tmp), cfg.source)
        progress(f"labels human: {len(rows)} rows from {cfg.source}; clips of {enc.frames} frames at "
                 f"{enc.height}x{enc.width} (latent {list(enc.latent_shape)}), the dataset's VAE and text encoder")
        writer = PairsWriter(out_dir, latents_dir)
        final: List[Resolution] = []
        pairs: List[Dict[str, Any]] = []
        for r in results:
            if r.kept and cfg.max_pairs and len(pairs) >= cfg.max_pairs:
                r = r.drop(OVER_MAX_PAIRS, f"{cfg.max_pairs} pairs already kept")
            if r.kept:
                try:
                    files = [enc.file(r.video(r.winner)), enc.file(r.video(r.loser))]
                    if files[0][1] == files[1][1]:
                        raise VideoError(IDENTICAL_VIDEOS, f"{r.video_a} and {r.video_b} have the same bytes")
                    ids = [sha256_bytes(h.encode(), r.prompt.encode(), n=16) for _, h in files]
                    new = {c: enc.latent(path, h) for c, (path, h) in zip(ids, files) if c not in writer.clips}
                except VideoError as e:
                    r = r.drop(e.key, e.detail)
            if r.kept:
                text, mask = enc.prompt(r.prompt)
                for clip_id, (_, h) in zip(ids, files):
                    if clip_id in new:   # a clip already written (same video, same prompt) is not encoded again
                        writer.add(clip_id, new[clip_id], text, mask, caption=r.prompt, source_hash=h[:16])
                pairs.append(_pair_row(r, ids[0], ids[1], list(cfg.dimensions)))
            final.append(r)
    reasons = count_keys(final)
    dropped = sum(reasons.values())
    if len(pairs) + dropped != len(rows):
        raise AssertionError(f"pairs {len(pairs)} + dropped {dropped} != rows {len(rows)}")
    if not pairs:
        raise ValueError(f"{cfg.source}: no pair left of {len(rows)} rows (dropped: {reasons}); first reasons: "
                         f"{[r.reason for r in final[:3]]}")
    summary = {
        "labels": "human", "source": cfg.source, "table_hash": table_hash, "rows": len(rows), "pairs": len(pairs),
        "dropped": dropped, "reasons": reasons, "loser_incorrect": sum(not p["loser_correct"] for p in pairs),
        "dimensions": list(cfg.dimensions), "clips": len(writer.clips), "latent_shape": list(enc.latent_shape),
        "clip_frames": enc.frames, "height": enc.height, "width": enc.width, "max_pairs": cfg.max_pairs,
        "data_hash": reader.meta.get("content_hash", ""),
    }
    with open(writer.root / DROPPED, "w") as f:   # one line per dropped row: which, and why
        for r in final:
            if not r.kept:
                f.write(json.dumps({"row": r.row, "key": r.key, "reason": r.reason}) + "\n")
    meta = writer.finish(pairs, summary)
    progress(f"human pairs: {len(pairs)} of {len(rows)} rows kept, {dropped} dropped "
             f"({', '.join(f'{k} {n}' for k, n in reasons.items()) or 'none'})")
    return meta
