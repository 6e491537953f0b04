"""S3 inputs through the minio client against an in-process moto server: listing rules, errors, curation parity."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from common.config import CurateConfig
from common.storage import InputFile, fetch, list_inputs, read_text, s3_client, upload_dir
from tasks.curate.driver import run_curation
from tasks.curate.synthetic import SceneSpec, make_scenes_video
from trainer.launch import free_port  # drawn below the ephemeral range: two test workers do not get the same port

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def moto_endpoint():
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_env(moto_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    return moto_endpoint


def _bucket(name: str) -> str:
    client = s3_client()
    if not client.bucket_exists(name):
        client.make_bucket(name)
    return name


def test_s3_listing_rules_fetch_and_captions(s3_env, tmp_path):
    client = s3_client()
    bucket = _bucket("rules-bucket")
    for key, body in [("raw/a.mp4", b"video-a"), ("raw/a.txt", b"caption a\n"), ("raw/notes.txt", b"n"),
                      ("raw/README.md", b"doc"), ("raw/LICENSE", b"l"), ("raw/.DS_Store", b"x"),
                      ("raw/sub/b.mkv", b"video-b"), ("other/c.mp4", b"not listed")]:
        local = tmp_path / "src" / key
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(body)
        client.fput_object(bucket, key, str(local))
    items = list_inputs(f"s3://{bucket}/raw")
    assert [i.name for i in items] == ["a.mp4", "notes.txt", "sub/b.mkv"]
    assert items[0].uri == f"s3://{bucket}/raw/a.mp4" and items[0].size == 7
    assert items[0].caption_uri == f"s3://{bucket}/raw/a.txt" and items[1].caption_uri == ""
    assert list_inputs(f"s3://{bucket}/raw/") == items
    local = fetch(items[2], tmp_path / "dl")
    assert local == tmp_path / "dl" / "sub" / "b.mkv" and local.read_bytes() == b"video-b"
    assert read_text(items[0].caption_uri) == "caption a\n"
    with pytest.raises(ValueError, match="leaves the destination folder"):
        fetch(InputFile(f"s3://{bucket}/raw/../x", 1, "../x"), tmp_path / "dl")


def test_s3_errors_are_clear(s3_env, monkeypatch):
    _bucket("errors-bucket")
    with pytest.raises(FileNotFoundError, match="bucket 'no-such-bucket' does not exist"):
        list_inputs("s3://no-such-bucket/videos")
    with pytest.raises(FileNotFoundError, match="no objects under"):
        list_inputs("s3://errors-bucket/empty-prefix")
    with pytest.raises(ValueError, match="not an s3://bucket/prefix"):
        list_inputs("s3://")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(ValueError, match="AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
        list_inputs("s3://errors-bucket/videos")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "ftp://127.0.0.1:1")
    with pytest.raises(ValueError, match="AWS_ENDPOINT_URL"):
        list_inputs("s3://errors-bucket/videos")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(ConnectionError, match="cannot reach S3 endpoint"):
        list_inputs("s3://errors-bucket/videos")


def test_upload_dir_roundtrip(s3_env, tmp_path):
    (tmp_path / "out" / "clips").mkdir(parents=True)
    (tmp_path / "out" / "summary.json").write_text("{}")
    (tmp_path / "out" / "clips" / "x.mp4").write_bytes(b"clip")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        upload_dir(tmp_path / "out", "s3://not-created-yet/run1")
    uris = upload_dir(tmp_path / "out", "s3://not-created-yet/run1", create_bucket=True)
    assert uris == ["s3://not-created-yet/run1/clips/x.mp4", "s3://not-created-yet/run1/summary.json"]
    items = list_inputs("s3://not-created-yet/run1")
    assert [(i.name, i.size) for i in items] == [("clips/x.mp4", 4), ("summary.json", 2)]


def test_run_curation_from_s3_matches_local(s3_env, tmp_path, monkeypatch):
    folder = tmp_path / "in"
    folder.mkdir()
    make_scenes_video(folder / "a.mp4", [SceneSpec("texture", 40, seed=7), SceneSpec("flat", 20)])
    (folder / "a.txt").write_text("a textured square\n")
    make_scenes_video(folder / "b.mp4", [SceneSpec("texture", 20, seed=8), SceneSpec("dark", 20)], width=96, height=64)
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "random.mp4").write_bytes(np.random.default_rng(3).bytes(1500))
    (folder / "ATTRIBUTION.md").write_text("docs\n")
    client = s3_client()
    bucket = _bucket("curate-bucket")
    for path in sorted(folder.iterdir()):
        client.fput_object(bucket, f"videos/{path.name}", str(path))

    from common.config import CaptionConfig

    tiny = dict(motion_min=0.02, motion_height=96, caption=CaptionConfig(backend="sidecar"))   # as in tests/test_curate
    local = run_curation(CurateConfig(input_uri=str(folder), **tiny), tmp_path / "local", progress=lambda m: None)
    messages = []
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    remote = run_curation(CurateConfig(input_uri=f"s3://{bucket}/videos", **tiny), tmp_path / "s3",
                          progress=messages.append)
    keys = ("inputs", "kept", "rejected", "failed", "clips_kept", "clips_rejected", "rows", "reasons", "source_hashes")
    assert {k: remote[k] for k in keys} == {k: local[k] for k in keys}
    assert (remote["inputs"], remote["kept"], remote["failed"], remote["clips_kept"]) == (4, 2, 2, 3)
    df_local = pq.read_table(tmp_path / "local" / "manifest.parquet").to_pandas()
    df_s3 = pq.read_table(tmp_path / "s3" / "manifest.parquet").to_pandas()
    assert df_s3.source_uri.str.startswith(f"s3://{bucket}/videos/").all()
    names_s3 = df_s3.source_uri.map(lambda u: u.rsplit("/", 1)[1])
    assert list(names_s3) == list(df_local.source_uri.map(lambda u: Path(u).name))
    same = df_local.drop(columns=["source_uri"]).equals(df_s3.drop(columns=["source_uri"]))
    assert same, (df_local.clip_id.tolist(), df_s3.clip_id.tolist())
    assert (df_s3[df_s3.status == "kept"].clip_id.tolist() == df_local[df_local.status == "kept"].clip_id.tolist())
    assert (df_s3[df_s3.source_uri.str.endswith("a.mp4")].caption.str.startswith("a textured square")).all()
    for name in sorted(p.name for p in (tmp_path / "local" / "clips").iterdir()):
        assert (tmp_path / "s3" / "clips" / name).read_bytes() == (tmp_path / "local" / "clips" / name).read_bytes()
    assert any("[4/4]" in m for m in messages)
    assert not any((tmp_path / "tmp").iterdir())   # downloaded inputs are removed with the temp folder


def test_outage_during_curation_records_nothing_and_a_rerun_curates(monkeypatch, tmp_path):
    """The S3 endpoint stops after the listing: the shard fails with ConnectionError, no input is recorded as failed
    (nothing in the per-input store); once the endpoint is back, a rerun with the same store curates every input."""
    from moto.server import ThreadedMotoServer

    from common.config import CaptionConfig
    from tasks.curate.shard import run_shard

    port = free_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    for k, v in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"), ("AWS_REGION", "us-east-1")):
        monkeypatch.setenv(k, v)
    folder = tmp_path / "in"
    folder.mkdir()
    make_scenes_video(folder / "a.mp4", [SceneSpec("texture", 40, seed=7)])
    make_scenes_video(folder / "b.mp4", [SceneSpec("texture", 40, seed=8)])

    def serve() -> ThreadedMotoServer:   # moto keeps objects in memory: a restarted endpoint is empty again
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        client = s3_client()
        client.make_bucket("outage")
        for path in sorted(folder.iterdir()):
            client.fput_object("outage", f"v/{path.name}", str(path))
        return server

    cfg = CurateConfig(input_uri="s3://outage/v", motion_min=0.02, motion_height=96,
                       caption=CaptionConfig(backend="sidecar"))
    server = serve()
    items = list_inputs(cfg.input_uri)
    server.stop()
    store = tmp_path / "store"
    with pytest.raises(ConnectionError, match="cannot reach S3 endpoint"):
        run_shard(items, cfg, store, progress=lambda m: None)
    assert not list(store.glob("*/result.json"))   # nothing stored: no input became a "failed" row
    server = serve()
    try:
        summary = run_curation(cfg, tmp_path / "out", store_dir=store, progress=lambda m: None)
    finally:
        server.stop()
    assert (summary["inputs"], summary["failed"], summary["processed"]) == (2, 0, 2)
