"""Weekly retraining cost: curate + compress of a run with ~10% new videos vs the first run, and an identical rerun.

    .venv/bin/python bench/incremental.py                 # 10 synthetic videos, then 1 more; ~1 min on 2 cores
    .venv/bin/python bench/incremental.py --videos 20     # more inputs: the ratio approaches new/total
    .venv/bin/python bench/incremental.py --rerun         # also time an identical rerun of the whole tiny workflow

Run 1 curates ``--videos`` synthetic 320x240 videos into an empty per-input store and compresses their clips into an
empty latent store (with the VAE fitted once, as the ``fit_vae`` task does); run 2 adds ``max(1, videos // 10)``
new videos and does both again with the same stores: it decodes and encodes only the new inputs and clips. Prints
``incremental_ratio X`` (run 2's curate + compress time / run 1's, the one-time VAE fit left out, as the workflow's
``fit_vae`` task is; target <= 0.3) and, with ``--rerun``, ``rerun_s X``
(`pyflyte run` of the tiny workflow a second time, every task a cache hit; target < 10 s). Writes
bench/results/incremental_cpu.json. Check the machine's load first (it is printed): a busy machine lies.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from common.config import CaptionConfig, CompressConfig, CurateConfig  # noqa: E402
from tasks.compress.encode import run_compress  # noqa: E402
from tasks.compress.vae_fit import ensure_vae  # noqa: E402
from tasks.curate.driver import run_curation  # noqa: E402
from tasks.curate.synthetic import SceneSpec, make_scenes_video  # noqa: E402


def make_video(path: Path, i: int) -> None:
    kinds = ["texture", "shaky", "texture", "flat"]
    make_scenes_video(path, [SceneSpec(kinds[(i + j) % 4], 40, seed=100 + 7 * i + j) for j in range(2)],
                      width=320, height=240, fps=24)


def one_run(folder: Path, work: Path, tag: str, stores: Path) -> dict:
    """Curate ``folder`` and compress its clips with the shared stores; (seconds, counts)."""
    curate_cfg = CurateConfig(input_uri=str(folder), motion_min=0.02, motion_height=96,
                              caption=CaptionConfig(backend="sidecar"))
    compress_cfg = CompressConfig()
    t0 = time.perf_counter()
    summary = run_curation(curate_cfg, work / f"manifest-{tag}", store_dir=stores / "curate", progress=lambda m: None)
    t1 = time.perf_counter()
    ensure_vae(compress_cfg, stores / "vae", work / f"manifest-{tag}", progress=lambda m: None)   # fitted once
    tv = time.perf_counter()
    meta = run_compress(compress_cfg, work / f"manifest-{tag}", work / f"latents-{tag}", progress=lambda m: None,
                        store_dir=stores / "latents", vae_dir=stores / "vae")
    t2 = time.perf_counter()
    return {"curate_s": t1 - t0, "vae_fit_s": tv - t1, "compress_s": t2 - tv, "inputs": summary["inputs"],
            "processed": summary["processed"], "reused": summary["reused"], "clips": summary["clips_kept"],
            "latent_store": meta.get("latent_store", {})}


def rerun_seconds(tmp: Path) -> float:
    """Seconds of a second, identical `pyflyte run` of the tiny workflow (the first fills the caches)."""
    import yaml

    cfg = yaml.safe_load((REPO / "configs/tiny.yaml").read_text())
    cfg["tracking"]["root"] = str(tmp / "runs")
    cfg["curate"]["input_uri"] = str(REPO / "data/demo")
    config = tmp / "tiny.yaml"
    config.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "HOME": str(tmp / "home"), "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [str(Path(sys.executable).parent / "pyflyte"), "run", "workflows/pipeline.py", "train_video_model",
           "--config", str(config)]
    seconds = []
    for _ in range(2):
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, timeout=1800)
        seconds.append(time.perf_counter() - t0)
    return seconds[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=10, help="inputs of run 1; run 2 adds max(1, videos // 10)")
    ap.add_argument("--rerun", action="store_true", help="also time an identical rerun of the tiny workflow")
    args = ap.parse_args()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-incremental-") as tmp_name:
        tmp = Path(tmp_name)
        folder, stores = tmp / "videos", tmp / "stores"
        folder.mkdir()
        for i in range(args.videos):
            make_video(folder / f"v{i:03d}.mp4", i)
        run1 = one_run(folder, tmp, "1", stores)
        new = max(1, args.videos // 10)
        for i in range(args.videos, args.videos + new):
            make_video(folder / f"v{i:03d}.mp4", i)
        run2 = one_run(folder, tmp, "2", stores)
        result = {"videos": args.videos, "new_videos": new, "run1": run1, "run2": run2,
                  "incremental_ratio": (run2["curate_s"] + run2["compress_s"])
                  / (run1["curate_s"] + run1["compress_s"]),   # the one-time VAE fit (fit_vae) left out
                  "incremental_ratio_with_vae_fit": sum(run2[k] for k in ("curate_s", "vae_fit_s", "compress_s"))
                  / sum(run1[k] for k in ("curate_s", "vae_fit_s", "compress_s")),
                  "load_avg_before": load, "load_avg_after": os.getloadavg()[0], "cpus": os.cpu_count()}
        if args.rerun:
            result["rerun_s"] = rerun_seconds(tmp)
    print(json.dumps(result, indent=1))
    out = Path(__file__).resolve().parent / "results" / "incremental_cpu.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"incremental_ratio {result['incremental_ratio']:.3f}")
    if "rerun_s" in result:
        print(f"rerun_s {result['rerun_s']:.1f}")


if __name__ == "__main__":
    main()
