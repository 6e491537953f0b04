"""Compress stage: ClipManifest folder -> LatentDataset folder (docs/artifacts.md).

Decodes kept clips with PyAV to [-1, 1] (docs/mugv.md §1.6: pixels in [-1, 1], latents normalised exactly once here),
trains the VAE briefly when no weights are given, encodes every clip (posterior mode), normalises per channel -
with statistics of the train split (``vae.latent_stats: dataset``) or with the VAE's own shift/scale buffers, i.e. the
published MUG-V constants (``mugv``) - encodes captions with T5 and writes safetensors shards, index.parquet and
meta.json with ``common.latents.LatentWriter``. Runs without Flyte; the Flyte task wraps ``run_compress``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, cast

import numpy as np
import pandas as pd
import torch

from common.config import CompressConfig
from common.hashing import sha256_bytes, sha256_file, sha256_json
from common.latents import CURATION, VAE_WEIGHTS, LatentWriter
from models.text_encoder import TextEncoder, state_dict_sha256
from models.vae import CHUNK, VideoVAE, load_mugv_vae

TRAIN_BATCH = 4    # 8-frame chunks per VAE training step
FILTER_SCORES = ("aesthetic", "motion", "sharpness")   # manifest columns copied to the index (quality ranking)
TRAIN_CROP = 32    # random spatial crop for VAE training (the VAE is fully convolutional)


def read_clip(path: str | Path, num_frames: int) -> torch.Tensor:
    """Decode the first ``num_frames`` frames of a video with PyAV -> x_3THW float32 in [-1, 1]."""
    import av

    frames = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            frames.append(frame.to_ndarray(format="rgb24"))
            if len(frames) == num_frames:
                break
    if len(frames) < num_frames:
        raise ValueError(f"{path}: expected {num_frames} frames, decoded {len(frames)}")
    x_THW3 = torch.from_numpy(np.stack(frames))
    return x_THW3.permute(3, 0, 1, 2).float().div(127.5).sub(1.0).contiguous()


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


def manifest_hash(manifest_dir: str | Path, kept: pd.DataFrame) -> str:
    """sha256 of {relative path: sha256} of manifest.parquet, summary.json (if any) and the kept clip files: what
    compression read of the ClipManifest folder."""
    root = Path(manifest_dir)
    names = ["manifest.parquet"] + (["summary.json"] if (root / "summary.json").is_file() else [])
    return sha256_json({name: sha256_file(root / name) for name in names + [str(p) for p in kept["path"]]})


@contextlib.contextmanager
def _deterministic() -> Iterator[None]:
    prev, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=warn)


def _replicate_first(x_3THW: torch.Tensor) -> torch.Tensor:
    """8k+1 frames -> 8(k+1) frames with frame 0 repeated 8 times (the layout VideoVAE.encode uses)."""
    if x_3THW.shape[1] % CHUNK == 1:
        x_3THW = torch.cat([x_3THW[:, :1].expand(-1, CHUNK - 1, -1, -1), x_3THW], dim=1)
    return x_3THW


def train_vae(vae: VideoVAE, clips: List[torch.Tensor], cfg: CompressConfig, device: torch.device,
              progress: Callable[[str], None]) -> List[float]:
    """Adam on L1 recon + kl_weight * KL over random 8-frame chunks (random TRAIN_CROP crops). Returns the losses."""
    gen = torch.Generator().manual_seed(cfg.seed)
    noise_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    full = [_replicate_first(x) for x in clips]
    chunks = [(i, j) for i, x in enumerate(full) for j in range(x.shape[1] // CHUNK)]
    crop = min([TRAIN_CROP] + [min(x.shape[2:]) for x in clips]) // CHUNK * CHUNK
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.vae_lr)
    every, losses = max(1, cfg.vae_train_steps // 10), []
    vae.train()
    for step in range(1, cfg.vae_train_steps + 1):
        picks = torch.randint(len(chunks), (min(TRAIN_BATCH, len(chunks)),), generator=gen).tolist()
        batch = []
        for k in picks:
            i, j = chunks[k]
            x = full[i]
            top = int(torch.randint(x.shape[2] - crop + 1, (1,), generator=gen))
            left = int(torch.randint(x.shape[3] - crop + 1, (1,), generator=gen))
            batch.append(x[:, j * CHUNK:(j + 1) * CHUNK, top:top + crop, left:left + crop])
        x_BCTHW = torch.stack(batch).to(device)
        recon, posterior = vae(x_BCTHW, sample=True, generator=noise_gen)
        total = (recon - x_BCTHW).abs().mean() + cfg.vae_kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        losses.append(total.item())
        if step % every == 0 or step == cfg.vae_train_steps:
            progress(f"compress: vae step {step}/{cfg.vae_train_steps} loss {losses[-1]:.4f}")
    vae.eval()
    return losses


def _build_vae(cfg: CompressConfig) -> VideoVAE:
    """Random init (seeded), or strict loading of ``vae_pretrained`` (our vae.safetensors or MUG-V's vae.pt)."""
    if cfg.vae_pretrained:
        path = Path(cfg.vae_pretrained)
        if path.is_dir():
            path = path / VAE_WEIGHTS
        if not path.is_file():
            raise FileNotFoundError(f"compress.vae_pretrained: no weights file at {path}")
        return load_mugv_vae(path, cfg=cfg.vae)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return VideoVAE(cfg.vae)


def _build_text_encoder(cfg: CompressConfig) -> TextEncoder:
    t = cfg.text
    if t.pretrained:
        return TextEncoder.from_pretrained(t.pretrained, max_length=t.max_length)
    return TextEncoder.tiny(t.d_model, t.num_layers, t.num_heads, t.d_ff, t.max_length, t.seed)


def _read_kept(manifest_dir: Path) -> pd.DataFrame:
    path = manifest_dir / "manifest.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"not a ClipManifest folder: {manifest_dir} has no manifest.parquet")
    df = pd.read_parquet(path)
    kept = df[df["status"] == "kept"].sort_values("clip_id").reset_index(drop=True)
    if kept.empty:
        raise ValueError(f"{path}: no clips with status 'kept' to compress")
    if kept["clip_id"].duplicated().any():
        raise ValueError(f"{path}: duplicate clip_id among kept clips")
    return kept


def _cpu_state(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def run_compress(cfg: CompressConfig, manifest_dir: Path, out_dir: Path,
                 progress: Callable[[str], None] = print) -> dict:
    """Write the LatentDataset for the kept clips of ``manifest_dir`` into ``out_dir``; returns meta.json's dict."""
    manifest_dir, out_dir = Path(manifest_dir), Path(out_dir)
    if cfg.shard_size < 1:
        raise ValueError(f"compress.shard_size must be >= 1, got {cfg.shard_size}")
    kept = _read_kept(manifest_dir)
    writer = LatentWriter(out_dir, cfg.shard_size)   # refuses a folder that is not empty
    captions = [c if isinstance(c, str) else "" for c in kept["caption"]]
    progress(f"compress: {len(kept)} kept clips from {manifest_dir}")
    clips = [read_clip(manifest_dir / r.path, int(r.num_frames)) for r in kept.itertuples()]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with _deterministic():
        vae = _build_vae(cfg).to(device)
        losses = []
        if not cfg.vae_pretrained and cfg.vae_train_steps > 0:
            losses = train_vae(vae, clips, cfg, device, progress)
        steps = len(losses)
        vae.eval()
        with torch.no_grad():
            raw = [vae.encode(x[None].to(device)).mode()[0].cpu() for x in clips]
        progress(f"compress: encoded {len(raw)} clips, latent {list(raw[0].shape)}")
        split = split_clips(list(kept["clip_id"]), cfg.holdout_fraction)
        if cfg.vae.latent_stats == "mugv":   # the published constants, as the VAE's shift/scale buffers hold them
            shift, scale = cast(torch.Tensor, vae.shift), cast(torch.Tensor, vae.scale)   # registered buffers
            mean, std = shift.flatten().double().cpu(), scale.flatten().double().cpu()
        else:
            train_z = torch.cat([z.flatten(1) for z, c in zip(raw, kept["clip_id"]) if split[c] == "train"], dim=1)
            mean = train_z.double().mean(dim=1)
            std = train_z.double().std(dim=1, unbiased=False).clamp_min(1e-6)
        progress(f"compress: latent normalisation from {cfg.vae.latent_stats} statistics (applied once, here)")
        norm = [((z.double() - mean.view(-1, 1, 1, 1)) / std.view(-1, 1, 1, 1)).float() for z in raw]
        text_enc = _build_text_encoder(cfg).to(device)
        text_BLD, mask_BL = text_enc.encode(captions)
        null_LD, null_mask_L = text_enc.encode([""])

    for i, r in enumerate(kept.itertuples()):
        writer.add(str(r.clip_id), norm[i], text_BLD[i], mask_BL[i], split=split[str(r.clip_id)], caption=captions[i],
                   score=float(r.score), bucket=str(r.bucket), source_hash=str(r.source_hash),
                   **{k: float(getattr(r, k, math.nan)) for k in FILTER_SCORES})
    writer.write_null_text(null_LD[0], null_mask_L[0])
    vae_state, vae_config = _cpu_state(vae), dataclasses.asdict(cfg.vae)
    writer.write_vae(vae_state, vae_config)
    ident = text_enc.identity()
    if not cfg.text.pretrained:
        writer.write_text_encoder(text_enc)
    meta: Dict[str, Any] = {
        "vae": {"config": vae_config, "weights_sha256": state_dict_sha256(vae_state), "trained_steps": steps,
                "random_init": not cfg.vae_pretrained and steps == 0, "loss_history": losses},
        "text_encoder": {"config": None if cfg.text.pretrained else ident["config"], "pretrained": cfg.text.pretrained,
                         "weights_sha256": ident["weights_sha256"]},
        "latent_mean": [float(v) for v in mean], "latent_std": [float(v) for v in std],
        "clip_manifest_hash": manifest_hash(manifest_dir, kept),
    }
    band = motion_band(manifest_dir)
    if band is not None:
        meta[CURATION] = band
    meta = writer.finish(meta)
    progress(f"compress: wrote {len(kept)} clips in {len(range(0, len(kept), cfg.shard_size))} shard(s) to "
             f"{out_dir} (content_hash {meta['content_hash'][:16]})")
    return meta
