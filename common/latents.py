"""The LatentDataset folder (docs/artifacts.md): its file and tensor names, the one writer and the one reader.

A folder holds safetensors shards with ``<clip_id>/latent`` float32 [C,T,H,W] (normalised, ``(z - mean) / std``
per channel), ``<clip_id>/text`` float32 [L,D] and ``<clip_id>/text_mask`` uint8 [L]; ``index.parquet`` (one row
per clip, ``INDEX_COLUMNS``); ``meta.json`` (VAE and text-encoder identity, latent statistics, content hash and,
from the compress stage, curation's motion band under ``CURATION``);
``null_text.safetensors`` (the encoding of ""), ``vae/`` and ``text_encoder/`` (to decode and encode again).
The compress stage, the test helpers and the benchmarks write it with ``LatentWriter``; the trainer, the evaluator
and the tests read it with ``LatentReader``. No Flyte, MLflow or trainer code here.

    w = LatentWriter(out_dir, shard_size=64)           # refuses a folder that is not empty
    w.add("clip0000", latent_CTHW, text_LD, text_mask_L, split="train", caption="a cat", score=0.7,
          aesthetic=5.1, motion=4.0, sharpness=650.0)   # curation's scores: optional (NaN when unknown)
    w.write_null_text(null_LD, null_mask_L)             # optional, as are write_vae and write_text_encoder
    meta = w.finish({"vae": {"config": {"spatial_downsample": 8, ...}}, "latent_mean": [...], "latent_std": [...]})

    r = LatentReader(out_dir)
    latent_CTHW, text_LD, text_mask_L = r.load(r.clip_ids("train")[0])
    r.vae_spatial_downsample                             # 8: pixels per latent cell along H and W
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from common.hashing import sha256_dir, sha256_json

INDEX, META, NULL_TEXT = "index.parquet", "meta.json", "null_text.safetensors"
VAE_DIR, VAE_WEIGHTS, VAE_CONFIG, TEXT_DIR = "vae", "vae.safetensors", "config.json", "text_encoder"
LATENT, TEXT, TEXT_MASK = "latent", "text", "text_mask"      # tensor "<clip_id>/<name>" in a shard
INDEX_COLUMNS = ("clip_id", "shard", "split", "latent_shape", "text_len", "caption", "score", "bucket", "source_hash",
                 "aesthetic", "motion", "sharpness",   # curation's filter scores (NaN when unknown): quality ranking
                 # what a sample is (common.selection): the curation row it comes from, its resolution bucket, pixel
                 # frames (1: an image) and size, "clip" | "image" | "keyframe", and whether it is the row at its
                 # largest resolution and full length (a clip's "primary" sample has clip_id == source_clip)
                 "source_clip", "resolution", "num_frames", "height", "width", "kind", "top_resolution",
                 "full_length")
CURATION = "curation"   # meta.json: {"motion_min", "motion_max"}: curation's motion band, for the quality ranking
READ_COLUMNS = ("clip_id", "shard", "split", "latent_shape", "score")   # what the reader needs of the index


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def content_hash(root: str | Path, meta: Dict[str, Any]) -> str:
    """sha256 of every file under ``root`` but meta.json (``sha256_dir``) and of ``meta`` without "content_hash"."""
    return sha256_json([sha256_dir(root, exclude=(META,)), {k: v for k, v in meta.items() if k != "content_hash"}])


class LatentWriter:
    """Writes one LatentDataset folder: ``add`` clips (a shard is written every ``shard_size`` clips), optionally the
    null text, the VAE and the text encoder, then ``finish(meta)`` writes index.parquet and meta.json (with the
    content hash of everything written before it)."""

    def __init__(self, root: str | Path, shard_size: int = 1 << 30) -> None:
        self.root = Path(root)
        if shard_size < 1:
            raise ValueError(f"LatentWriter: shard_size must be >= 1, got {shard_size}")
        if self.root.exists() and any(self.root.iterdir()):
            raise ValueError(f"latent dataset folder {self.root} is not empty: write into a new or empty folder")
        self.root.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        self._rows: List[Dict[str, Any]] = []
        self._ids: set = set()
        self._pending: Dict[str, torch.Tensor] = {}    # tensors of the shard being filled
        self._shards = 0                                # shards written

    def add(self, clip_id: str, latent_CTHW: torch.Tensor, text_LD: torch.Tensor, text_mask_L: torch.Tensor,
            split: str = "train", caption: str = "", score: float = math.nan, bucket: str = "",
            source_hash: str = "", aesthetic: float = math.nan, motion: float = math.nan,
            sharpness: float = math.nan, source_clip: str = "", resolution: str = "", num_frames: int = 0,
            height: int = 0, width: int = 0, kind: str = "clip", top_resolution: bool = True,
            full_length: bool = True) -> None:
        """One sample: normalised latent float32 [C,T,H,W], text features float32 [L,D], mask bool/uint8 [L];
        curation's ranking score and filter scores (aesthetic, mean optical-flow motion, Laplacian sharpness); what
        the sample is (``common.selection``; the defaults: a clip at its largest resolution and full length)."""
        if split not in ("train", "val"):
            raise ValueError(f"{clip_id}: split must be 'train' or 'val', got {split!r}")
        if latent_CTHW.dim() != 4 or text_LD.dim() != 2 or text_mask_L.shape != text_LD.shape[:1]:
            raise ValueError(f"{clip_id}: need latent [C,T,H,W], text [L,D] and text_mask [L], got "
                             f"{list(latent_CTHW.shape)}, {list(text_LD.shape)}, {list(text_mask_L.shape)}")
        if latent_CTHW.dtype != torch.float32 or text_LD.dtype != torch.float32:
            raise ValueError(f"{clip_id}: latent and text must be float32 (docs/artifacts.md), got "
                             f"{latent_CTHW.dtype} and {text_LD.dtype}; convert with .float()")
        if clip_id in self._ids:
            raise ValueError(f"{clip_id}: added twice; clip ids are unique in a dataset")
        self._ids.add(clip_id)
        shard = shard_name(self._shards)
        self._pending[f"{clip_id}/{LATENT}"] = latent_CTHW.detach().cpu().contiguous()
        self._pending[f"{clip_id}/{TEXT}"] = text_LD.detach().cpu().contiguous()
        mask_L = text_mask_L.detach().cpu().to(torch.uint8).contiguous()
        self._pending[f"{clip_id}/{TEXT_MASK}"] = mask_L
        self._rows.append(dict(clip_id=clip_id, shard=shard, split=split, latent_shape=list(latent_CTHW.shape),
                               text_len=int(mask_L.sum()), caption=caption, score=float(score), bucket=bucket,
                               source_hash=source_hash, aesthetic=float(aesthetic), motion=float(motion),
                               sharpness=float(sharpness), source_clip=source_clip or clip_id, resolution=resolution,
                               num_frames=int(num_frames), height=int(height), width=int(width), kind=kind,
                               top_resolution=bool(top_resolution), full_length=bool(full_length)))
        if len(self._pending) == 3 * self.shard_size:   # three tensors per clip
            self._flush()

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if self._pending:
            save_file(self._pending, str(self.root / shard_name(self._shards)))
            self._pending, self._shards = {}, self._shards + 1

    def write_null_text(self, text_LD: torch.Tensor, text_mask_L: torch.Tensor) -> None:
        """The encoding of "" (negative / unconditional prompt)."""
        from safetensors.torch import save_file

        save_file({TEXT: text_LD.detach().cpu().contiguous(),
                   TEXT_MASK: text_mask_L.detach().cpu().to(torch.uint8).contiguous()}, str(self.root / NULL_TEXT))

    def write_vae(self, state: Dict[str, torch.Tensor], config: Dict[str, Any]) -> None:
        """The VAE that made the latents: its weights and its ``VAEConfig`` as a dict."""
        from safetensors.torch import save_file

        (self.root / VAE_DIR).mkdir(exist_ok=True)
        save_file(state, str(self.root / VAE_DIR / VAE_WEIGHTS))
        (self.root / VAE_DIR / VAE_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    def write_text_encoder(self, encoder: Any) -> None:
        """A text encoder copied into the folder (``models.text_encoder.TextEncoder``: its ``save``)."""
        encoder.save(self.root / TEXT_DIR)

    def finish(self, meta: Dict[str, Any]) -> Dict[str, Any]:
        """Write the last shard, index.parquet and meta.json (``meta`` + "content_hash"); returns meta.json's dict.
        ``meta`` needs "vae" {"config": {"spatial_downsample": ...}}, "latent_mean" and "latent_std" (one float per
        latent channel)."""
        import pandas as pd

        if not self._rows:
            raise ValueError(f"{self.root}: no clips added; a LatentDataset holds at least one clip")
        channels = self._rows[0]["latent_shape"][0]
        _vae_spatial_downsample(meta, self.root / META)
        for key in ("latent_mean", "latent_std"):
            if len(meta.get(key, ())) != channels:
                raise ValueError(f"meta[{key!r}] must hold one float per latent channel ({channels}), got "
                                 f"{meta.get(key)!r}")
        self._flush()
        pd.DataFrame(self._rows, columns=list(INDEX_COLUMNS)).to_parquet(self.root / INDEX, index=False)
        meta = {**meta, "content_hash": content_hash(self.root, meta)}
        (self.root / META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return meta


def _vae_spatial_downsample(meta: Dict[str, Any], where: Path) -> int:
    value = meta.get("vae", {}).get("config", {}).get("spatial_downsample")
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}: needs vae.config.spatial_downsample (pixels per latent cell, e.g. 8), got "
                         f"{value!r}; rewrite the dataset with the compress stage")
    return value


class LatentReader:
    """One LatentDataset folder: ``.index`` (DataFrame), ``.meta`` (dict), ``load(clip_id)``, the latent statistics
    (``normalize``/``denormalize``), the null text and the codecs. Shards are opened (memory-mapped) on first use."""

    def __init__(self, root: str | Path) -> None:
        import pandas as pd

        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"latents dir not found: {self.root} (expected a LatentDataset folder written by "
                                    "the compress stage)")
        for name in (INDEX, META):
            if not (self.root / name).is_file():
                raise FileNotFoundError(f"{self.root / name} not found: {self.root} is not a LatentDataset folder "
                                        "(docs/artifacts.md); rewrite it with the compress stage")
        self.index: pd.DataFrame = pd.read_parquet(self.root / INDEX)
        missing = sorted(set(READ_COLUMNS) - set(self.index.columns))
        if missing:
            raise ValueError(f"{self.root / INDEX}: missing columns {missing}")
        self.meta: Dict[str, Any] = json.loads((self.root / META).read_text())
        self._shard = dict(zip(self.index["clip_id"], self.index["shard"]))
        self._shape = {c: tuple(int(v) for v in s) for c, s in zip(self.index["clip_id"], self.index["latent_shape"])}
        self._handles: Dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.index)

    def clip_ids(self, split: Optional[str] = None) -> List[str]:
        """Sample ids in index order, optionally only those of ``split`` ("train" | "val")."""
        rows = self.index if split is None else self.index[self.index["split"] == split]
        return list(rows["clip_id"])

    def primary_clip_ids(self, split: Optional[str] = None) -> List[str]:
        """The clips' primary samples (each kept clip once, at its largest resolution and full length; no images)
        in index order, optionally of one split: what evaluation and preference pairs use."""
        rows = self.index if split is None else self.index[self.index["split"] == split]
        if "kind" in rows.columns:
            rows = rows[(rows["kind"] == "clip") & rows["top_resolution"].astype(bool)
                        & rows["full_length"].astype(bool)]
        return list(rows["clip_id"])

    def latent_shape(self, clip_id: str) -> Tuple[int, ...]:
        """[C, T, H, W] of a clip's latent, from the index."""
        return self._shape[clip_id]

    @property
    def vae_spatial_downsample(self) -> int:
        """Pixels per latent cell along H and W (meta.json's vae config)."""
        return _vae_spatial_downsample(self.meta, self.root / META)

    def _open(self, name: str) -> Any:
        from safetensors import safe_open

        if name not in self._handles:
            path = self.root / name
            if not path.is_file():
                raise FileNotFoundError(f"shard {path} listed in {INDEX} is missing")
            self._handles[name] = safe_open(str(path), framework="pt")
        return self._handles[name]

    def load(self, clip_id: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (latent_CTHW float32 normalised, text_LD float32, text_mask_L bool)."""
        if clip_id not in self._shard:
            raise KeyError(f"clip {clip_id!r} is not in {self.root / INDEX}")
        f = self._open(self._shard[clip_id])
        latent = f.get_tensor(f"{clip_id}/{LATENT}").float()
        if tuple(latent.shape) != self._shape[clip_id]:
            raise ValueError(f"{clip_id}: latent shape {tuple(latent.shape)} != index latent_shape "
                             f"{self._shape[clip_id]}")
        return latent, f.get_tensor(f"{clip_id}/{TEXT}").float(), f.get_tensor(f"{clip_id}/{TEXT_MASK}").bool()

    def null_text(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Encoding of "" -> (text_LD float32, mask_L bool)."""
        from safetensors.torch import load_file

        t = load_file(str(self.root / NULL_TEXT))
        return t[TEXT], t[TEXT_MASK].bool()

    def _stats(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (mean, std) of meta.json, shaped to broadcast over a latent [C,T,H,W] or [B,C,T,H,W]."""
        if "latent_mean" not in self.meta or "latent_std" not in self.meta:
            raise ValueError(f"{self.root / META} has no latent_mean/latent_std; rewrite it with the compress stage")
        mean = torch.tensor(self.meta["latent_mean"], dtype=torch.float32)
        std = torch.tensor(self.meta["latent_std"], dtype=torch.float32)
        c = mean.numel()
        if x.dim() not in (4, 5) or x.shape[-4] != c:
            raise ValueError(f"expected a latent [C, T, H, W] or [B, C, T, H, W] with C={c}, got {list(x.shape)}")
        shape = (c, 1, 1, 1)
        return mean.view(shape).to(x.device, x.dtype), std.view(shape).to(x.device, x.dtype)

    def denormalize(self, latent: torch.Tensor) -> torch.Tensor:
        """Stored (normalised) latent [C,T,H,W] or [B,C,T,H,W] -> raw z for ``VideoVAE.decode``."""
        mean, std = self._stats(latent)
        return latent * std + mean

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw VAE z [C,T,H,W] or [B,C,T,H,W] -> the normalised space the shards and the DiT use."""
        mean, std = self._stats(z)
        return (z - mean) / std

    def load_vae(self) -> Any:
        """The ``models.vae.VideoVAE`` that produced the latents (eval mode, CPU)."""
        from safetensors.torch import load_file

        from models.config import VAEConfig
        from models.vae import VideoVAE, load_vae_state

        cfg = VAEConfig(**json.loads((self.root / VAE_DIR / VAE_CONFIG).read_text()))
        return load_vae_state(VideoVAE(cfg), load_file(str(self.root / VAE_DIR / VAE_WEIGHTS))).eval()

    def load_text_encoder(self) -> Any:
        """The caption encoder (``models.text_encoder.TextEncoder``): the copied tiny one, or the referenced
        pretrained one (same max_length)."""
        from models.text_encoder import TextEncoder

        pretrained = self.meta["text_encoder"].get("pretrained", "")
        if pretrained:
            return TextEncoder.from_pretrained(pretrained, max_length=int(self.null_text()[1].numel()))
        return TextEncoder.load(self.root / TEXT_DIR)
