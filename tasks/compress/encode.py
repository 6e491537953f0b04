"""Compress stage: ClipManifest folder -> LatentDataset folder (docs/artifacts.md).

Decodes kept clips with PyAV to [-1, 1] (docs/mugv.md §1.6: pixels in [-1, 1], latents normalised exactly once here),
encodes them with the VAE (posterior mode) and their captions with T5, normalises per channel - with statistics of
the train split (``vae.latent_stats: dataset``) or with the VAE's own shift/scale buffers, i.e. the published MUG-V
constants (``mugv``) - and writes safetensors shards, index.parquet and meta.json with ``common.latents.LatentWriter``.

The VAE comes from a VAE folder (``vae_dir``, written once by the ``fit_vae`` task: ``vae_fit.py``) or, when none is
given, is fitted here on the clips (tests, benchmarks). With a ``store_dir`` the raw latents and caption features
live in the latent store (``latent_store.py``): every kept clip is looked up there, only the misses are decoded and
encoded, and the dataset is then built from the store exactly as from fresh encodings (the same bytes). Samples of
one pixel shape are encoded ``compress.encode_batch_size`` at a time, in one VAE call where that gives the bits of
one-by-one encoding on CPU (``encode_batch``, ``batch_is_exact``), and each distinct caption once. Runs without
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
from tasks.compress.clips import (
    clip_file_hashes,
    deterministic,
    manifest_hash,
    read_clip,
    read_image,
    read_kept,
    resize_pixels,
)
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


def _call_sizes(total: int, group: int) -> List[int]:
    """Batch sizes of the calls ``VideoVAE.encode`` makes over ``total`` items in groups of ``group`` (0: one call)."""
    if group <= 0 or group >= total:
        return [total]
    return [group] * (total // group) + ([total % group] if total % group else [])


def batch_is_exact(vae_cfg: Any, frames: int, batch: int) -> bool:
    """Whether one ``VideoVAE.encode`` call on ``batch`` clips of ``frames`` frames gives every clip the same bits
    as encoding it alone, on CPU in float32.

    Why it can differ: PyTorch picks the CPU convolution kernel per call from the batch size (``Slow2d`` for a batch
    of one, oneDNN for more: ``torch._C._select_conv_backend``), and the two round differently (measured up to 6e-6
    in the tiny VAE). Calls with batches of >= 2 gave the same bits for every batch size tried (tests/test_compress_
    batch.py). ``VideoVAE.encode`` folds frames into the batch of its 2D stage (groups of ``micro_batch_size``
    frames) and 8-frame chunks into the batch of its temporal stage (groups of ``decode_window`` chunks when
    micro-batching): batching is exact when, in both stages, no call is a batch of one in either way, or every call
    is (``micro_batch_size`` 1 in the 2D stage). So images and clips of <= 8 frames are encoded alone, and with
    micro-batching a clip whose frame count leaves a single-frame group.
    """
    mb, window = int(vae_cfg.micro_batch_size), int(vae_cfg.decode_window)
    chunks = (frames + 7) // 8   # 8k+1 frames: frame 0 is replicated to a chunk of its own
    stages = [(frames, mb), (chunks, window if mb > 0 else 0)]
    for total, group in stages:
        alone, together = _call_sizes(total, group), _call_sizes(batch * total, group)
        if not (min(alone + together) >= 2 or max(alone + together) == 1):
            return False
    return True


def encode_batch(vae: Any, xs: List[torch.Tensor], device: torch.device) -> List[torch.Tensor]:
    """Pixels [3,T,H,W] of one shape -> their raw latents [C,t,h,w] (posterior mode) on the CPU, in one
    ``vae.encode`` call where that is exact on CPU (``batch_is_exact``; the VAE's ``micro_batch_size`` bounds its
    memory), else one by one. On CUDA always one call (GPU kernels make no bitwise promise across batch sizes)."""
    if len(xs) > 1 and (device.type != "cpu" or batch_is_exact(vae.cfg, xs[0].shape[1], len(xs))):
        with torch.no_grad():
            z = vae.encode(torch.stack(xs).to(device)).mode().cpu()
        return [zi.clone() for zi in z]
    with torch.no_grad():
        return [vae.encode(x[None].to(device)).mode()[0].cpu() for x in xs]


@dataclasses.dataclass(frozen=True)
class Sample:
    """One sample of the LatentDataset: a variant (resolution x frames) of a kept manifest row."""
    sample_id: str        # the row's clip_id for its primary variant, else "<clip_id>_<resolution>_<frames>f"
    row: int              # index into the kept rows
    resolution: str
    height: int
    width: int
    frames: int
    top_resolution: bool
    full_length: bool
    kind: str             # "clip" | "image" | "keyframe"
    split_key: str        # the clip whose split the sample shares (a key frame: its clip's)


def plan_samples(kept: Any) -> List[Sample]:
    """Every variant of every kept row (``variants`` JSON from curation; a manifest without it: the row itself at
    resolution "")."""
    out: List[Sample] = []
    cols = set(kept.columns)
    for i, r in enumerate(kept.itertuples()):
        kind = str(getattr(r, "kind", "") or "clip") if "kind" in cols else "clip"
        raw = str(getattr(r, "variants", "") or "") if "variants" in cols else ""
        variants: List[List[Any]] = json.loads(raw) if raw else \
            [["", getattr(r, "height", 0), getattr(r, "width", 0), r.num_frames]]   # 0: the file's own size
        top_res, full = variants[0][0], int(variants[0][3])
        parent = str(getattr(r, "parent_clip", "") or "") if "parent_clip" in cols else ""
        for res, h, w, f in variants:
            primary = res == top_res and int(f) == full
            sid = str(r.clip_id) if primary else f"{r.clip_id}_{res}_{int(f)}f"
            out.append(Sample(sid, i, str(res), int(h), int(w), int(f), res == top_res, int(f) == full, kind,
                              parent if kind == "keyframe" and parent else str(r.clip_id)))
    return out


def run_compress(cfg: CompressConfig, manifest_dir: Path, out_dir: Path, progress: Callable[[str], None] = print,
                 *, store_dir: Optional[Path] = None, vae_dir: Optional[Path] = None) -> dict:
    """Write the LatentDataset for the kept rows of ``manifest_dir`` into ``out_dir``; returns meta.json's dict.

    Every kept clip, image and key frame is encoded at each of its variants (curation's ``variants``: resolution x
    frames; docs/artifacts.md): one sample each, its pixels the row's file cut to the variant's first frames and
    resized (``clips.resize_pixels``). ``vae_dir``: a VAE folder (``vae_fit.ensure_vae``) to encode with; None fits
    the VAE here on every kept clip. ``store_dir``: the latent store folder; every sample is looked up there and only
    the misses are decoded and encoded (and added to it); meta.json then has "latent_store" {"reused", "encoded",
    ...}, which the content hash leaves out: a dataset built from a warm store is the same, file for file, as one
    built from a cold one.
    """
    manifest_dir, out_dir = Path(manifest_dir), Path(out_dir)
    if cfg.shard_size < 1:
        raise ValueError(f"compress.shard_size must be >= 1, got {cfg.shard_size}")
    kept = read_kept(manifest_dir)
    writer = LatentWriter(out_dir, cfg.shard_size)   # refuses a folder that is not empty
    rows = list(kept.itertuples())
    captions = [c if isinstance(c, str) else "" for c in kept["caption"]]
    paths = [manifest_dir / str(p) for p in kept["path"]]
    clip_hashes = clip_file_hashes(manifest_dir, kept)
    file_sha = [clip_hashes[str(p)] for p in kept["path"]]
    samples = plan_samples(kept)
    progress(f"compress: {len(kept)} kept rows from {manifest_dir} -> {len(samples)} samples "
             f"({', '.join(f'{k} {v}' for k, v in _bucket_counts(samples).items())})")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pixels: Dict[int, torch.Tensor] = {}   # row -> its file's pixels [3,T,H,W], while its variants are encoded

    def row_pixels(i: int) -> torch.Tensor:
        if i not in pixels:
            r = rows[i]
            pixels[i] = read_image(paths[i]) if samples_kind[i] != "clip" else read_clip(paths[i], int(r.num_frames))
        return pixels[i]

    samples_kind = {s.row: s.kind for s in samples}
    with deterministic():
        # 1. the VAE: from its folder, or fitted here on every kept clip
        if vae_dir is None:
            clip_idx = [i for i in range(len(rows)) if samples_kind.get(i) == "clip"]
            fit = [row_pixels(i) for i in clip_idx] if needs_clips(cfg) else []
            vae, vae_meta = fit_vae_module(cfg, fit, device, progress)
        else:
            vae, folder_meta = load_vae_dir(vae_dir, cfg)
            vae = vae.to(device)
            vae_meta = dataset_vae_meta(folder_meta, dataclasses.asdict(cfg.vae))   # = the folder's (checked)
            progress(f"compress: VAE from {vae_dir} (identity {vae_meta['weights_sha256'][:16]}, "
                     f"{vae_meta['trained_steps']} fit steps)")
        text_enc = _build_text_encoder(cfg).to(device)

        # 2. look every sample up in the latent store; encode the misses (reading only their files)
        ident = text_enc.identity()
        idents = identities(vae_meta["weights_sha256"], vae_meta["config"], text_enc, device, text_identity=ident)
        keys = [entry_key(str(rows[s.row].clip_id), file_sha[s.row], captions[s.row], s.frames, idents,
                          size=None if s.top_resolution else (s.height, s.width)) for s in samples]
        store = LatentStore(store_dir) if store_dir is not None else None
        entries: Dict[str, Entry] = {}
        if store is not None:
            for smp, k in zip(samples, keys):
                found = store.get(k)
                if found is not None:
                    entries[smp.sample_id] = found
            total, reused = len(samples), len(entries)
            why = ("every sample is encoded again" if not reused else f"all {total} samples were stored for it by an "
                   "earlier run" if reused == total else f"{reused} of {total} samples were stored for it by an "
                   f"earlier run, the other {total - reused} are encoded")
            for change in identity_changes(store.last_identities(), idents):
                progress(f"compress: {change}: {why}")
            progress(f"compress: latent store {store.root}: {reused} samples from the store, {total - reused} to "
                     "encode")
        reused, t0, last = len(entries), time.perf_counter(), -1
        todo = [(smp, k) for smp, k in zip(samples, keys) if smp.sample_id not in entries]
        pending: Dict[tuple, List[Any]] = {}   # pixel shape -> [(sample, key, x_3THW)], encoded B at a time
        texts: Dict[str, Any] = {}   # caption -> its features: a row's variants share its caption
        n_done = 0

        def flush(shape: tuple) -> None:
            nonlocal n_done
            batch = pending.pop(shape)
            zs = encode_batch(vae, [x for _, _, x in batch], device)
            for (smp, k, _), z_CTHW in zip(batch, zs):
                caption = captions[smp.row]
                if caption not in texts:   # one at a time: a caption's features do not depend on the run's others
                    text_BLD, mask_BL = text_enc.encode([caption])
                    texts[caption] = (text_BLD[0], mask_BL[0])
                text_LD, mask_L = texts[caption]
                entries[smp.sample_id] = (z_CTHW, text_LD.clone(), mask_L.clone())   # own memory (safetensors)
                if store is not None:
                    store.put(k, *entries[smp.sample_id], metadata={
                        "clip_id": str(rows[smp.row].clip_id), "file_sha256": file_sha[smp.row],
                        "caption": captions[smp.row], "num_frames": str(smp.frames),
                        "size": f"{smp.height}x{smp.width}"})
                n_done += 1
                if n_done % 50 == 0:
                    progress(f"compress: encoded {n_done}/{len(todo)} samples ({time.perf_counter() - t0:.0f} s)")

        for smp, k in todo:
            if smp.row != last:
                pixels.pop(last, None)   # a row's variants are consecutive: its pixels are read once
                last = smp.row
            x = row_pixels(smp.row)[:, :smp.frames]
            x = resize_pixels(x, smp.height, smp.width) if smp.height else x
            shape = tuple(x.shape)
            pending.setdefault(shape, []).append((smp, k, x.contiguous()))
            if len(pending[shape]) >= cfg.encode_batch_size:
                flush(shape)
        for shape in list(pending):
            flush(shape)
        pixels.clear()
        encoded = len(todo)
        if store is not None:
            store.remember(idents)
        progress(f"compress: encoded {encoded} samples in {time.perf_counter() - t0:.1f} s"
                 + (f", {reused} from the latent store" if store is not None else ""))

        # 3. normalise with train-split statistics (or the MUG-V constants) and encode the null caption
        split = split_clips(sorted({s.split_key for s in samples}), cfg.holdout_fraction)
        if cfg.vae.latent_stats == "mugv":   # the published constants, as the VAE's shift/scale buffers hold them
            shift, scale = cast(torch.Tensor, vae.shift), cast(torch.Tensor, vae.scale)   # registered buffers
            mean, std = shift.flatten().double().cpu(), scale.flatten().double().cpu()
        else:   # over the train clips at their largest resolution and full length (images too when no clip is)
            basis = [s for s in samples if s.top_resolution and s.full_length and split[s.split_key] == "train"]
            basis = [s for s in basis if s.kind == "clip"] or basis
            train_z = torch.cat([entries[s.sample_id][0].flatten(1) for s in basis], dim=1)
            mean = train_z.double().mean(dim=1)
            std = train_z.double().std(dim=1, unbiased=False).clamp_min(1e-6)
        progress(f"compress: latent normalisation from {cfg.vae.latent_stats} statistics (applied once, here)")
        null_LD, null_mask_L = text_enc.encode([""])

    # 4. the LatentDataset folder (samples in manifest order, each row's variants together)
    for smp in samples:
        r = rows[smp.row]
        z, text_LD, mask_L = entries[smp.sample_id]
        norm = ((z.double() - mean.view(-1, 1, 1, 1)) / std.view(-1, 1, 1, 1)).float()
        writer.add(smp.sample_id, norm, text_LD, mask_L, split=split[smp.split_key], caption=captions[smp.row],
                   score=float(r.score), bucket=f"{smp.height}x{smp.width}x{smp.frames}",
                   source_hash=str(r.source_hash), source_clip=str(r.clip_id), resolution=smp.resolution,
                   num_frames=smp.frames, height=smp.height, width=smp.width, kind=smp.kind,
                   top_resolution=smp.top_resolution, full_length=smp.full_length,
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
        "buckets": _bucket_counts(samples),
    }
    band = motion_band(manifest_dir)
    if band is not None:
        meta[CURATION] = band
    meta = writer.finish(meta)
    if store is not None:   # how the latents were obtained, not what they are: written after the content hash
        meta["latent_store"] = {"folder": str(store.root), "reused": reused, "encoded": encoded, "identities": idents}
        (out_dir / META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    progress(f"compress: wrote {len(samples)} samples of {len(kept)} kept rows in "
             f"{len(range(0, len(samples), cfg.shard_size))} shard(s) to {out_dir} (content_hash "
             f"{meta['content_hash'][:16]})")
    return meta


def _bucket_counts(samples: List[Sample]) -> Dict[str, int]:
    """{"<resolution>x<frames>": samples} ("" resolution: a manifest without variants)."""
    out: Dict[str, int] = {}
    for s in samples:
        k = f"{s.resolution or 'clip'}x{s.frames}"
        out[k] = out.get(k, 0) + 1
    return dict(sorted(out.items()))
