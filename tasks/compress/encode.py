"""Compress stage: ClipManifest folder -> LatentDataset folder (docs/artifacts.md).

Decodes kept clips with PyAV to [-1, 1] (docs/mugv.md §1.6: pixels in [-1, 1], latents normalised exactly once here),
encodes them with the VAE (posterior mode) and their captions with T5, normalises per channel - with statistics of
the train split (``vae.latent_stats: dataset``) or with the VAE's own shift/scale buffers, i.e. the published MUG-V
constants (``mugv``) - and writes safetensors shards, index.parquet and meta.json with ``common.latents.LatentWriter``.

The VAE comes from a VAE folder (``vae_dir``, written once by the ``fit_vae`` task: ``vae_fit.py``) or, when none is
given, is fitted here on the clips (tests, benchmarks). With a ``store_dir`` the raw latents and caption features
live in the latent store (``latent_store.py``): every kept clip is looked up there, only the misses are decoded and
encoded, and the dataset is then built from the store exactly as from fresh encodings (the same bytes). Runs without
Flyte; the Flyte tasks wrap ``run_compress`` and ``vae_fit.ensure_vae``.

    meta = run_compress(cfg, manifest_dir, out_dir, store_dir=store, vae_dir=vae_folder)
    meta["latent_store"]   # {"reused": n, "encoded": m, ...} (left out of the content hash)
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, cast

import torch

from common.config import CompressConfig
from common.hashing import sha256_bytes
from common.latents import CURATION, META, LatentWriter
from models.text_encoder import TextEncoder
from tasks.compress.clips import clip_file_hashes, deterministic, manifest_hash, read_clip, read_kept
from tasks.compress.latent_store import Entry, LatentStore, entry_key, identities, identity_changes
from tasks.compress.vae_fit import cpu_state, dataset_vae_meta, fit_vae_module, load_vae_dir, needs_clips

__all__ = ["read_clip", "split_clips", "motion_band", "manifest_hash", "run_compress"]
FILTER_SCORES = ("aesthetic", "motion", "sharpness")   # manifest columns copied to the index (quality ranking)


def split_clips(clip_ids: List[str], holdout_fraction: float) -> Dict[str, str]:
    """clip_id -> "train" | "val" by sha256(clip_id): val when its hash fraction < holdout_fraction.

    At least one train clip; with >= 2 clips and holdout_fraction > 0, at least one val clip.
    """
    u = {c: int(sha256_bytes(c.encode(), n=15), 16) / 16 ** 15 for c in clip_ids}
    split = {c: "val" if u[c] < holdout_fraction else "train" for c in clip_ids}
    if clip_ids and "train" not in split.values():
        split[max(clip_ids, key=lambda c: u[c])] = "train"
    if len(clip_ids) >= 2 and holdout_fraction > 0 and "val" not in split.values():
        split[min(clip_ids, key=lambda c: u[c])] = "val"
    return split


def motion_band(manifest_dir: str | Path) -> Dict[str, float] | None:
    """Curation's motion band {"motion_min", "motion_max"} from the manifest folder's summary.json ``config``
    (the quality ranking's motion term is the closeness to its middle), or None when it does not record one."""
    path = Path(manifest_dir) / "summary.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text()).get("config") or {}
    if "motion_min" not in config or "motion_max" not in config:
        return None
    return {"motion_min": float(config["motion_min"]), "motion_max": float(config["motion_max"])}


def _build_text_encoder(cfg: CompressConfig) -> TextEncoder:
    t = cfg.text
    if t.pretrained:
        return TextEncoder.from_pretrained(t.pretrained, max_length=t.max_length)
    return TextEncoder.tiny(t.d_model, t.num_layers, t.num_heads, t.d_ff, t.max_length, t.seed)


def _encode_clip(vae: Any, text_enc: TextEncoder, x_3THW: torch.Tensor, caption: str, device: torch.device) -> Entry:
    """One clip -> (raw latent [C,T,H,W] posterior mode, text [L,D], mask [L]) on the CPU. Captions are encoded one
    at a time, so a clip's features do not depend on which other clips are encoded in the same run."""
    with torch.no_grad():
        z_CTHW = vae.encode(x_3THW[None].to(device)).mode()[0].cpu()
    text_BLD, mask_BL = text_enc.encode([caption])
    return z_CTHW, text_BLD[0], mask_BL[0]


def run_compress(cfg: CompressConfig, manifest_dir: Path, out_dir: Path, progress: Callable[[str], None] = print,
                 *, store_dir: Optional[Path] = None, vae_dir: Optional[Path] = None) -> dict:
    """Write the LatentDataset for the kept clips of ``manifest_dir`` into ``out_dir``; returns meta.json's dict.

    ``vae_dir``: a VAE folder (``vae_fit.ensure_vae``) to encode with; None fits the VAE here on every kept clip.
    ``store_dir``: the latent store folder; every kept clip is looked up there and only the misses are decoded and
    encoded (and added to it); meta.json then has "latent_store" {"reused", "encoded", ...}, which the content hash
    leaves out: a dataset built from a warm store is the same, file for file, as one built from a cold one.
    """
    manifest_dir, out_dir = Path(manifest_dir), Path(out_dir)
    if cfg.shard_size < 1:
        raise ValueError(f"compress.shard_size must be >= 1, got {cfg.shard_size}")
    kept = read_kept(manifest_dir)
    writer = LatentWriter(out_dir, cfg.shard_size)   # refuses a folder that is not empty
    ids = [str(c) for c in kept["clip_id"]]
    captions = [c if isinstance(c, str) else "" for c in kept["caption"]]
    frames = [int(n) for n in kept["num_frames"]]
    paths = [manifest_dir / str(p) for p in kept["path"]]
    clip_hashes = clip_file_hashes(manifest_dir, kept)
    file_sha = [clip_hashes[str(p)] for p in kept["path"]]
    progress(f"compress: {len(kept)} kept clips from {manifest_dir}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pixels: Dict[str, torch.Tensor] = {}
    with deterministic():
        # 1. the VAE: from its folder, or fitted here on every kept clip
        if vae_dir is None:
            if needs_clips(cfg):
                pixels = {c: read_clip(p, n) for c, p, n in zip(ids, paths, frames)}
            vae, vae_meta = fit_vae_module(cfg, list(pixels.values()), device, progress)
        else:
            vae, folder_meta = load_vae_dir(vae_dir, cfg)
            vae = vae.to(device)
            vae_meta = dataset_vae_meta(folder_meta, dataclasses.asdict(cfg.vae))   # = the folder's (checked)
            progress(f"compress: VAE from {vae_dir} (identity {vae_meta['weights_sha256'][:16]}, "
                     f"{vae_meta['trained_steps']} fit steps)")
        text_enc = _build_text_encoder(cfg).to(device)

        # 2. look every clip up in the latent store; encode the misses (reading only their videos)
        ident = text_enc.identity()
        idents = identities(vae_meta["weights_sha256"], vae_meta["config"], text_enc, device, text_identity=ident)
        keys = [entry_key(c, h, cap, n, idents) for c, h, cap, n in zip(ids, file_sha, captions, frames)]
        store = LatentStore(store_dir) if store_dir is not None else None
        entries: Dict[str, Entry] = {}
        if store is not None:
            for c, k in zip(ids, keys):
                found = store.get(k)
                if found is not None:
                    entries[c] = found
            total, reused = len(ids), len(entries)
            why = ("every clip is encoded again" if not reused else f"all {total} clips were stored for it by an "
                   "earlier run" if reused == total else f"{reused} of {total} clips were stored for it by an "
                   f"earlier run, the other {total - reused} are encoded")
            for change in identity_changes(store.last_identities(), idents):
                progress(f"compress: {change}: {why}")
            progress(f"compress: latent store {store.root}: {reused} clips from the store, {total - reused} to "
                     "encode")
        reused, t0 = len(entries), time.perf_counter()
        for c, h, cap, n, p, k in zip(ids, file_sha, captions, frames, paths, keys):
            if c in entries:
                continue
            x = pixels.pop(c, None)
            entries[c] = _encode_clip(vae, text_enc, read_clip(p, n) if x is None else x, cap, device)
            if store is not None:
                store.put(k, *entries[c], metadata={"clip_id": c, "file_sha256": h, "caption": cap,
                                                    "num_frames": str(n)})
        encoded = len(ids) - reused
        if store is not None:
            store.remember(idents)
        progress(f"compress: encoded {encoded} clips in {time.perf_counter() - t0:.1f} s"
                 + (f", {reused} from the latent store" if store is not None else "")
                 + f", latent {list(entries[ids[0]][0].shape)}")

        # 3. normalise with train-split statistics (or the MUG-V constants) and encode the null caption
        raw = [entries[c][0] for c in ids]
        split = split_clips(ids, cfg.holdout_fraction)
        if cfg.vae.latent_stats == "mugv":   # the published constants, as the VAE's shift/scale buffers hold them
            shift, scale = cast(torch.Tensor, vae.shift), cast(torch.Tensor, vae.scale)   # registered buffers
            mean, std = shift.flatten().double().cpu(), scale.flatten().double().cpu()
        else:
            train_z = torch.cat([z.flatten(1) for z, c in zip(raw, ids) if split[c] == "train"], dim=1)
            mean = train_z.double().mean(dim=1)
            std = train_z.double().std(dim=1, unbiased=False).clamp_min(1e-6)
        progress(f"compress: latent normalisation from {cfg.vae.latent_stats} statistics (applied once, here)")
        norm = [((z.double() - mean.view(-1, 1, 1, 1)) / std.view(-1, 1, 1, 1)).float() for z in raw]
        null_LD, null_mask_L = text_enc.encode([""])

    # 4. the LatentDataset folder
    for i, r in enumerate(kept.itertuples()):
        _, text_LD, mask_L = entries[ids[i]]
        writer.add(ids[i], norm[i], text_LD, mask_L, split=split[ids[i]], caption=captions[i],
                   score=float(r.score), bucket=str(r.bucket), source_hash=str(r.source_hash),
                   **{k: float(getattr(r, k, math.nan)) for k in FILTER_SCORES})
    writer.write_null_text(null_LD[0], null_mask_L[0])
    writer.write_vae(cpu_state(vae), vae_meta["config"])
    if not cfg.text.pretrained:
        writer.write_text_encoder(text_enc)
    meta: Dict[str, Any] = {
        "vae": vae_meta,
        "text_encoder": {"config": None if cfg.text.pretrained else ident["config"], "pretrained": cfg.text.pretrained,
                         "weights_sha256": ident["weights_sha256"]},
        "latent_mean": [float(v) for v in mean], "latent_std": [float(v) for v in std],
        "clip_manifest_hash": manifest_hash(manifest_dir, kept, clip_hashes),
    }
    band = motion_band(manifest_dir)
    if band is not None:
        meta[CURATION] = band
    meta = writer.finish(meta)
    if store is not None:   # how the latents were obtained, not what they are: written after the content hash
        meta["latent_store"] = {"folder": str(store.root), "reused": reused, "encoded": encoded, "identities": idents}
        (out_dir / META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    progress(f"compress: wrote {len(kept)} clips in {len(range(0, len(kept), cfg.shard_size))} shard(s) to "
             f"{out_dir} (content_hash {meta['content_hash'][:16]})")
    return meta
