"""The latent store of compression: content-addressed RAW latents and caption features, so a rerun encodes only the
clips it has not encoded before (docs/artifacts.md, "Latent store").

One entry per clip, keyed by everything that changes its bytes:

    key = sha256(clip_id, clip file sha256, caption, frames encoded, VAE identity, text-encoder identity,
                 encoding settings[, size H x W when resized to a lower resolution])[:32]

clip_id is already a content hash of the clip's pixels (curation) and the file's hash pins the exact bytes decoded
(compression hashes every clip file anyway, for the manifest hash); the VAE identity is its weights' sha256 and a
hash of its config; the text encoder's is its weights' sha256, max_length and tokenizer; the settings are the
posterior statistic (mode), the dtype and the device kind (CPU and GPU kernels give different bits). Layout:

    <store>/<key[:2]>/<key>.safetensors   "latent" float32 [C,T,H,W] raw (unnormalised) posterior mode,
                                          "text" float32 [L,D], "text_mask" uint8 [L]; metadata "entry":
                                          JSON {"key", "clip_id", "file_sha256", "caption",
                                          "num_frames"}
    <store>/last_identities.json          the identities of the last run that used the store, so the next run can
                                          say why nothing is reused (a new VAE, text encoder or setting)

Entries are written to a temporary file of their folder and renamed (complete or absent); a killed run leaves at
most ``.tmp-*`` files, which are never read. Entries are never deleted by the pipeline.

    store = LatentStore(folder)
    idents = identities(vae_sha256, vae_config, text_encoder, device)
    key = entry_key(clip_id, file_sha256, caption, num_frames, idents)
    entry = store.get(key)                     # (latent, text, mask) or None
    store.put(key, latent, text, mask, {"clip_id": clip_id})
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from common.hashing import sha256_bytes, sha256_json

LAST_IDENTITIES = "last_identities.json"
LATENT, TEXT, TEXT_MASK = "latent", "text", "text_mask"
PARTS = (("vae", "VAE identity"), ("text_encoder", "text encoder identity"), ("settings", "encoding settings"))
POSTERIOR = "mode"   # what is stored of the VAE posterior (MUG-V encodes with the mode as well)

Entry = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]   # latent_CTHW float32 raw, text_LD float32, mask_L bool


def tokenizer_sha256(tokenizer: Any) -> str:
    """sha256[:16] of a fast tokenizer's serialised form ("" when it has none)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return sha256_bytes(backend.to_str().encode(), n=16) if backend is not None else ""


def identities(vae_sha256: str, vae_config: Dict[str, Any], text_encoder: Any, device: torch.device,
               dtype: torch.dtype = torch.float32, text_identity: Optional[Dict[str, Any]] = None
               ) -> Dict[str, Dict[str, Any]]:
    """What every entry of a run shares: {"vae", "text_encoder", "settings"} (JSON, written to
    last_identities.json). ``text_encoder`` is a ``models.text_encoder.TextEncoder``; ``text_identity`` its
    ``identity()`` when already computed (it hashes every weight)."""
    ident = text_identity or text_encoder.identity()
    return {"vae": {"weights_sha256": vae_sha256, "config_sha256": sha256_json(vae_config, n=16)},
            "text_encoder": {"weights_sha256": ident["weights_sha256"], "max_length": int(text_encoder.max_length),
                             "tokenizer_sha256": tokenizer_sha256(text_encoder.tokenizer)},
            "settings": {"posterior": POSTERIOR, "dtype": str(dtype).removeprefix("torch."), "device": device.type}}


def entry_key(clip_id: str, file_sha256: str, caption: str, num_frames: int, idents: Dict[str, Any],
              size: Optional[Tuple[int, int]] = None) -> str:
    """The store key of one sample (32 hex digits); ``file_sha256``: the clip file's bytes (the clip id hashes the
    source pixels; the file is their H.264 encoding, which another cut of the same clip may not repeat bitwise);
    ``num_frames``: the frames encoded; ``size``: (H, W) when the sample is the file resized to a lower resolution
    (None: the file's own size, so a clip's key is the same as before samples had several resolutions)."""
    parts: List[Any] = [clip_id, file_sha256, caption, int(num_frames), idents]
    return sha256_json(parts + [list(size)] if size is not None else parts, n=32)


def _short(v: Any) -> str:
    return v[:12] if isinstance(v, str) and len(v) >= 16 else str(v)


def describe_change(before: Dict[str, Any], after: Dict[str, Any]) -> str:
    """"abc123 -> def456" for a changed weights hash, "max_length 16 -> 32, ..." for other fields."""
    parts = []
    for k in sorted(set(before) | set(after)):
        a, b = before.get(k), after.get(k)
        if a != b:
            parts.append(("" if k == "weights_sha256" else f"{k} ") + f"{_short(a)} -> {_short(b)}")
    return ", ".join(parts)


def identity_changes(previous: Optional[Dict[str, Any]], current: Dict[str, Any]) -> List[str]:
    """What changed since the store's last run: ["VAE identity changed (abc -> def)", ...]; [] for a new store."""
    if not previous:
        return []
    return [f"{label} changed ({describe_change(previous.get(part) or {}, current[part])})"
            for part, label in PARTS if previous.get(part) != current[part]]


class LatentStore:
    """One store folder: ``get``/``put`` entries by key, ``last_identities``/``remember`` the run's identities."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        return self.path(key).is_file()

    def get(self, key: str) -> Optional[Entry]:
        """(latent, text, mask) of the entry, or None when absent or unreadable (then it is written again)."""
        from safetensors.torch import load_file

        path = self.path(key)
        if not path.is_file():
            return None
        try:
            t = load_file(str(path))
            return t[LATENT], t[TEXT], t[TEXT_MASK].bool()
        except Exception:   # a damaged file (disk, hand edit): a miss, replaced by put
            return None

    def put(self, key: str, latent_CTHW: torch.Tensor, text_LD: torch.Tensor, text_mask_L: torch.Tensor,
            metadata: Optional[Dict[str, str]] = None) -> Path:
        """Write the entry: a temporary file in its folder, renamed to ``<key>.safetensors`` when complete.
        ``metadata`` goes into the file's header as one JSON string (one key: safetensors orders several at random,
        so the same entry is the same bytes)."""
        from safetensors.torch import save_file

        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{key}-", suffix=".safetensors", dir=path.parent)
        os.close(fd)
        try:
            save_file({LATENT: latent_CTHW.detach().cpu().float().contiguous(),
                       TEXT: text_LD.detach().cpu().float().contiguous(),
                       TEXT_MASK: text_mask_L.detach().cpu().to(torch.uint8).contiguous()}, tmp,
                      metadata={"entry": json.dumps({"key": key, **(metadata or {})}, sort_keys=True)})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    def last_identities(self) -> Optional[Dict[str, Any]]:
        path = self.root / LAST_IDENTITIES
        return json.loads(path.read_text()) if path.is_file() else None

    def remember(self, idents: Dict[str, Any]) -> None:
        """Record the identities this run used (temporary file + rename)."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-last-", suffix=".json", dir=self.root)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(idents, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, self.root / LAST_IDENTITIES)
