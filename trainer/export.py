"""Export one checkpoint step folder to a single safetensors file.

    python -m trainer.export runs/artifacts/train/<stage>/step_00000030 dit.safetensors --layout mugv
    python -m trainer.export <step_dir> dit_ema.safetensors --layout mugv --ema --y-embedding y_embedding.pt
    python -m trainer.export <step_dir> model.safetensors --layout ours --source dist

The step folder's checksums are verified first. ``--layout mugv`` writes MUG-V's inference layout
(``models.convert.export_mugv_dit``: strict-loadable by ``mug_v.dit.MUGDiT``; the null caption is not part of it,
``--y-embedding`` saves it apart as MUG-V's ``fixtures/y_embedding.pt``); ``--layout ours`` writes our names
unchanged.

``--source``: "full" reads the folder's unsharded ``model.safetensors``/``ema.safetensors`` (stored unsharded
whatever TP size trained them); "dist" reads the megatron ``dist_checkpointing`` folder ``dist/`` of a
``checkpoint_format: dist`` stage offline, in this one process: the model is described from meta.json's DiT config
on the meta device (shapes only: no model is built), every tensor is requested whole (TP=1, resharded from whatever
TP/CP size wrote it, by ``trainer.parallel.state_dict.dist_sharded_state_dict``'s layout) and loaded with
``dist_checkpointing.load``; "auto" (default) takes the full file when the folder has it, else ``dist/`` (the
checkpoints before the last step of a stage with ``full_weights: final``). Both sources give the same tensors
bitwise (tests/test_trainer_ckpt_cp.py). ``dist_checkpointing`` loads in place into the one set of full tensors;
``models.convert.save_safetensors_export`` copies them once more, so the peak is about twice the fp32 weights
(~86 GB at 10B), as for the "full" source.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch

from trainer import checkpoint


def load_dist_weights(step_dir: str | Path, ema: bool = False) -> Dict[str, torch.Tensor]:
    """The full (TP=1) fp32 model or EMA state dict stored in ``step_dir/dist/``, read by this one process."""
    import torch.distributed as dist

    from common.config import from_dict
    from models.config import DiTConfig
    from models.dit import MUGDiT
    from trainer import device
    from trainer.parallel import ParallelPlan
    from trainer.parallel.state_dict import dist_sharded_state_dict

    meta = checkpoint.read_meta(step_dir)
    if not checkpoint.has_dist(step_dir):
        raise checkpoint.CheckpointError(f"checkpoint {step_dir} has no dist/ (was it saved with checkpoint_format "
                                         "'full'? then export its model.safetensors with --source full)")
    if "dit" not in meta:
        raise checkpoint.CheckpointError(f"checkpoint {step_dir}: meta.json has no 'dit' config to describe the model")
    with torch.device("meta"):
        dit = {k: v for k, v in meta["dit"].items() if k != "qk_norm"}   # a key older checkpoints wrote; never read
        shapes = MUGDiT(from_dict(DiTConfig, dit)).state_dict()
    local = {k: torch.empty(v.shape, dtype=v.dtype) for k, v in shapes.items()}
    device.resolve_runtime(heavy_shim=True)   # CPU: megatron's dist_checkpointing needs the shim (GPU: nothing)
    own_group = not dist.is_initialized()
    if own_group:   # dist_checkpointing runs collectives: a one-process gloo group, no network
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        prefix = "ema." if ema else "model."
        request = {"w": dist_sharded_state_dict(ParallelPlan.single(), local, prefix)}
        loaded = checkpoint.load_dist(step_dir, request)["w"]
    finally:
        if own_group:
            dist.destroy_process_group()
    return {k: loaded[k].reshape(t.shape) for k, t in local.items()}


def export(step_dir: str | Path, out: str | Path, layout: str = "mugv", ema: bool = False,
           y_embedding: str | Path | None = None, source: str = "auto") -> Path:
    """Write ``out`` from ``step_dir`` (see the module docstring); returns the path written."""
    from models.convert import Y_EMBEDDING, export_mugv_dit, save_safetensors_export

    if layout not in ("mugv", "ours"):
        raise ValueError(f"layout must be 'mugv' or 'ours', got {layout!r}")
    if source not in ("auto", "full", "dist"):
        raise ValueError(f"source must be 'auto', 'full' or 'dist', got {source!r}")
    meta = checkpoint.verify(step_dir)
    if source == "auto":
        source = "full" if checkpoint.has_full_weights(step_dir, ema) or not checkpoint.has_dist(step_dir) else "dist"
    sd = load_dist_weights(step_dir, ema) if source == "dist" else checkpoint.load_weights(step_dir, ema=ema)
    exported = export_mugv_dit(sd) if layout == "mugv" else sd
    save_safetensors_export(out, exported, metadata={
        "layout": layout, "weights": "ema" if ema else "model", "source": source,
        "stage": str(meta.get("stage", "")), "step": str(meta.get("step", "")),
        "config_hash": str(meta.get("config_hash", ""))})
    if y_embedding:
        Path(y_embedding).parent.mkdir(parents=True, exist_ok=True)
        torch.save(sd[Y_EMBEDDING].clone(), str(y_embedding))
    return Path(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("step_dir", help="a step_XXXXXXXX folder of a training stage")
    parser.add_argument("out", help="the .safetensors file to write")
    parser.add_argument("--layout", choices=("mugv", "ours"), default="mugv")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights instead of the model weights")
    parser.add_argument("--y-embedding", default="", help="also save the null caption here (.pt, mugv layout)")
    parser.add_argument("--source", choices=("auto", "full", "dist"), default="auto",
                        help="read model/ema.safetensors ('full') or the sharded dist/ folder ('dist'); 'auto': "
                             "the full file when the folder has it")
    args = parser.parse_args(argv)
    try:
        path = export(args.step_dir, args.out, args.layout, args.ema, args.y_embedding or None, args.source)
    except (ValueError, checkpoint.CheckpointError) as e:
        print(f"trainer.export: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
