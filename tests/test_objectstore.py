"""Folders in object storage (common/objectstore.py) against a real S3 endpoint (moto's server, reached through the
minio client production uses): complete-or-absent uploads, checksummed downloads, and an endpoint that goes down
in the middle of an upload or a download and comes back (moto keeps its objects across a restart in-process)."""
from __future__ import annotations

import io
import json
import threading
from typing import Optional

import pytest
from moto.server import ThreadedMotoServer

from common import objectstore as ob
from common.storage import s3_client
from trainer.launch import free_port  # drawn below the ephemeral range: two test workers do not get the same port

pytestmark = pytest.mark.timeout(60)
MiB = 1024 * 1024


class Endpoint:
    """A moto S3 server on a fixed port that can be stopped and started again (same objects)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server: Optional[ThreadedMotoServer] = None
        self.start()

    def start(self) -> None:
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def outage(self, seconds: float) -> threading.Timer:
        """Stop now, start again after ``seconds`` (in a timer thread)."""
        self.stop()
        timer = threading.Timer(seconds, self.start)
        timer.start()
        return timer


@pytest.fixture(scope="module")
def endpoint():
    ep = Endpoint()
    yield ep
    ep.stop()


@pytest.fixture
def s3(endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    if endpoint.server is None:
        endpoint.start()
    return endpoint


def _folder(root, big: bool = False):
    (root / "clips").mkdir(parents=True)
    (root / "optim").mkdir()
    (root / "manifest.parquet").write_bytes(b"parquet bytes")
    (root / "clips" / "a.mp4").write_bytes(b"clip a" * 100)
    (root / "optim" / "rank00000.pt").write_bytes(b"optimizer state")
    (root / "state.pt").write_bytes(b"pickle")
    if big:   # 11 MiB: three parts of 5 MiB (S3's smallest part) -> a multipart upload
        (root / "model.safetensors").write_bytes(bytes(range(256)) * (11 * MiB // 256))
    return root


def _keys(bucket: str, prefix: str):
    return sorted(o.object_name for o in s3_client().list_objects(bucket, prefix=prefix, recursive=True))


def test_upload_is_complete_or_absent_and_download_verifies(s3, tmp_path):
    src = _folder(tmp_path / "src", big=True)
    client = s3_client()
    client.make_bucket("rt-bucket")
    # a multipart upload left behind by an uploader that was killed: aborted by the next upload of the prefix
    upload_id = client._create_multipart_upload("rt-bucket", "run/ck/model.safetensors", {})
    client._upload_part("rt-bucket", "run/ck/model.safetensors", b"x" * (5 * MiB), None, upload_id, 1)
    assert client._list_multipart_uploads("rt-bucket", prefix="run/ck/").uploads

    assert not ob.folder_exists("s3://rt-bucket/run/ck")
    manifest = ob.upload_folder(src, "s3://rt-bucket/run/ck", exclude=["optim", "*.pt"], part_size=5 * MiB)
    assert [e["path"] for e in manifest["files"]] == ["clips/a.mp4", "manifest.parquet", "model.safetensors"]
    assert _keys("rt-bucket", "run/ck/") == ["run/ck/_MANIFEST.json", "run/ck/clips/a.mp4",
                                             "run/ck/manifest.parquet", "run/ck/model.safetensors"]
    assert not client._list_multipart_uploads("rt-bucket", prefix="run/ck/").uploads
    big = client.stat_object("rt-bucket", "run/ck/model.safetensors")
    assert big.etag.endswith("-3")   # three parts
    assert big.metadata["x-amz-meta-sha256"] == ob.sha256_file(src / "model.safetensors")
    assert ob.folder_exists("s3://rt-bucket/run/ck/")

    dst = ob.download_folder("s3://rt-bucket/run/ck", tmp_path / "dst")
    got = sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*") if p.is_file())
    assert got == ["clips/a.mp4", "manifest.parquet", "model.safetensors"]
    assert all((dst / r).read_bytes() == (src / r).read_bytes() for r in got)

    # a second upload with fewer files: the old manifest goes first, the objects it no longer has go too
    (src / "clips" / "a.mp4").unlink()
    ob.upload_folder(src, "s3://rt-bucket/run/ck", files=["manifest.parquet"])
    assert _keys("rt-bucket", "run/ck/") == ["run/ck/_MANIFEST.json", "run/ck/manifest.parquet"]
    assert [p.name for p in ob.download_folder("s3://rt-bucket/run/ck", tmp_path / "dst").iterdir()] == \
        ["manifest.parquet"]


def test_a_prefix_without_manifest_is_absent_and_a_damaged_object_is_named(s3, tmp_path):
    client = s3_client()
    client.make_bucket("partial-bucket")
    client.put_object("partial-bucket", "half/a.bin", io.BytesIO(b"a"), 1)   # an upload that never finished
    assert not ob.folder_exists("s3://partial-bucket/half")
    assert not ob.folder_exists("s3://no-such-bucket-here/half")
    with pytest.raises(FileNotFoundError, match="_MANIFEST.json is missing"):
        ob.download_folder("s3://partial-bucket/half", tmp_path / "d")
    assert not (tmp_path / "d").exists()

    src = _folder(tmp_path / "src")
    ob.upload_folder(src, "s3://partial-bucket/full")
    client.put_object("partial-bucket", "full/clips/a.mp4", io.BytesIO(b"tampered"), 8)
    with pytest.raises(ob.ChecksumError, match=r"s3://partial-bucket/full/clips/a\.mp4: sha256 .* upload the folder"):
        ob.download_folder("s3://partial-bucket/full", tmp_path / "d")
    assert not (tmp_path / "d").exists() and not (tmp_path / ".tmp-d").exists()
    with pytest.raises(ValueError, match="reserved for the manifest"):
        (src / "_MANIFEST.json").write_text("{}")
        ob.upload_folder(src, "s3://partial-bucket/other")
    with pytest.raises(ValueError, match="give a prefix"):
        ob.upload_folder(src, "s3://partial-bucket")


def test_endpoint_outage_during_upload_and_download(s3, tmp_path, capfd):
    """The endpoint stops after the first object of an upload and is back 2 s later: the upload retries, completes
    and writes the manifest; the same during a download."""
    src = _folder(tmp_path / "src", big=True)
    timers = []

    def stop_once(rel: str) -> None:
        if not timers:
            timers.append(s3.outage(2.0))

    manifest = ob.upload_folder(src, "s3://outage-bucket/run/x", part_size=5 * MiB, max_wait_s=20,
                                progress=stop_once)
    timers[0].join()
    err = capfd.readouterr().err
    assert "failed (" in err and "retrying for up to 20 s" in err and "endpoint back after" in err
    assert len(manifest["files"]) == 5 and ob.folder_exists("s3://outage-bucket/run/x")
    assert not s3_client()._list_multipart_uploads("outage-bucket", prefix="run/x/").uploads

    timers.clear()
    dst = ob.download_folder("s3://outage-bucket/run/x", tmp_path / "dst", max_wait_s=20, progress=stop_once)
    timers[0].join()
    assert "endpoint back after" in capfd.readouterr().err
    for e in manifest["files"]:
        assert ob.sha256_file(dst / e["path"]) == e["sha256"]
    assert not list(dst.rglob("*.part"))


def test_an_outage_longer_than_the_budget_leaves_no_folder(s3, tmp_path):
    """Endpoint down for longer than max_wait_s: a clear ConnectionError; what was written before is invisible
    (no manifest), and the next upload completes it."""
    src = _folder(tmp_path / "src")

    def stop_after_first(rel: str) -> None:
        if s3.server is not None:
            s3.stop()

    with pytest.raises(ConnectionError, match=r"still failing after .* VGEN_S3_MAX_WAIT_S=<seconds> \(now 1\.5\)"):
        ob.upload_folder(src, "s3://budget-bucket/run", max_wait_s=1.5, progress=stop_after_first)
    s3.start()
    assert _keys("budget-bucket", "run/") == ["run/clips/a.mp4"]   # one object, no manifest: absent
    assert not ob.folder_exists("s3://budget-bucket/run")
    ob.upload_folder(src, "s3://budget-bucket/run")
    assert json.loads(s3_client().get_object("budget-bucket", "run/_MANIFEST.json").read())["total_bytes"] > 0


def test_cli_and_retry_budget_env(s3, tmp_path, capsys, monkeypatch):
    src = _folder(tmp_path / "src")
    assert ob.main(["upload", str(src), "s3://cli-bucket/f", "--exclude", "optim"]) == 0
    assert "uploaded 3 files" in capsys.readouterr().out
    assert ob.main(["ls", "s3://cli-bucket/f"]) == 0 and "clips/a.mp4" in capsys.readouterr().out
    assert ob.main(["ls", "s3://cli-bucket/nothing"]) == 1 and "absent" in capsys.readouterr().out
    assert ob.main(["download", "s3://cli-bucket/f", str(tmp_path / "d")]) == 0
    assert ob.main(["download", "s3://cli-bucket/nothing", str(tmp_path / "e")]) == 2
    assert "no complete folder" in capsys.readouterr().err
    monkeypatch.setenv(ob.MAX_WAIT_ENV, "soon")
    with pytest.raises(ValueError, match="VGEN_S3_MAX_WAIT_S must be a number"):
        ob.max_wait_default()


def test_mirror_uploads_stage_outputs_and_only_the_exported_checkpoint_weights(s3, tmp_path):
    """tasks.common.mirror: a stage output under <root>/artifacts goes to <tracking.artifact_uri>/<stage>/<key>; a
    Checkpoint folder keeps latest, metrics.jsonl and the latest step's weights + meta.json, never optim/, dist/,
    job.json or older steps; artifact_uri "" uploads nothing."""
    from common.config import TrackingConfig
    from tasks.common import artifact_dir, exported_checkpoint_files, mirror

    local = TrackingConfig(root=str(tmp_path / "runs"))
    remote = TrackingConfig(root=str(tmp_path / "runs"), artifact_uri="s3://mirror-bucket/team/run")
    out = artifact_dir(remote, "train", "stage1-abc")
    for step in ("step_00000002", "step_00000004"):
        for f in ("model.safetensors", "ema.safetensors", "meta.json", "optim/rank00000.pt", "dist/__0_0.distcp"):
            (out / step / f).parent.mkdir(parents=True, exist_ok=True)
            (out / step / f).write_bytes(f"{step}/{f}".encode())
    (out / "latest").write_text("step_00000004\n")
    (out / "metrics.jsonl").write_text('{"step": 4}\n')
    (out / "job.json").write_text("{}")
    assert mirror(local, out, files=exported_checkpoint_files(out)) == ""
    assert mirror(remote, out, files=exported_checkpoint_files(out)) == "s3://mirror-bucket/team/run/train/stage1-abc"
    assert _keys("mirror-bucket", "") == [f"team/run/train/stage1-abc/{k}" for k in (
        "_MANIFEST.json", "latest", "metrics.jsonl", "step_00000004/ema.safetensors", "step_00000004/meta.json",
        "step_00000004/model.safetensors")]
    with pytest.raises(ValueError, match="is not under"):
        mirror(remote, tmp_path)
    with pytest.raises(ValueError, match=r"tracking.artifact_uri must be s3://bucket/prefix"):
        TrackingConfig(artifact_uri="/mnt/share")
