"""Flyte adapters for compression (logic in tasks/compress/: vae_fit.py, encode.py, latent_store.py).

    vae = fit_vae(cfg=cfg.compress, manifest=manifest, tracking_cfg=cfg.tracking, parent_run=run)
    latents = compress(cfg=cfg.compress, manifest=manifest, vae=vae, tracking_cfg=cfg.tracking, parent_run=run)

``fit_vae`` ignores the manifest in its cache key: the VAE is fitted once (on the clips of the first manifest it
sees) and reused by later runs with new clips until ``compress.vae_refit`` is raised; its folder
``<root>/artifacts/vae/<vae_key>`` is reused even without the Flyte cache. ``compress`` encodes with that VAE through
the latent store (``compress.store_uri``, default ``<root>/artifacts/compress/latent-store``): only clips it has not
encoded before with the same VAE, text encoder and settings are decoded and encoded.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

from flytekit import task

from common import tracking
from common.config import CompressConfig, TrackingConfig, config_hash, to_dict
from common.hashing import module_code_version, sha256_json
from tasks.common import artifact_dir, folder_ref, fresh_dir, local_path, mirror, publish
from tasks.resources import defaults
from tasks.types import ClipManifest, LatentDataset, VAEModel


def store_dir(cfg: CompressConfig, tracking_cfg: TrackingConfig) -> Path:
    """The latent store folder: ``compress.store_uri``, or ``<tracking.root>/artifacts/compress/latent-store``."""
    return Path(cfg.store_uri) if cfg.store_uri else artifact_dir(tracking_cfg, "compress", "latent-store")


@task(cache=True, cache_version=module_code_version("tasks.compress.task"),
      cache_ignore_input_vars=("manifest", "parent_run"),
      **defaults("fit_vae"))
def fit_vae(cfg: CompressConfig, manifest: ClipManifest, tracking_cfg: TrackingConfig, parent_run: str) -> VAEModel:
    """The video VAE as an artifact: fitted on the manifest's kept clips (or imported from ``vae_pretrained``) once,
    then reused: a new manifest does not refit it, a raised ``vae_refit`` does."""
    import mlflow

    from common.latents import VAE_CONFIG, VAE_WEIGHTS
    from tasks.compress.vae_fit import VAE_FIELDS, VAE_META, ensure_vae, vae_key

    out = artifact_dir(tracking_cfg, "vae", vae_key(cfg))
    with tracking.child_run(tracking_cfg.root, parent_run, "vae"):
        tracking.log_config("compress", {k: v for k, v in to_dict(cfg).items() if k in VAE_FIELDS})
        read: List[Path] = []   # the manifest folder, when the fit read its clips

        def manifest_dir() -> Path:
            read.append(local_path(manifest.folder))
            return read[-1]

        meta, reused = ensure_vae(cfg, out, manifest_dir, progress=lambda m: print(f"[fit_vae] {m}", flush=True),
                                  manifest_label=manifest.content_hash)
        if read:
            import pandas as pd

            tracking.log_dataset(pd.read_parquet(read[0] / "manifest.parquet"), source=str(read[0]),
                                 name="clip-manifest", digest=manifest.content_hash, context="vae-fit")
        for i, loss in enumerate(meta["loss_history"]):
            mlflow.log_metric("vae_loss", float(loss), step=i)
        mlflow.log_metrics({"vae_trained_steps": meta["trained_steps"], "fit_clips": meta["fit_clips"]})
        mlflow.set_tags({"vae.identity": meta["weights_sha256"][:16], "vae.source": meta["source"],
                         "vae.random_init": str(meta["random_init"]), "vae.reused": str(reused),
                         "vae.folder": str(out), "lineage.manifest_hash": meta["fit_manifest"]})
        mlflow.log_artifact(str(out / VAE_META), "vae")
        mlflow.log_artifact(str(out / VAE_CONFIG), "vae")
        if meta["source"] == "fit" and not reused:   # fitted now; imported and random weights are not copied
            mlflow.log_artifact(str(out / VAE_WEIGHTS), "vae")
    return VAEModel(folder=folder_ref(out), identity=meta["weights_sha256"][:16],
                    trained_steps=meta["trained_steps"], random_init=meta["random_init"], config=cfg,
                    fit_manifest_hash=meta["fit_manifest"])


@task(cache=True, cache_version=module_code_version("tasks.compress.task"),
      cache_ignore_input_vars=("parent_run",), **defaults("compress"))
def compress(cfg: CompressConfig, manifest: ClipManifest, tracking_cfg: TrackingConfig, parent_run: str,
             vae: Optional[VAEModel] = None) -> LatentDataset:
    """Encode kept clips with the VAE (``fit_vae``'s) and captions with the T5 encoder into latent shards, through
    the latent store: clips encoded by an earlier run with the same VAE, text encoder and settings are not encoded
    again. ``vae`` is optional only while workflows/pipeline.py does not pass it yet: without one the VAE is fitted
    here, on these clips (the old behaviour; a new clip then changes the VAE and nothing is reused)."""
    from common.latents import LatentReader
    from tasks.compress.encode import run_compress

    out = artifact_dir(tracking_cfg, "compress", sha256_json([config_hash(cfg), manifest.content_hash,
                                                              vae.identity if vae else "fitted-inline"], n=16))
    with tracking.child_run(tracking_cfg.root, parent_run, "compress") as _:
        import mlflow

        tracking.log_config("compress", to_dict(cfg))
        import pandas as pd

        manifest_dir = local_path(manifest.folder)
        tracking.log_dataset(pd.read_parquet(manifest_dir / "manifest.parquet"), source=str(manifest_dir),
                             name="clip-manifest", digest=manifest.content_hash, context="compression")
        tmp = fresh_dir(out)
        progress = lambda m: print(f"[compress] {m}", flush=True)   # noqa: E731
        if vae is None:
            progress("compress: no VAE given (fit_vae is not wired into this workflow): fitting one here")
        meta = run_compress(cfg, manifest_dir, tmp, progress=progress, store_dir=store_dir(cfg, tracking_cfg),
                            vae_dir=local_path(vae.folder) if vae else None)
        publish(tmp, out)
        mirror(tracking_cfg, out)   # the latents to tracking.artifact_uri, when set
        reader = LatentReader(out)
        n_train, n_val = len(reader.clip_ids("train")), len(reader.clip_ids("val"))
        vae_id = meta["vae"]["weights_sha256"][:16]
        text_id = meta["text_encoder"].get("weights_sha256", meta["text_encoder"].get("pretrained", ""))[:16]
        store = meta["latent_store"]
        mlflow.log_metrics({"num_train": n_train, "num_val": n_val, "vae_trained_steps": meta["vae"]["trained_steps"],
                            "latent_store_reused": store["reused"], "latent_store_encoded": store["encoded"]})
        if vae is None:   # the fit happened here: its loss curve belongs to this run
            for i, loss in enumerate(meta["vae"].get("loss_history", [])):
                mlflow.log_metric("vae_loss", float(loss), step=i)
        mlflow.set_tags({"lineage.content_hash": meta["content_hash"], "lineage.manifest_hash": manifest.content_hash,
                         "vae.identity": vae_id, "vae.random_init": str(meta["vae"]["random_init"]),
                         "text_encoder.identity": text_id, "latent_store": store["folder"]})
        mlflow.log_text(json.dumps(meta, indent=1, default=str), "latent_dataset_meta.json")
    return LatentDataset(folder=folder_ref(out), content_hash=meta["content_hash"],
                         manifest_hash=manifest.content_hash, vae_identity=vae_id, text_encoder_identity=text_id,
                         num_train=n_train, num_val=n_val, config=cfg)
