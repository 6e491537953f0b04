"""The remote-run services for real: an ``mlflow server`` process (SQLite backend, artifacts on an S3 endpoint:
moto's server, as ``make services`` runs them) that goes down while a training stage logs per-step metrics and
comes back on the same port and backend; and a credentials audit of everything the storage and tracking paths
wrote (files, logs, S3 objects, MLflow params, tags, artifacts, registry)."""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)

KEY_ID = "AKIAVGENTESTKEY7Q3Z"                   # distinctive: grepped for in everything written
SECRET = "vgenTestSecret/Do+Not+Leak+9f3e1c"
BUCKET = "mlflow"   # common.services.BUCKETS[0]: MLflow's artifacts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    """``make services`` (common.services.start) in a temp folder on free ports, with distinctive credentials."""
    from common import services as svc

    folder = tmp_path_factory.mktemp("services")
    names = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    saved = {k: os.environ.get(k) for k in names}
    os.environ.update(AWS_ACCESS_KEY_ID=KEY_ID, AWS_SECRET_ACCESS_KEY=SECRET)
    try:
        state = svc.start(folder, s3_port=_free_port(), mlflow_port=_free_port())
        os.environ["AWS_ENDPOINT_URL"] = state["s3_url"]
        yield {"folder": folder, "s3_url": state["s3_url"], "mlflow_url": state["mlflow_url"]}
    finally:
        svc.main(["stop", "--folder", str(folder)])
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def client_env(services, monkeypatch):
    """This process talks to the server with a short per-request timeout and no retries of its own."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", services["mlflow_url"])
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", services["s3_url"])
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved = tracking_utils._tracking_uri, registry_utils._registry_uri
    mlflow.set_tracking_uri(services["mlflow_url"])
    mlflow.set_registry_uri(services["mlflow_url"])
    yield services
    while mlflow.active_run() is not None:
        mlflow.end_run()
    tracking_utils._tracking_uri, registry_utils._registry_uri = saved   # later tests find MLflow as it was


def _job(tmp_path: Path, uri: str, run_id: str):
    from trainer.job import StageJob

    return StageJob(latents_dir=str(tmp_path / "latents"), output_dir=str(tmp_path / "stage"),
                    mlflow_tracking_uri=uri, mlflow_run_id=run_id)


def test_training_metrics_survive_a_tracking_server_outage(client_env, tmp_path, capfd):
    """Steps 1-3 reach MLflow; the server stops; steps 4-8 are written without waiting on it; the server restarts on
    the same port and backend; closing the log sends the buffered steps: the run has all 8. A bounded buffer that
    overflows during the outage says how many metrics were lost."""
    from mlflow.tracking import MlflowClient

    from common import services as svc
    from trainer.metrics import MetricsLog
    from trainer.mlflow_buffer import MetricsSender
    from trainer.parallel.plan import ParallelPlan

    url, folder = client_env["mlflow_url"], client_env["folder"]
    client = MlflowClient(url)
    run_id = client.create_run(client.create_experiment("outage")).info.run_id
    log = MetricsLog(_job(tmp_path, url, run_id), ParallelPlan.single(), 0, 1000, 1e12)

    def step(n: int) -> float:
        t0 = time.monotonic()
        log.write(n, 1.0 / n, 0.5, 1e-3, (4, 400, 1e9), 0.1)
        return time.monotonic() - t0

    for n in (1, 2, 3):
        step(n)
    assert log.sender is not None and log.sender.flush(20)
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3]

    assert svc.stop_one(folder, "mlflow")
    assert max(step(n) for n in range(4, 9)) < 0.5          # training never waits on the dead server
    small = MetricsSender(url, run_id, max_buffered=5, first_retry_s=0.2)
    from mlflow.entities import Metric

    small.put([Metric("other", float(i), 0, i) for i in range(12)])
    assert small.close(timeout_s=0.5) == 12                  # 7 dropped from the full buffer, 5 still queued
    deadline = time.monotonic() + 10
    while log.sender.down_since is None and time.monotonic() < deadline:
        time.sleep(0.1)
    port = int(url.rsplit(":", 1)[1])   # the same port and backend (mlflow.db), as `make services` would
    restart_s = svc.launch(folder, "mlflow", svc.mlflow_command(folder, port), svc.mlflow_env(client_env["s3_url"]),
                           f"{url}/health")
    assert log.close() == 0
    history = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 9))
    assert {m.step: m.value for m in history}[6] == pytest.approx(1 / 6)
    assert len((tmp_path / "stage" / "metrics.jsonl").read_text().splitlines()) == 8
    refused = MetricsSender(url, "f" * 32)                   # no such run: a 4xx answer, not retried
    refused.put([Metric("loss", 1.0, 0, 1)])
    assert refused.close(timeout_s=10) == 1
    err = capfd.readouterr().err
    assert "MLflow refused 1 metrics" in err and "1 refused" in err
    assert "unreachable" in err and "training continues" in err
    assert "reachable again" in err and "buffered metrics sent" in err, err
    assert "12 metrics of run" in err and "7 dropped from the full buffer of 5" in err
    print(f"mlflow server restart took {restart_s:.1f} s")


def test_no_credential_is_written_anywhere(client_env, tmp_path, capfd):
    """Object storage (upload, download, a stage mirror) and tracking (parent and child runs, config params, a
    registered version whose artifacts go through the server to S3, per-step metrics) with distinctive credentials
    in the environment of both processes: the secret appears in no file, log, object, param, tag or captured
    output; the key id only inside SigV4's X-Amz-Credential of presigned URLs in the S3 endpoint's request log."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from common import objectstore, tracking
    from common.config import DiTConfig, PipelineConfig, TrackingConfig, to_dict
    from common.storage import s3_client
    from tasks.common import artifact_dir, mirror
    from tasks.register.registry import register_checkpoint
    from trainer.metrics import MetricsLog
    from trainer.parallel.plan import ParallelPlan

    url = client_env["mlflow_url"]
    tc = TrackingConfig(experiment="creds", root=str(tmp_path / "runs"), artifact_uri="s3://run-outputs/team/run1")
    config = PipelineConfig(tracking=tc)
    out = artifact_dir(tc, "curate", "abc")
    (out / "clips").mkdir(parents=True)
    (out / "clips" / "c.mp4").write_bytes(b"clip")
    (out / "manifest.parquet").write_bytes(b"rows")
    parent = tracking.start_parent_run(tc.root, tc.experiment, "creds", {"config": "tiny"}, {"flyte.execution": "x"})
    with tracking.child_run(tc.root, parent, "curate") as run_id:
        tracking.log_config("pipeline", to_dict(config))
        uri = mirror(tc, out)
        objectstore.download_folder(uri, tmp_path / "downloaded")
        log = MetricsLog(_job(tmp_path, url, run_id), ParallelPlan.single(), 0, 1000, 1e12)
        log.write(1, 0.9, 0.5, 1e-3, (4, 400, 1e9), 0.1)
        assert log.close() == 0
        step = tmp_path / "step_00000001"
        step.mkdir()
        for f in ("model.safetensors", "ema.safetensors"):
            (step / f).write_bytes(b"weights " + f.encode())
        (step / "meta.json").write_text(json.dumps({"dit": to_dict(DiTConfig())}))
        (tmp_path / "latents").mkdir()
        (tmp_path / "latents" / "meta.json").write_text("{}")
        version, _ = register_checkpoint("creds-model", "candidate", DiTConfig(), step, tmp_path / "latents",
                                         {"config_hash": "c"})
    tracking.finish_run(tc.root, parent)
    client = MlflowClient(url)
    mv = client.get_model_version("creds-model", version)
    assert {a.path for a in client.list_artifacts(mv.run_id, "checkpoint")} == {
        "checkpoint/model.safetensors", "checkpoint/ema.safetensors", "checkpoint/meta.json"}
    mlflow.artifacts.download_artifacts(f"models:/creds-model/{version}", dst_path=str(tmp_path / "registered"))
    assert (tmp_path / "registered" / "ema.safetensors").read_bytes() == b"weights ema.safetensors"

    written = []   # (where, text)
    for root in (tmp_path, client_env["folder"]):
        for p in root.rglob("*"):
            if p.is_file():
                written.append((str(p), p.read_bytes().decode("latin-1")))
    s3 = s3_client()
    for bucket in s3.list_buckets():
        for obj in s3.list_objects(bucket.name, recursive=True):
            r = s3.get_object(bucket.name, obj.object_name)
            stat = s3.stat_object(bucket.name, obj.object_name)
            written.append((f"s3://{bucket.name}/{obj.object_name}", r.read().decode("latin-1") + str(stat.metadata)))
            r.close()
            r.release_conn()
    for run in client.search_runs([e.experiment_id for e in client.search_experiments()]):
        written.append((f"run {run.info.run_id}", json.dumps([run.data.params, run.data.tags, run.info.artifact_uri])))
    written.append(("model version", json.dumps([mv.source, mv.tags])))
    cap = capfd.readouterr()
    written.append(("captured output", cap.out + cap.err))
    names = {w[0] for w in written}
    assert {"mlflow.db", "mlflow.log", "s3.log", "services.json"} <= {Path(n).name for n in names}
    assert any(n.startswith("s3://run-outputs/team/run1/curate/abc/") for n in names)
    assert any(n.startswith(f"s3://{BUCKET}/artifacts/") and n.endswith("ema.safetensors") for n in names)
    assert not [where for where, text in written if SECRET in text]   # the secret: nowhere at all
    # the key id (not a secret: it names the key) only where SigV4 puts it, in the S3 endpoint's own request log
    # (MLflow hands out presigned URLs for artifact downloads: ...&X-Amz-Credential=<key id>/<date>/...)
    leaks = [where for where, text in written
             if text.replace(f"X-Amz-Credential={KEY_ID}/", "").count(KEY_ID)]
    assert not leaks, leaks
    assert any(run_id in text for _, text in written)   # the audit did read the runs it looks through


def test_services_env_and_status(client_env, capsys, monkeypatch):
    """``make demo SERVICES=1`` evaluates ``python -m common.services env``: the URLs to export, never the
    credentials of the environment; ``status`` names both services."""
    from common import services as svc

    folder = str(client_env["folder"])
    assert svc.main(["env", "--folder", folder]) == 0
    out = capsys.readouterr().out
    assert f"export MLFLOW_TRACKING_URI={client_env['mlflow_url']}" in out
    assert f"export AWS_ENDPOINT_URL={client_env['s3_url']}" in out and SECRET not in out and KEY_ID not in out
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    assert svc.main(["env", "--folder", folder]) == 0
    assert f"AWS_ACCESS_KEY_ID={svc.LOCAL_KEY}" in capsys.readouterr().out
    assert svc.main(["status", "--folder", folder]) == 0
    assert "s3: running" in (out := capsys.readouterr().out) and "mlflow: running" in out
    assert svc.main(["env", "--folder", folder + "/nothing-here"]) == 1 and "make services" in capsys.readouterr().out
    port = int(client_env["s3_url"].rsplit(":", 1)[1])
    with pytest.raises(OSError, match=f"port {port} is taken"):
        svc.start(Path(folder) / "second", s3_port=port)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_tiny_dag_as_a_remote_run(services, repo_root, tmp_path):
    """The tiny DAG as a remote run would run it, on this machine: raw videos and images read from the S3 endpoint,
    ``--raw-output-data-prefix`` on it, runs on the MLflow server, ``tracking.artifact_uri`` on it (a shortened
    curriculum: the 64px stage, SFT and Flow-DPO for 2 steps each). Every artifact a remote run needs is in object
    storage, complete (manifest last) and checksummed: the clip manifest with its clips and images, the latents,
    each stage's exported weights (never optimizer state or older steps), the evaluation report, the registered
    version's weights behind the server; Flyte's raw-output prefix holds only small literals (folders are passed by
    path, never copied there); and no file, log or output of the run holds the test secret."""
    import subprocess
    import sys

    import yaml

    from common import objectstore
    from common.storage import s3_client

    s3 = s3_client()
    for p in sorted((repo_root / "data/demo").iterdir()):   # raw videos, images and sidecar captions in
        s3.fput_object("vgen", f"raw/{p.name}", str(p))
    cfg = yaml.safe_load((repo_root / "configs/tiny.yaml").read_text())
    cfg["curate"]["input_uri"] = "s3://vgen/raw/"
    cfg["curate"]["caption"]["backend"] = "sidecar"
    cfg["compress"]["vae_train_steps"] = 2
    for stage in cfg["train"]["stages"][:2]:
        stage["skip"] = True
    for stage in (cfg["train"]["stages"][2], cfg["train"]["post_train"], cfg["train"]["preference"]):
        stage.update(steps=2, checkpoint_interval=1, keep_checkpoints=2)
    cfg["evaluate"].update(sample_steps=2, evaluate_raw=False, heldout_clips=1, prompts=["a red square"],
                           i2v_images=[""])
    cfg["tracking"].update(root=str(tmp_path / "runs"), artifact_uri="s3://vgen/remote-run",
                           experiment="video-gen-remote")
    config = tmp_path / "remote.yaml"
    config.write_text(yaml.safe_dump(cfg))
    url = services["s3_url"]
    env = {**os.environ, "HOME": str(tmp_path / "home"), "PYTHONPATH": str(repo_root), "HF_HUB_OFFLINE": "1",
           "MLFLOW_TRACKING_URI": services["mlflow_url"], "AWS_ENDPOINT_URL": url, "MLFLOW_S3_ENDPOINT_URL": url,
           "FLYTE_AWS_ENDPOINT": url, "FLYTE_AWS_ACCESS_KEY_ID": KEY_ID, "FLYTE_AWS_SECRET_ACCESS_KEY": SECRET,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run([str(Path(sys.executable).parent / "pyflyte"), "run", "--raw-output-data-prefix",
                           "s3://vgen/flyte-raw", "workflows/pipeline.py", "train_video_model", "--config",
                           str(config)], cwd=repo_root, env=env, capture_output=True, text=True, timeout=560)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]

    sizes = {o.object_name: int(o.size or 0) for o in s3.list_objects("vgen", recursive=True)}
    runs = {n[len("remote-run/"):]: s for n, s in sizes.items() if n.startswith("remote-run/")}
    folders = {n.rsplit("/", 1)[0] for n in runs if n.endswith("/_MANIFEST.json")}
    kinds = {f.split("/")[0] for f in folders}
    assert {"curate", "compress", "train", "evaluate"} <= kinds, sorted(folders)
    for folder in folders:   # complete: every listed file there with its size; downloads verify the sha256
        listed = objectstore.read_manifest(f"s3://vgen/remote-run/{folder}")
        assert all(runs[f"{folder}/{f['path']}"] == f["size"] for f in listed["files"]), folder
    (curated,) = [f for f in folders if f.startswith("curate/")]
    names = [n for n in runs if n.startswith(curated + "/")]
    assert any(n.endswith(".mp4") for n in names) and any(n.endswith(".png") and "/images/" in n for n in names)
    assert f"{curated}/manifest.parquet" in runs
    stages = sorted(f.split("/")[1].split("-")[0] for f in folders if f.startswith("train/"))
    assert stages == ["post_train_sft", "preference_dpo", "stage3_64px"], stages
    for f in (f for f in folders if f.startswith("train/")):
        files = {n[len(f) + 1:] for n in runs if n.startswith(f + "/")}
        assert files == {"_MANIFEST.json", "latest", "metrics.jsonl", "step_00000002/model.safetensors",
                         "step_00000002/ema.safetensors", "step_00000002/meta.json"}, (f, files)
    (report,) = [f for f in folders if f.startswith("evaluate/")]
    assert {f"{report}/report.html", f"{report}/metrics.json"} <= set(runs)
    downloaded = objectstore.download_folder(f"s3://vgen/remote-run/{report}", tmp_path / "report")
    assert (Path(downloaded) / "report.html").is_file()
    raw = {n: s for n, s in sizes.items() if n.startswith("flyte-raw/")}
    assert not any("optim" in n or n.endswith(".safetensors") for n in raw), sorted(raw)[:20]
    assert sum(raw.values()) < 1 << 20, sum(raw.values())   # literals only: the folders stay where they are
    registered = [o.object_name for o in s3.list_objects("mlflow", recursive=True)]
    assert any(n.endswith("checkpoint/ema.safetensors") for n in registered)   # the version's weights, via the server
    assert not any("/optim/" in n or "/dist/" in n for n in registered)
    texts = [out] + [p.read_bytes().decode("latin-1") for p in (tmp_path / "runs").rglob("*")
                     if p.is_file() and p.stat().st_size < 1 << 22]
    assert not [t for t in texts if SECRET in t]
