"""Compress stage end to end on a tiny ClipManifest folder, rerun determinism, and the LatentReader."""
import dataclasses
import json

import av
import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from common.config import CompressConfig, TextEncoderConfig
from common.hashing import sha256_bytes
from common.latents import LatentReader
from tasks.compress.encode import read_clip, run_compress, split_clips

CAPTIONS = ["a red square moving right", "a blue ball bouncing", "slow pan over green hills"]
INDEX_COLS = ["clip_id", "shard", "split", "latent_shape", "text_len", "caption", "score", "bucket", "source_hash",
              "aesthetic", "motion", "sharpness", "source_clip", "resolution", "num_frames", "height", "width", "kind",
              "top_resolution", "full_length"]


def write_clip(path, seed, frames=17, hw=64):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=(3,), dtype=np.uint8)
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=8)
        s.width = s.height = hw
        s.pix_fmt = "yuv420p"
        for t in range(frames):
            img = np.empty((hw, hw, 3), np.uint8)
            img[:] = base
            x0 = (4 * t + 8 * seed) % (hw - 16)
            img[20:36, x0:x0 + 16] = 255 - base
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("manifest")
    (root / "clips").mkdir()
    rows = []
    for i, cap in enumerate(CAPTIONS):
        cid = sha256_bytes(f"clip{i}".encode(), n=16)
        write_clip(root / "clips" / f"{cid}.mp4", i)
        rows.append(dict(clip_id=cid, source_uri=f"data/v{i}.mp4", source_hash=f"{i:016x}", status="kept", reason="",
                         start_frame=0, end_frame=17, fps=8.0, src_height=64, src_width=64, height=64, width=64,
                         num_frames=17, duration_s=17 / 8, scene_index=0, sharpness=500.0, brightness=0.5,
                         score=float(i), caption=cap, bucket="64x64x17", path=f"clips/{cid}.mp4"))
    rows.append(dict(rows[0], clip_id="rejected0000000", status="rejected", reason="sharpness", path=""))
    rows.append(dict(clip_id="", source_uri="data/bad.mp4", source_hash="f" * 16, status="failed", reason="decode",
                     path=""))
    pd.DataFrame(rows).to_parquet(root / "manifest.parquet", index=False)
    (root / "summary.json").write_text(json.dumps({"inputs": 4, "kept": 3, "rejected": 1, "failed": 1}))
    return root


def small_cfg(**kw):
    text = TextEncoderConfig(d_model=32, num_layers=1, num_heads=2, d_ff=64, max_length=16)
    return CompressConfig(**{**dict(vae_train_steps=3, text=text, shard_size=2), **kw})


@pytest.fixture(scope="module")
def first(manifest, tmp_path_factory):
    out = tmp_path_factory.mktemp("latents") / "a"
    logs = []
    return out, run_compress(small_cfg(), manifest, out, progress=logs.append), logs


def test_layout_index_and_meta(first):
    out, meta, logs = first
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"index.parquet", "meta.json", "null_text.safetensors", "shard-00000.safetensors",
            "shard-00001.safetensors", "vae/vae.safetensors", "vae/config.json",
            "text_encoder/config.json", "text_encoder/model.safetensors"} <= names
    assert any("vae step 3/3" in m for m in logs)
    idx = pd.read_parquet(out / "index.parquet")
    assert list(idx.columns) == INDEX_COLS and len(idx) == 3
    assert list(idx["shard"]) == ["shard-00000.safetensors"] * 2 + ["shard-00001.safetensors"]
    assert all(list(s) == [24, 3, 8, 8] for s in idx["latent_shape"])
    assert set(idx["split"]) == {"train", "val"} and sorted(idx["caption"]) == sorted(CAPTIONS)
    assert list(idx["text_len"]) == [min(len(c.encode()) + 1, 16) for c in idx["caption"]]
    assert meta == json.loads((out / "meta.json").read_text())
    assert set(meta) == {"vae", "text_encoder", "latent_mean", "latent_std", "clip_manifest_hash", "content_hash",
                         "buckets"}
    assert meta["vae"]["trained_steps"] == 3 and meta["vae"]["random_init"] is False
    assert len(meta["vae"]["loss_history"]) == 3 and all(np.isfinite(meta["vae"]["loss_history"]))
    assert meta["vae"]["config"]["latent_channels"] == 24 and len(meta["latent_mean"]) == 24
    assert meta["text_encoder"]["pretrained"] == "" and meta["text_encoder"]["config"]["d_model"] == 32
    shard = load_file(str(out / "shard-00000.safetensors"))
    cid = idx["clip_id"][0]
    assert shard[f"{cid}/latent"].dtype == torch.float32 and shard[f"{cid}/text"].shape == (16, 32)
    assert shard[f"{cid}/text_mask"].dtype == torch.uint8
    null = load_file(str(out / "null_text.safetensors"))
    assert null["text"].shape == (16, 32) and int(null["text_mask"].sum()) == 1


def test_latents_normalised_on_train_split(first):
    out, meta, _ = first
    r = LatentReader(out)
    z = torch.cat([r.load(c)[0].flatten(1) for c in r.clip_ids("train")], dim=1)
    torch.testing.assert_close(z.mean(1), torch.zeros(24), rtol=0, atol=1e-4)
    torch.testing.assert_close(z.std(1, unbiased=False), torch.ones(24), rtol=0, atol=1e-4)


def test_rerun_gives_same_content_hash(first, manifest, tmp_path):
    out, meta, _ = first
    meta2 = run_compress(small_cfg(), manifest, tmp_path / "b", progress=lambda m: None)
    assert meta2["content_hash"] == meta["content_hash"]
    for p in out.rglob("*"):
        if p.is_file():
            assert p.read_bytes() == (tmp_path / "b" / p.relative_to(out)).read_bytes(), p
    with pytest.raises(ValueError, match="not empty"):
        run_compress(small_cfg(), manifest, tmp_path / "b", progress=lambda m: None)


def test_reader_round_trip(first, manifest):
    out, meta, _ = first
    r = LatentReader(out)
    assert len(r) == 3 and r.meta["content_hash"] == meta["content_hash"]
    row = r.index.iloc[0]
    latent, text, mask = r.load(row["clip_id"])
    assert latent.shape == (24, 3, 8, 8) and text.shape == (16, 32) and mask.dtype == torch.bool
    assert int(mask.sum()) == row["text_len"]
    vae = r.load_vae()
    src = pd.read_parquet(manifest / "manifest.parquet").set_index("clip_id").loc[row["clip_id"]]
    with torch.no_grad():
        z = vae.encode(read_clip(manifest / src["path"], 17)[None]).mode()[0]
        torch.testing.assert_close(r.normalize(z), latent, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(r.denormalize(latent), z, rtol=1e-4, atol=1e-4)
        assert vae.decode(r.denormalize(latent)[None], 17).shape == (1, 3, 17, 64, 64)
    te = r.load_text_encoder()
    feats, m = te.encode([row["caption"]])
    torch.testing.assert_close(feats[0], text, rtol=0, atol=1e-5)
    null_text, null_mask = r.null_text()
    torch.testing.assert_close(te.encode([""])[0][0], null_text, rtol=0, atol=1e-5)
    assert null_mask.sum() == 1
    with pytest.raises(KeyError):
        r.load("nope")


def test_pretrained_and_random_init(first, manifest, tmp_path):
    out, meta, _ = first
    cfg = small_cfg(vae_pretrained=str(out / "vae" / "vae.safetensors"), holdout_fraction=0.0)
    m = run_compress(cfg, manifest, tmp_path / "p", progress=lambda s: None)
    assert m["vae"]["weights_sha256"] == meta["vae"]["weights_sha256"]
    assert m["vae"]["trained_steps"] == 0 and m["vae"]["random_init"] is False
    assert set(pd.read_parquet(tmp_path / "p" / "index.parquet")["split"]) == {"train"}
    m0 = run_compress(small_cfg(vae_train_steps=0), manifest, tmp_path / "r", progress=lambda s: None)
    assert m0["vae"]["random_init"] is True and m0["vae"]["weights_sha256"] != meta["vae"]["weights_sha256"]


def test_split_rules():
    ids = [f"{i:016x}" for i in range(200)]
    s = split_clips(ids, 0.25)
    assert s == split_clips(list(reversed(ids)), 0.25)
    assert 25 < sum(v == "val" for v in s.values()) < 75
    assert split_clips(["a"], 0.5) == {"a": "train"}
    assert sorted(split_clips(["a", "b"], 0.01).values()) == ["train", "val"]
    assert sorted(split_clips(["a", "b"], 0.99).values()) == ["train", "val"]
    assert set(split_clips(ids[:5], 0.0).values()) == {"train"}


def test_errors(manifest, tmp_path):
    empty = tmp_path / "m"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="manifest.parquet"):
        run_compress(small_cfg(), empty, tmp_path / "o", progress=lambda s: None)
    df = pd.read_parquet(manifest / "manifest.parquet")
    df[df["status"] != "kept"].to_parquet(empty / "manifest.parquet", index=False)
    with pytest.raises(ValueError, match="no clips"):
        run_compress(small_cfg(), empty, tmp_path / "o", progress=lambda s: None)
    assert dataclasses.asdict(small_cfg())["vae_train_steps"] == 3
