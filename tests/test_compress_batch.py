"""compress encodes samples of one shape B at a time (``compress.encode_batch_size``): the latents are bitwise the
ones of one-by-one encoding on CPU in float32, and so is the whole LatentDataset."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from test_compress import small_cfg, write_clip

from common.hashing import sha256_bytes
from models.config import VAEConfig
from models.vae import VideoVAE
from tasks.compress.clips import deterministic
from tasks.compress.encode import batch_is_exact, encode_batch, run_compress


@pytest.mark.parametrize("micro_batch_size", [0, 2])
def test_encode_batch_is_bitwise_one_by_one(micro_batch_size: int) -> None:
    torch.manual_seed(0)
    vae = VideoVAE(VAEConfig(micro_batch_size=micro_batch_size)).eval()
    cpu = torch.device("cpu")
    for frames in (1, 8, 9, 17) if micro_batch_size == 0 else (9, 12):
        xs = [torch.rand(3, frames, 16, 16) * 2 - 1 for _ in range(3)]
        with deterministic(), torch.no_grad():
            alone = [vae.encode(x[None]).mode()[0] for x in xs]
            batched = encode_batch(vae, xs, cpu)
            one_call = vae.encode(torch.stack(xs)).mode()
        assert all(torch.equal(a, b) for a, b in zip(alone, batched)), frames
        exact = batch_is_exact(vae.cfg, frames, len(xs))
        if exact:   # the rule batches only where one call gives the same bits
            assert torch.equal(torch.stack(alone), one_call), frames
        else:       # elsewhere a different CPU conv kernel rounds differently (see batch_is_exact)
            assert torch.allclose(torch.stack(alone), one_call, atol=1e-4), frames
    assert batch_is_exact(VAEConfig(), 17, 3) and batch_is_exact(VAEConfig(), 9, 8)
    assert not batch_is_exact(VAEConfig(), 1, 3) and not batch_is_exact(VAEConfig(micro_batch_size=4), 17, 3)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """2 clips of 17 frames (each full and as a smaller 9-frame variant) and a key frame: 5 samples."""
    root = tmp_path_factory.mktemp("batch-manifest")
    (root / "clips").mkdir()
    (root / "images").mkdir()
    variants = [["32px", 32, 32, 17], ["16px", 16, 16, 9]]
    rows = []
    for i in range(2):
        cid = sha256_bytes(f"clip{i}".encode(), n=16)
        write_clip(root / "clips" / f"{cid}.mp4", i, hw=32)
        rows.append(dict(clip_id=cid, source_hash=f"{i:016x}", status="kept", num_frames=17, height=32, width=32,
                         score=float(i), caption=f"clip number {i}", path=f"clips/{cid}.mp4", kind="clip",
                         parent_clip="", variants=json.dumps(variants)))
    img = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    cv2.imwrite(str(root / "images" / "k0.png"), img)
    rows.append(dict(clip_id="k0", source_hash="0" * 16, status="kept", num_frames=1, height=32, width=32, score=1.0,
                     caption="a key frame", path="images/k0.png", kind="keyframe", parent_clip=rows[0]["clip_id"],
                     variants=json.dumps([["32px", 32, 32, 1]])))
    pd.DataFrame(rows).to_parquet(root / "manifest.parquet", index=False)
    return root


def test_dataset_is_the_same_for_every_batch_size(manifest, tmp_path, monkeypatch) -> None:
    out, calls = {}, []
    real = VideoVAE.encode

    def counted(self, x):
        calls.append(len(x))
        return real(self, x)

    monkeypatch.setattr(VideoVAE, "encode", counted)
    for b in (1, 4):
        store = tmp_path / f"store{b}"
        calls.clear()
        meta = run_compress(small_cfg(vae_train_steps=0, encode_batch_size=b), manifest, tmp_path / f"o{b}",
                            progress=lambda m: None, store_dir=store)
        files = {p.relative_to(tmp_path / f"o{b}").as_posix(): p.read_bytes()
                 for p in sorted((tmp_path / f"o{b}").rglob("*")) if p.is_file() and p.name != "meta.json"}
        entries = {p.name: p.read_bytes() for p in sorted(store.rglob("*.safetensors"))}
        out[b] = (meta["content_hash"], files, entries, meta["buckets"])
        # 2 clip shapes x 2 clips: one call each at B=4; the key frame alone (batch_is_exact)
        assert sorted(calls) == ([1] * 5 if b == 1 else [1, 2, 2])
    assert out[1][3] == {"16pxx9": 2, "32pxx1": 1, "32pxx17": 2}
    assert out[1] == out[4]


def test_read_clip_is_pyav_rgb24(manifest) -> None:
    """read_clip's one converter per clip gives PyAV's own per-frame rgb24 conversion."""
    import av

    from tasks.compress.clips import read_clip

    path = next((manifest / "clips").glob("*.mp4"))
    with av.open(str(path)) as c:
        ref = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    x = read_clip(path, 17)
    assert torch.equal(x, torch.from_numpy(ref).permute(3, 0, 1, 2).float().div(127.5).sub(1.0))
