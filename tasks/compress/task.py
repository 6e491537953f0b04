"""Flyte adapter for compression: ClipManifest -> LatentDataset (logic in tasks/compress/encode.py)."""
from __future__ import annotations

import json

from flytekit import Resources, task

from common import tracking
from common.config import CompressConfig, TrackingConfig, config_hash, to_dict
from common.hashing import module_code_version, sha256_json
from containers.images import cpu_image
from tasks.common import artifact_dir, fresh_dir, local_path, publish
from tasks.types import ClipManifest, FlyteDirectory, LatentDataset


@task(cache=True, cache_version=module_code_version("tasks.compress.task"),
      cache_ignore_input_vars=("parent_run",), container_image=cpu_image, requests=Resources(cpu="2", mem="8Gi"))
def compress(cfg: CompressConfig, manifest: ClipManifest, tracking_cfg: TrackingConfig,
             parent_run: str) -> LatentDataset:
    """Encode kept clips with the video VAE and captions with the T5 encoder into latent shards."""
    from common.latents import LatentReader
    from tasks.compress.encode import run_compress

    out = artifact_dir(tracking_cfg, "compress", sha256_json([config_hash(cfg), manifest.content_hash], n=16))
    with tracking.child_run(tracking_cfg.root, parent_run, "compress") as _:
        import mlflow

        tracking.log_config("compress", to_dict(cfg))
        import pandas as pd

        manifest_dir = local_path(manifest.folder)
        tracking.log_dataset(pd.read_parquet(manifest_dir / "manifest.parquet"), source=str(manifest_dir),
                             name="clip-manifest", digest=manifest.content_hash, context="compression")
        tmp = fresh_dir(out)
        meta = run_compress(cfg, local_path(manifest.folder), tmp,
                            progress=lambda m: print(f"[compress] {m}", flush=True))
        publish(tmp, out)
        reader = LatentReader(out)
        n_train, n_val = len(reader.clip_ids("train")), len(reader.clip_ids("val"))
        vae_id = meta["vae"]["weights_sha256"][:16]
        text_id = meta["text_encoder"].get("weights_sha256", meta["text_encoder"].get("pretrained", ""))[:16]
        mlflow.log_metrics({"num_train": n_train, "num_val": n_val, "vae_trained_steps": meta["vae"]["trained_steps"]})
        for i, loss in enumerate(meta["vae"].get("loss_history", [])):
            mlflow.log_metric("vae_loss", float(loss), step=i)
        mlflow.set_tags({"lineage.content_hash": meta["content_hash"], "lineage.manifest_hash": manifest.content_hash,
                         "vae.identity": vae_id, "vae.random_init": str(meta["vae"]["random_init"]),
                         "text_encoder.identity": text_id})
        mlflow.log_text(json.dumps(meta, indent=1, default=str), "latent_dataset_meta.json")
    return LatentDataset(folder=FlyteDirectory(str(out)), content_hash=meta["content_hash"],
                         manifest_hash=manifest.content_hash, vae_identity=vae_id, text_encoder_identity=text_id,
                         num_train=n_train, num_val=n_val, config=cfg)
