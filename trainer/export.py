"""Export one checkpoint step folder to a single safetensors file.

    python -m trainer.export runs/artifacts/train/<stage>/step_00000030 dit.safetensors --layout mugv
    python -m trainer.export <step_dir> dit_ema.safetensors --layout mugv --ema --y-embedding y_embedding.pt

The step folder's checksums are verified first. ``--layout mugv`` writes MUG-V's inference layout
(``models.convert.export_mugv_dit``: strict-loadable by ``mug_v.dit.MUGDiT``; the null caption is not part of it,
``--y-embedding`` saves it apart as MUG-V's ``fixtures/y_embedding.pt``); ``--layout ours`` writes our names
unchanged. The weights are stored unsharded whatever TP size trained them, so no resharding is needed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from trainer import checkpoint


def export(step_dir: str | Path, out: str | Path, layout: str = "mugv", ema: bool = False,
           y_embedding: str | Path | None = None) -> Path:
    """Write ``out`` from ``step_dir`` (see the module docstring); returns the path written."""
    from models.convert import Y_EMBEDDING, export_mugv_dit, save_safetensors_export

    if layout not in ("mugv", "ours"):
        raise ValueError(f"layout must be 'mugv' or 'ours', got {layout!r}")
    meta = checkpoint.verify(step_dir)
    sd = checkpoint.load_weights(step_dir, ema=ema)
    exported = export_mugv_dit(sd) if layout == "mugv" else sd
    save_safetensors_export(out, exported, metadata={
        "layout": layout, "weights": "ema" if ema else "model", "stage": str(meta.get("stage", "")),
        "step": str(meta.get("step", "")), "config_hash": str(meta.get("config_hash", ""))})
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
    args = parser.parse_args(argv)
    try:
        path = export(args.step_dir, args.out, args.layout, args.ema, args.y_embedding or None)
    except (ValueError, checkpoint.CheckpointError) as e:
        print(f"trainer.export: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
