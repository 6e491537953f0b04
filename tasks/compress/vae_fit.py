"""The video VAE as an artifact of its own: built (seeded random init, or MUG-V's ``vae.pt`` / our weights via
``compress.vae_pretrained``), fitted briefly on the kept clips of a ClipManifest, written to a folder that later
runs reuse. No Flyte, no MLflow (the Flyte task ``fit_vae`` in ``task.py`` wraps ``ensure_vae``).

A VAE folder (docs/artifacts.md, "VAE folder"):

    vae.safetensors   the VideoVAE state dict (float32)
    config.json       its VAEConfig as a dict (the same two files as a LatentDataset's vae/)
    meta.json         {"weights_sha256", "trained_steps", "random_init", "loss_history", "source", "key", ...};
                      written last: a folder without it is incomplete and fitted again

Its key is ``vae_key(cfg)``: a hash of the settings that define the VAE (``VAE_FIELDS``, the ``vae_refit``
counter among them, and the bytes of ``vae_pretrained``), not of the clips: the fit uses the clips of the first
manifest it is run on, and a later run with more clips reuses it until ``compress.vae_refit`` is raised.

    meta, reused = ensure_vae(cfg, folder, manifest_dir, progress=print)   # fits only if folder holds none
    vae, meta = load_vae_dir(folder, cfg)                                   # what run_compress(vae_dir=...) does
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch

from common.config import CompressConfig, to_dict
from common.hashing import sha256_file, sha256_json
from common.latents import VAE_CONFIG, VAE_WEIGHTS
from models.config import VAEConfig
from models.text_encoder import state_dict_sha256
from models.vae import CHUNK, VideoVAE, load_mugv_vae, load_vae_state
from tasks.compress.clips import clip_rows, deterministic, manifest_hash, read_clip, read_kept, replicate_first

VAE_META = "meta.json"
VAE_FIELDS = ("vae", "vae_pretrained", "vae_train_steps", "vae_lr", "vae_kl_weight", "seed", "vae_refit")
TRAIN_BATCH = 4    # 8-frame chunks per VAE training step
TRAIN_CROP = 32    # random spatial crop for VAE training (the VAE is fully convolutional)


def pretrained_path(cfg: CompressConfig) -> Path:
    """The weights file of ``vae_pretrained`` (a file, or a folder holding vae.safetensors)."""
    path = Path(cfg.vae_pretrained)
    if path.is_dir():
        path = path / VAE_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"compress.vae_pretrained: no weights file at {path}")
    return path


def vae_key(cfg: CompressConfig) -> str:
    """sha256[:16] of the VAE-defining settings (``VAE_FIELDS``) and, for an imported VAE, its file's sha256."""
    d = to_dict(cfg)
    fields: Dict[str, Any] = {k: d[k] for k in VAE_FIELDS}
    if cfg.vae_pretrained:
        fields["vae_pretrained_sha256"] = sha256_file(pretrained_path(cfg))
    return sha256_json(fields, n=16)


def build_vae(cfg: CompressConfig) -> VideoVAE:
    """Random init (seeded), or strict loading of ``vae_pretrained`` (our vae.safetensors or MUG-V's vae.pt)."""
    if cfg.vae_pretrained:
        return load_mugv_vae(pretrained_path(cfg), cfg=cfg.vae)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return VideoVAE(cfg.vae)


def train_vae(vae: VideoVAE, clips: List[torch.Tensor], cfg: CompressConfig, device: torch.device,
              progress: Callable[[str], None]) -> List[float]:
    """Adam on L1 recon + kl_weight * KL over random 8-frame chunks (random TRAIN_CROP crops). Returns the losses."""
    gen = torch.Generator().manual_seed(cfg.seed)
    noise_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    full = [replicate_first(x) for x in clips]
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


def cpu_state(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def needs_clips(cfg: CompressConfig) -> bool:
    """Whether building the VAE reads the clips (a fit: no ``vae_pretrained`` and ``vae_train_steps`` > 0)."""
    return not cfg.vae_pretrained and cfg.vae_train_steps > 0


def fit_vae_module(cfg: CompressConfig, clips: List[torch.Tensor], device: torch.device,
                   progress: Callable[[str], None]) -> Tuple[VideoVAE, Dict[str, Any]]:
    """Build the VAE on ``device`` and fit it on ``clips`` when ``needs_clips(cfg)`` (call inside
    ``deterministic()``). Returns (the VAE in eval mode, the LatentDataset's meta["vae"] for it)."""
    vae = build_vae(cfg).to(device)
    losses = train_vae(vae, clips, cfg, device, progress) if needs_clips(cfg) else []
    vae.eval()
    steps = len(losses)
    return vae, {"config": dataclasses.asdict(cfg.vae), "weights_sha256": state_dict_sha256(cpu_state(vae)),
                 "trained_steps": steps, "random_init": not cfg.vae_pretrained and steps == 0, "loss_history": losses}


def read_vae_meta(folder: str | Path) -> Optional[Dict[str, Any]]:
    """meta.json of a complete VAE folder, or None (no folder, or an incomplete one)."""
    folder = Path(folder)
    if not all((folder / name).is_file() for name in (VAE_META, VAE_WEIGHTS, VAE_CONFIG)):
        return None
    return json.loads((folder / VAE_META).read_text())


def load_vae_dir(folder: str | Path, cfg: Optional[CompressConfig] = None) -> Tuple[VideoVAE, Dict[str, Any]]:
    """(VideoVAE on the CPU in eval mode, its meta.json) of a VAE folder (or a LatentDataset's vae/ folder, whose
    meta is then rebuilt from the weights). With ``cfg``, its ``vae`` config must be the folder's; the weights
    must hash to the recorded ``weights_sha256``."""
    folder = Path(folder)
    if not (folder / VAE_WEIGHTS).is_file() or not (folder / VAE_CONFIG).is_file():
        raise FileNotFoundError(f"{folder} is not a VAE folder: it needs {VAE_WEIGHTS} and {VAE_CONFIG} "
                                "(write one with the fit_vae task or tasks.compress.vae_fit.ensure_vae)")
    config = json.loads((folder / VAE_CONFIG).read_text())
    wanted = json.loads(json.dumps(dataclasses.asdict(cfg.vae))) if cfg is not None else config
    if config != wanted:
        diff = sorted(k for k in set(config) | set(wanted) if config.get(k) != wanted.get(k))
        raise ValueError(f"the VAE in {folder} was built with another compress.vae config (differs in {diff}); "
                         "fit it again with this config (fit_vae) or use the config it was built with")
    from safetensors.torch import load_file

    vae = load_vae_state(VideoVAE(VAEConfig(**config)), load_file(str(folder / VAE_WEIGHTS))).eval()
    sha = state_dict_sha256(cpu_state(vae))
    meta = read_vae_meta(folder) or {"weights_sha256": sha, "trained_steps": 0, "random_init": False,
                                     "loss_history": []}
    if meta["weights_sha256"] != sha:
        raise ValueError(f"{folder}: the weights hash to {sha[:16]} but meta.json records "
                         f"{meta['weights_sha256'][:16]}: the folder was modified; fit it again")
    return vae, meta


def dataset_vae_meta(meta: Dict[str, Any], config: Dict[str, Any]) -> Dict[str, Any]:
    """A VAE folder's meta.json -> the LatentDataset's meta["vae"] (the fields the inline fit records)."""
    return {"config": config, "weights_sha256": meta["weights_sha256"], "trained_steps": meta["trained_steps"],
            "random_init": meta["random_init"], "loss_history": meta["loss_history"]}


def ensure_vae(cfg: CompressConfig, folder: str | Path, manifest_dir: Union[Path, Callable[[], Path]],
               progress: Callable[[str], None] = print,
               manifest_label: str = "") -> Tuple[Dict[str, Any], bool]:
    """The VAE folder for ``cfg`` at ``folder``: reused when it already holds a complete one (nothing is read), else
    built and fitted on the kept clips of ``manifest_dir`` (a path, or a function returning one: called only when
    the clips are read) and written to a temporary sibling that is renamed into place. A folder holding the VAE
    of other settings (another ``vae_key``) is refused. ``manifest_label`` names the
    manifest in meta.json (default: the hash of what was read). Returns (meta.json's dict, reused)."""
    folder = Path(folder)
    meta = read_vae_meta(folder)
    if meta is not None and meta.get("key") != vae_key(cfg):
        raise ValueError(f"{folder} holds the VAE of other settings (key {meta.get('key')}, this config's "
                         f"{vae_key(cfg)}: {', '.join(VAE_FIELDS)}); use a folder per key, e.g. "
                         "tasks.common.artifact_dir(tracking, 'vae', vae_key(cfg))")
    if meta is not None:
        progress(f"compress: reusing the VAE fitted earlier in {folder} (identity {meta['weights_sha256'][:16]}, "
                 f"{meta['trained_steps']} steps, on manifest {meta.get('fit_manifest', '')[:16] or '-'}); "
                 "raise compress.vae_refit to fit it again")
        return meta, True
    clips: List[torch.Tensor] = []
    fit_manifest, fit_clips = "", 0
    if needs_clips(cfg):
        mdir = manifest_dir() if callable(manifest_dir) else Path(manifest_dir)
        kept = read_kept(mdir)
        videos = clip_rows(kept)   # the clips, not the images and key frames
        progress(f"compress: fitting the VAE on the {len(videos)} kept clips of {mdir}")
        clips = [read_clip(mdir / r.path, int(r.num_frames)) for r in videos.itertuples()]
        fit_manifest, fit_clips = manifest_label or manifest_hash(mdir, kept), len(videos)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with deterministic():
        vae, info = fit_vae_module(cfg, clips, device, progress)
    source = "pretrained" if cfg.vae_pretrained else ("fit" if info["trained_steps"] else "random")
    d = to_dict(cfg)
    meta = {**{k: v for k, v in info.items() if k != "config"}, "source": source, "pretrained": cfg.vae_pretrained,
            "key": vae_key(cfg), "key_fields": {k: d[k] for k in VAE_FIELDS}, "fit_manifest": fit_manifest,
            "fit_clips": fit_clips}
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".tmp-{folder.name}-", dir=folder.parent))
    try:
        from safetensors.torch import save_file

        save_file(cpu_state(vae), str(work / VAE_WEIGHTS))
        (work / VAE_CONFIG).write_text(json.dumps(info["config"], indent=2, sort_keys=True) + "\n")
        (work / VAE_META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")   # last: complete
        if folder.exists() and read_vae_meta(folder) is None:
            shutil.rmtree(folder)   # an incomplete folder left by an older version or by hand
        if not folder.exists():
            os.replace(work, folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    progress(f"compress: VAE ({source}, identity {meta['weights_sha256'][:16]}, {meta['trained_steps']} steps) "
             f"written to {folder}")
    return read_vae_meta(folder) or meta, False
