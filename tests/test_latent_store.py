"""Incremental compression: the latent store (only new clips are encoded; a warm store gives the cold run's dataset,
file for file), identity changes that re-encode and say why, the VAE folder fitted once and reused, and the Flyte
tasks fit_vae -> compress (cache, refit, MLflow child runs)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from flytekit import workflow
from test_compress import write_clip

import tasks.compress.encode as encode_mod
from common import tracking
from common.config import CompressConfig, TextEncoderConfig, TrackingConfig, to_dict
from common.hashing import sha256_bytes
from tasks.compress.encode import run_compress
from tasks.compress.latent_store import LAST_IDENTITIES, LatentStore, identity_changes
from tasks.compress.task import compress, fit_vae
from tasks.compress.vae_fit import ensure_vae, load_vae_dir, read_vae_meta, vae_key
from tasks.types import ClipManifest, FlyteDirectory, LatentDataset, VAEModel

CAPTIONS = ["a red square moving right", "a blue ball bouncing", "slow pan over green hills", "a new clip: waves"]
FRAMES, HW = 9, 32   # 9 frames of 32x32: latents [24, 2, 4, 4]


def cfg(**kw) -> CompressConfig:
    text = kw.pop("text", TextEncoderConfig(d_model=32, num_layers=1, num_heads=2, d_ff=64, max_length=16))
    return CompressConfig(**{**dict(vae_train_steps=1, text=text, shard_size=2), **kw})


def make_manifest(root: Path, clips: list[int], pool: Path) -> Path:
    """A ClipManifest folder with the kept clips ``clips``: clip i has the same id in every manifest and its file is
    copied from ``pool`` (written once: x264 under load does not always repeat its bytes, as curation's per-input
    store does not re-cut a clip either)."""
    (root / "clips").mkdir(parents=True)
    rows = []
    for i in clips:
        cid = sha256_bytes(f"clip{i}".encode(), n=16)
        if not (pool / f"{i}.mp4").is_file():
            pool.mkdir(exist_ok=True)
            write_clip(pool / f"{i}.mp4", i, frames=FRAMES, hw=HW)
        shutil.copy(pool / f"{i}.mp4", root / "clips" / f"{cid}.mp4")
        rows.append(dict(clip_id=cid, source_hash=f"{i:016x}", status="kept", num_frames=FRAMES, score=float(i),
                         caption=CAPTIONS[i], bucket=f"{HW}x{HW}x{FRAMES}", path=f"clips/{cid}.mp4"))
    pd.DataFrame(rows).to_parquet(root / "manifest.parquet", index=False)
    return root


def files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def store_entries(store: Path) -> dict[str, bytes]:
    return {k: v for k, v in files(store).items() if k.endswith(".safetensors")}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("incremental")
    a, b = make_manifest(root / "a", [0, 1, 2], root / "pool"), make_manifest(root / "b", [0, 1, 2, 3], root / "pool")
    logs: list[str] = []
    meta, reused = ensure_vae(cfg(), root / "vae", a, progress=logs.append)
    assert not reused and meta["trained_steps"] == 1 and any("vae step 1/1" in m for m in logs)
    return root, a, b, root / "vae"


@pytest.fixture(scope="module")
def runs(data):
    """run 1: manifest A (3 clips) into an empty store; run 2: manifest B (A + 1 clip) from the warm store, counting
    the clips it decodes."""
    root, a, b, vae = data
    store = root / "store"
    logs1: list[str] = []
    m1 = run_compress(cfg(), a, root / "out1", logs1.append, store_dir=store, vae_dir=vae)
    after1 = store_entries(store)
    logs2: list[str] = []
    read: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        real = encode_mod.read_clip
        mp.setattr(encode_mod, "read_clip", lambda p, n: read.append(Path(p).name) or real(p, n))
        m2 = run_compress(cfg(), b, root / "out2", logs2.append, store_dir=store, vae_dir=vae)
    return dict(m1=m1, m2=m2, logs1=logs1, logs2=logs2, read=read, after1=after1, after2=store_entries(store))


def test_second_run_encodes_only_the_new_clip(data, runs):
    root, a, b, vae = data
    assert runs["m1"]["latent_store"]["reused"] == 0 and runs["m1"]["latent_store"]["encoded"] == 3
    assert (runs["m2"]["latent_store"]["reused"], runs["m2"]["latent_store"]["encoded"]) == (3, 1)
    new_id = sha256_bytes(b"clip3", n=16)
    assert runs["read"] == [f"{new_id}.mp4"]                       # only the new clip's video was decoded
    assert any("3 samples from the store, 1 to encode" in m for m in runs["logs2"])
    assert any("0 samples from the store, 3 to encode" in m for m in runs["logs1"])
    assert not any("changed" in m for m in runs["logs1"] + runs["logs2"])
    assert not any("vae step" in m for m in runs["logs1"] + runs["logs2"])   # the VAE came from its folder
    # the old clips' entries are untouched (bitwise), one entry was added
    assert len(runs["after1"]) == 3 and len(runs["after2"]) == 4
    assert all(runs["after2"][k] == v for k, v in runs["after1"].items())
    assert json.loads((root / "store" / LAST_IDENTITIES).read_text()) == runs["m2"]["latent_store"]["identities"]
    assert not [p for p in (root / "store").rglob(".tmp-*")]


def test_a_new_process_finds_the_entries(data, runs, tmp_path):
    """The weekly run is a new process: the identities (weights, tokenizer, settings) and keys must not depend on
    the process, or nothing would ever be reused."""
    root, a, b, vae = data
    script = ("import json, sys; from pathlib import Path; from common.config import CompressConfig, from_dict; "
              "from tasks.compress.encode import run_compress; "
              "m = run_compress(from_dict(CompressConfig, json.loads(sys.argv[1])), Path(sys.argv[2]), "
              "Path(sys.argv[3]), lambda m: None, store_dir=Path(sys.argv[4]), vae_dir=Path(sys.argv[5])); "
              "print(json.dumps(m['latent_store']))")
    repo = Path(__file__).parent.parent
    out = subprocess.run([sys.executable, "-c", script, json.dumps(to_dict(cfg())), str(b), str(tmp_path / "o"),
                          str(root / "store"), str(vae)], capture_output=True, text=True, check=True, cwd=repo,
                         env={**os.environ, "PYTHONPATH": str(repo), "HF_HUB_OFFLINE": "1"})
    store = json.loads(out.stdout.strip().splitlines()[-1])
    assert (store["reused"], store["encoded"]) == (4, 0)
    assert files(tmp_path / "o")["shard-00000.safetensors"] == files(root / "out2")["shard-00000.safetensors"]


def test_warm_store_dataset_equals_a_cold_run(data, runs, tmp_path):
    """Manifest B from a fresh store: every file but meta.json is the same bytes as run 2's (3 of its 4 clips came
    from the store), meta.json differs only in the latent_store counts, and the content hash is the same."""
    root, a, b, vae = data
    cold = run_compress(cfg(), b, tmp_path / "cold", lambda m: None, store_dir=tmp_path / "store", vae_dir=vae)
    assert (cold["latent_store"]["reused"], cold["latent_store"]["encoded"]) == (0, 4)
    warm_files, cold_files = files(root / "out2"), files(tmp_path / "cold")
    assert sorted(warm_files) == sorted(cold_files)
    assert all(warm_files[k] == cold_files[k] for k in warm_files if k != "meta.json")
    assert cold["content_hash"] == runs["m2"]["content_hash"]
    strip = lambda m: {k: v for k, v in m.items() if k != "latent_store"}   # noqa: E731
    assert strip(cold) == strip(runs["m2"])
    assert store_entries(tmp_path / "store") == runs["after2"]         # the same entries, bitwise


def test_vae_folder_and_store_give_the_inline_dataset(data, runs, tmp_path):
    """run_compress without a store and without a VAE folder (the VAE fitted inline, as before) writes the same
    dataset as run 1 (the VAE folder, the store): the content hash does not depend on how latents were obtained."""
    root, a, b, vae = data
    inline = run_compress(cfg(), a, tmp_path / "inline", lambda m: None)
    assert "latent_store" not in inline
    assert inline["content_hash"] == runs["m1"]["content_hash"]
    assert inline["vae"] == runs["m1"]["vae"]


def test_a_clip_file_with_other_bytes_is_encoded_again(data, runs, tmp_path):
    """Same clip id, another file (e.g. re-cut by curation with other H.264 bytes): a miss, not a stale latent."""
    root, a, b, vae = data
    store = tmp_path / "store"
    shutil.copytree(root / "store", store)
    c = tmp_path / "c"
    shutil.copytree(a, c)
    recut = c / "clips" / f"{sha256_bytes(b'clip0', n=16)}.mp4"
    write_clip(recut, 7, frames=FRAMES, hw=HW)
    m = run_compress(cfg(), c, tmp_path / "o", lambda m: None, store_dir=store, vae_dir=vae)
    assert (m["latent_store"]["reused"], m["latent_store"]["encoded"]) == (2, 1)


def test_changed_vae_re_encodes_everything_and_says_why(data, runs, tmp_path):
    root, a, b, vae = data
    store = tmp_path / "store"
    shutil.copytree(root / "store", store)
    other = tmp_path / "vae-seed1"
    ensure_vae(cfg(seed=1), other, a, progress=lambda m: None)
    old_sha, new_sha = runs["m1"]["vae"]["weights_sha256"], read_vae_meta(other)["weights_sha256"]
    assert old_sha != new_sha
    logs: list[str] = []
    m = run_compress(cfg(seed=1), a, tmp_path / "o1", logs.append, store_dir=store, vae_dir=other)
    assert (m["latent_store"]["reused"], m["latent_store"]["encoded"]) == (0, 3)
    assert f"compress: VAE identity changed ({old_sha[:12]} -> {new_sha[:12]}): every sample is encoded again" in logs
    # back to the first VAE: its entries are still in the store
    logs = []
    m = run_compress(cfg(), a, tmp_path / "o2", logs.append, store_dir=store, vae_dir=vae)
    assert (m["latent_store"]["reused"], m["latent_store"]["encoded"]) == (3, 0)
    assert (f"compress: VAE identity changed ({new_sha[:12]} -> {old_sha[:12]}): all 3 samples were stored for it by "
            "an earlier run") in logs
    assert m["content_hash"] == runs["m1"]["content_hash"]


def test_changed_text_encoder_re_encodes_and_says_why(data, runs, tmp_path):
    root, a, b, vae = data
    store = tmp_path / "store"
    shutil.copytree(root / "store", store)
    text = TextEncoderConfig(d_model=32, num_layers=1, num_heads=2, d_ff=64, max_length=16, seed=1)
    logs: list[str] = []
    m = run_compress(cfg(text=text), a, tmp_path / "o", logs.append, store_dir=store, vae_dir=vae)
    assert (m["latent_store"]["reused"], m["latent_store"]["encoded"]) == (0, 3)
    old = runs["m2"]["latent_store"]["identities"]["text_encoder"]["weights_sha256"]
    new = m["latent_store"]["identities"]["text_encoder"]["weights_sha256"]
    assert f"compress: text encoder identity changed ({old[:12]} -> {new[:12]}): every sample is encoded again" in logs
    assert not any("VAE identity changed" in line for line in logs)


def test_identity_changes_name_what_changed():
    base = {"vae": {"weights_sha256": "a" * 64, "config_sha256": "c" * 16},
            "text_encoder": {"weights_sha256": "t" * 64, "max_length": 16, "tokenizer_sha256": "k" * 16},
            "settings": {"posterior": "mode", "dtype": "float32", "device": "cpu"}}
    assert identity_changes(None, base) == []
    assert identity_changes(base, base) == []
    gpu = {**base, "settings": {**base["settings"], "device": "cuda"}}
    assert identity_changes(base, gpu) == ["encoding settings changed (device cpu -> cuda)"]
    longer = {**base, "text_encoder": {**base["text_encoder"], "max_length": 32}}
    assert identity_changes(base, longer) == ["text encoder identity changed (max_length 16 -> 32)"]


def test_store_entries_are_complete_or_absent(tmp_path, monkeypatch):
    import safetensors.torch

    store = LatentStore(tmp_path / "s")
    z, t, m = torch.randn(24, 2, 4, 4), torch.randn(16, 32), torch.ones(16, dtype=torch.bool)
    key = "ab" * 16
    real = safetensors.torch.save_file

    def dies(tensors, path, metadata=None):
        Path(path).write_bytes(b"half an entry")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(safetensors.torch, "save_file", dies)
    with pytest.raises(KeyboardInterrupt):
        store.put(key, z, t, m)
    assert not store.has(key) and not list((tmp_path / "s").rglob("*.safetensors"))
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    store.put(key, z, t, m, {"clip_id": "c"})
    got = store.get(key)
    assert got is not None and torch.equal(got[0], z) and torch.equal(got[1], t) and got[2].dtype == torch.bool
    store.path(key).write_bytes(b"damaged")
    assert store.get(key) is None                                   # a miss: encoded and written again


def test_vae_folder_is_reused_refit_on_request_and_checked(data, tmp_path):
    root, a, b, vae = data
    logs: list[str] = []

    def no_clips() -> Path:
        raise AssertionError("a reused VAE reads no clips")

    meta, reused = ensure_vae(cfg(), vae, no_clips, progress=logs.append)
    assert reused and meta == read_vae_meta(vae) and any("reusing the VAE fitted earlier" in m for m in logs)
    assert not any("vae step" in m for m in logs)
    with pytest.raises(ValueError, match="other settings"):
        ensure_vae(cfg(vae_refit=1), vae, no_clips, progress=logs.append)
    key = vae_key(cfg())
    assert vae_key(cfg(holdout_fraction=0.5, shard_size=7, store_uri="/x", text=TextEncoderConfig())) == key
    assert vae_key(cfg(vae_refit=1)) != key and vae_key(cfg(seed=3)) != key and vae_key(cfg(vae_lr=1e-4)) != key
    # an incomplete folder (no meta.json) is fitted again, deterministically
    partial = tmp_path / "partial"
    shutil.copytree(vae, partial)
    (partial / "meta.json").unlink()
    again, reused = ensure_vae(cfg(), partial, a, progress=lambda m: None)
    assert not reused and again["weights_sha256"] == meta["weights_sha256"]
    # random init and imported weights read no clips
    rnd, _ = ensure_vae(cfg(vae_train_steps=0), tmp_path / "rnd", no_clips, progress=lambda m: None)
    assert rnd["random_init"] and rnd["source"] == "random" and rnd["fit_clips"] == 0
    imp, _ = ensure_vae(cfg(vae_pretrained=str(vae / "vae.safetensors")), tmp_path / "imp", no_clips,
                        progress=lambda m: None)
    assert imp["source"] == "pretrained" and imp["weights_sha256"] == meta["weights_sha256"]
    # the folder must match the config and its recorded hash
    with pytest.raises(ValueError, match="latent_channels"):
        load_vae_dir(vae, cfg(vae=type(cfg().vae)(latent_channels=16)))
    forged = tmp_path / "forged"
    shutil.copytree(vae, forged)
    (forged / "meta.json").write_text(json.dumps({**meta, "weights_sha256": "0" * 64}))
    with pytest.raises(ValueError, match="modified"):
        load_vae_dir(forged, cfg())
    with pytest.raises(ValueError, match="vae_refit"):
        cfg(vae_refit=-1)


# --------------------------------------------------------------------------------------------------- Flyte tasks

def test_tasks_fit_once_reuse_on_a_new_manifest_refit_on_request(data, tmp_path, monkeypatch):
    from flytekit.core import local_cache
    from mlflow.tracking import MlflowClient

    def fresh_flyte_cache(name: str) -> None:
        monkeypatch.setattr(local_cache, "CACHE_LOCATION", str(tmp_path / name))
        monkeypatch.setattr(local_cache.LocalTaskCache, "_initialized", False)
        monkeypatch.setattr(local_cache.LocalTaskCache, "_cache", None, raising=False)

    root, a, b, _ = data
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    fresh_flyte_cache("flyte-cache")
    tracking_cfg = TrackingConfig(root=str(tmp_path / "runs"))
    parent = tracking.start_parent_run(tracking_cfg.root, "compress-test", "parent", {}, {})

    @workflow
    def wf(cfg: CompressConfig, manifest: ClipManifest, tracking_cfg: TrackingConfig,
           parent_run: str) -> tuple[VAEModel, LatentDataset]:
        vae = fit_vae(cfg=cfg, manifest=manifest, tracking_cfg=tracking_cfg, parent_run=parent_run)
        return vae, compress(cfg=cfg, manifest=manifest, vae=vae, tracking_cfg=tracking_cfg, parent_run=parent_run)

    def manifest(folder: Path, n: int) -> ClipManifest:
        return ClipManifest(folder=FlyteDirectory(str(folder)), content_hash=f"manifest-{n}", source_hashes=[],
                            inputs=n, kept=n, rejected=0, failed=0)

    def counts(data: LatentDataset) -> tuple[int, int]:
        s = json.loads((Path(data.folder.path) / "meta.json").read_text())["latent_store"]
        return s["reused"], s["encoded"]

    vae1, d1 = wf(cfg=cfg(), manifest=manifest(a, 3), tracking_cfg=tracking_cfg, parent_run=parent)
    folder = Path(vae1.folder.path)
    assert folder.parent == tmp_path / "runs" / "artifacts" / "vae" and folder.name == vae_key(cfg())
    assert vae1.trained_steps == 1 and not vae1.random_init and vae1.fit_manifest_hash == "manifest-3"
    assert d1.vae_identity == vae1.identity and counts(d1) == (0, 3)
    assert (tmp_path / "runs" / "artifacts" / "compress" / "latent-store" / LAST_IDENTITIES).is_file()
    # a new manifest: fit_vae is a cache hit (same VAE), compress encodes only the new clip
    vae2, d2 = wf(cfg=cfg(), manifest=manifest(b, 4), tracking_cfg=tracking_cfg, parent_run=parent)
    assert (vae2.identity, vae2.folder.path, vae2.fit_manifest_hash) == (vae1.identity, vae1.folder.path, "manifest-3")
    assert counts(d2) == (3, 1) and d2.num_train + d2.num_val == 4
    # without the Flyte cache the task runs again and reuses the folder it finds
    fresh_flyte_cache("flyte-cache-2")
    vae3, d3 = wf(cfg=cfg(), manifest=manifest(b, 4), tracking_cfg=tracking_cfg, parent_run=parent)
    assert vae3.identity == vae1.identity and vae3.fit_manifest_hash == "manifest-3"
    assert d3.content_hash == d2.content_hash and counts(d3) == (4, 0)
    # vae_refit: a new folder, fitted on the manifest it is given, and every clip encoded again
    vae4, d4 = wf(cfg=cfg(vae_refit=1), manifest=manifest(b, 4), tracking_cfg=tracking_cfg, parent_run=parent)
    assert Path(vae4.folder.path).name == vae_key(cfg(vae_refit=1)) and vae4.identity != vae1.identity
    assert vae4.fit_manifest_hash == "manifest-4" and counts(d4) == (0, 4)

    client = MlflowClient(tracking_uri=tracking.tracking_uri(tracking_cfg.root))
    runs = client.search_runs([client.get_run(parent).info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'",
                              order_by=["attributes.start_time ASC"])
    vae_runs = [r for r in runs if r.info.run_name == "vae"]
    assert [r.data.tags["vae.reused"] for r in vae_runs] == ["False", "True", "False"]   # run 2 was a cache hit
    assert [r.info.run_name for r in runs].count("compress") == 4
    first = vae_runs[0]
    assert first.data.tags["vae.identity"] == vae1.identity and first.data.metrics["vae_trained_steps"] == 1
    assert len(client.get_metric_history(first.info.run_id, "vae_loss")) == 1
    assert [(d.dataset.name, d.dataset.digest) for d in first.inputs.dataset_inputs] == [("clip-manifest",
                                                                                         "manifest-3")]
    assert not vae_runs[1].inputs.dataset_inputs                     # reused: no clip was read
    assert {f.path for f in client.list_artifacts(first.info.run_id, "vae")} == {
        "vae/meta.json", "vae/config.json", "vae/vae.safetensors"}
