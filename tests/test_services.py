"""The remote-run services for real: an ``mlflow server`` process (SQLite backend, artifacts on an S3 endpoint:
moto's server, as ``make services`` runs them) that goes down while a training stage logs per-step metrics and
comes back on the same port and backend; and a credentials audit of everything the storage and tracking paths
wrote (files, logs, S3 objects, MLflow params, tags, artifacts, registry)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)

KEY_ID = "AKIAVGENTESTKEY7Q3Z"                   # distinctive: grepped for in everything written
SECRET = "vgenTestSecret/Do+Not+Leak+9f3e1c"
BUCKET = "mlflow"   # common.services.BUCKETS[0]: MLflow's artifacts


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    """``make services`` (common.services.start) in a temp folder on free ports, with distinctive credentials."""
    from helpers import running_services

    folder = tmp_path_factory.mktemp("services")
    with running_services(folder, KEY_ID, SECRET) as state:
        yield {"folder": folder, "s3_url": state["s3_url"], "mlflow_url": state["mlflow_url"]}


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

