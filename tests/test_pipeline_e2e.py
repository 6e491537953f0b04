"""End to end: `pyflyte run workflows/pipeline.py train_video_model` on the tiny config, then check MLflow.

This is the README's demo command with the run folder and Flyte cache moved into a temp dir. It runs every node
for real (curation, VAE, TorchX -> torchrun x2 -> Megatron-Core DP and TP stages, post-training, sampling,
registry). A second identical run must be a cache hit: no task body runs again and no new model version appears.
A third, the weekly retraining (new inputs, warm start, gate), runs as a remote run would: Flyte's raw outputs and
the stages' artifacts on an S3 endpoint (``make services``), checked there.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow


def _run(repo: Path, config: Path, home: Path, extra_env: dict | None = None,
         raw_prefix: str = "") -> tuple[str, float]:
    env = {**os.environ, "HOME": str(home), "PYTHONPATH": str(repo), "HF_HUB_OFFLINE": "1",
           "FLYTE_SDK_LOGGING_LEVEL": "20",   # INFO: flytekit then says where it wrote each Deck
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(extra_env or {})
    t0 = time.time()
    prefix = ["--raw-output-data-prefix", raw_prefix] if raw_prefix else []
    proc = subprocess.run([str(Path(sys.executable).parent / "pyflyte"), "run", *prefix, "workflows/pipeline.py",
                           "train_video_model", "--config", str(config)],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    return out, time.time() - t0


@pytest.fixture(scope="module")
def pipeline_run(repo_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    cfg = yaml.safe_load((repo_root / "configs/tiny.yaml").read_text())
    cfg["tracking"]["root"] = str(tmp / "runs")
    shutil.copytree(repo_root / "data/demo", tmp / "videos")   # a folder the weekly run below adds videos to
    cfg["curate"]["input_uri"] = str(tmp / "videos")
    config = tmp / "tiny.yaml"
    config.write_text(yaml.safe_dump(cfg))
    out, seconds = _run(repo_root, config, tmp / "home")
    samples = re.search(r"kept rows from .* -> (\d+) samples", out)
    return {"tmp": tmp, "config": config, "out": out, "seconds": seconds, "root": tmp / "runs",
            "samples": int(samples.group(1)) if samples else -1}


def _client(root: Path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{root / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_demo_prints_what_it_made_and_how_to_browse(pipeline_run):
    out = pipeline_run["out"]
    assert "finished" in out and "mlflow ui --backend-store-uri sqlite:///" in out
    assert "step=" in out and "loss=" in out          # training progress streamed from the torchrun workers
    assert "evaluate task creates flyte deck html" in out
    print(f"first run: {pipeline_run['seconds']:.1f} s")


def test_mlflow_parent_with_one_child_per_task(pipeline_run):
    client = _client(pipeline_run["root"])
    exp = client.get_experiment_by_name("video-gen-tiny")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    names = sorted(r.data.tags["pipeline.task"] for r in children)
    assert set(names) >= {"curate", "compress", "stage1_images", "stage2_lowres", "stage3_64px", "post_train_sft",
                          "preference_pairs",
                          "preference_dpo", "evaluate", "register"} and len(names) == len(set(names))
    assert all(r.info.status == "FINISHED" for r in children)
    by_name = {r.data.tags["pipeline.task"]: r for r in children}
    # loss logged every step by rank 0 of each stage
    cfg = yaml.safe_load(pipeline_run["config"].read_text())["train"]
    for stage in cfg["stages"] + [cfg["post_train"], cfg["preference"]]:
        stage, steps = stage["name"], stage["steps"]
        hist = client.get_metric_history(by_name[stage].info.run_id, "loss")
        assert sorted(m.step for m in hist) == list(range(1, steps + 1)), stage
    ev = by_name["evaluate"]   # the EMA weights under eval.*, the raw ones under eval.raw.*; no champion yet
    assert ev.data.metrics["eval.heldout_flow_loss"] > 0 and "eval.raw.heldout_flow_loss" in ev.data.metrics
    assert "eval.temporal_flickering" in ev.data.metrics and ev.data.tags["eval.suite_hash"]
    assert ev.data.tags["eval.champion_version"] == "" and not any(k.startswith("delta.") for k in ev.data.metrics)
    arts = [a.path for a in client.list_artifacts(ev.info.run_id, "samples/candidate")]
    assert any(a.endswith(".mp4") for a in arts)
    cur = by_name["curate"].data.metrics
    assert cur["inputs"] == cur["kept"] + cur["rejected"] + cur["failed"] and cur["failed"] >= 2


def test_registered_version_has_alias_and_lineage(pipeline_run):
    client = _client(pipeline_run["root"])
    mv = client.get_model_version_by_alias("video-dit-tiny", "candidate")
    for tag in ("config_hash", "checkpoint_hash", "data.latents_hash", "data.manifest_hash", "data.sources_hash",
                "eval.suite_hash", "eval.metrics_json"):
        assert mv.tags.get(tag), tag
    # the first version is also the champion (no gate yet), and it keeps the weights, not the optimizer state
    assert client.get_model_version_by_alias("video-dit-tiny", "champion").version == mv.version
    assert "first model" in mv.tags["gate.decision"] and mv.tags["gate.promoted"] == "True"
    files = {a.path for a in client.list_artifacts(mv.run_id, "checkpoint")}
    assert files == {"checkpoint/model.safetensors", "checkpoint/ema.safetensors", "checkpoint/meta.json"}
    import mlflow

    uri = f"sqlite:///{pipeline_run['root'] / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)   # earlier tests in this process may have pointed the registry elsewhere
    from tasks.register.registry import load_registered_dit  # the weights only: no pickled model is logged

    model = load_registered_dit("models:/video-dit-tiny@candidate", pipeline_run["tmp"] / "loaded")
    assert sum(p.numel() for p in model.parameters()) > 0


def test_curriculum_stages_chain_and_train_on_their_data(pipeline_run):
    """Each stage starts from the previous one's weights and reads only its selection: images at 32px and 64px,
    then 32px 9-frame clips with 32px images, then 64px 17-frame clips (tokens per sample and resolution counts in
    MLflow; the selection and its buckets as tags)."""
    arts = pipeline_run["root"] / "artifacts" / "train"
    jobs = {p.name.split("-")[0]: json.loads((p / "job.json").read_text()) for p in arts.iterdir()
            if (p / "job.json").exists()}
    assert jobs["stage1_images"]["init_checkpoint"] == ""
    assert "stage1_images" in jobs["stage2_lowres"]["init_checkpoint"]
    assert "stage2_lowres" in jobs["stage3_64px"]["init_checkpoint"]
    assert "stage3_64px" in jobs["post_train_sft"]["init_checkpoint"]
    client = _client(pipeline_run["root"])
    exp = client.get_experiment_by_name("video-gen-tiny")
    runs = {r.data.tags.get("pipeline.task"): r for r in client.search_runs([exp.experiment_id])}
    buckets = {s: json.loads(runs[s].data.tags["stage.data_buckets"]) for s in ("stage1_images", "stage2_lowres",
                                                                                 "stage3_64px", "post_train_sft")}
    assert set(buckets["stage1_images"]) == {"32pxx1", "64pxx1"}
    assert set(buckets["stage2_lowres"]) == {"32pxx1", "32pxx9"}
    assert set(buckets["stage3_64px"]) == {"64pxx17"} and set(buckets["post_train_sft"]) <= {"64pxx17", "64pxx9"}
    rows = {s: [json.loads(ln) for ln in (arts / jobs_dir).joinpath("metrics.jsonl").read_text().splitlines()]
            for s, jobs_dir in ((p.name.split("-")[0], p.name) for p in arts.iterdir() if (p / "job.json").exists())}
    # video tokens per sample: 64px image 16, 32px image 4, 32px 9-frame clip 2 x 4 = 8, 64px 17-frame clip 3 x 16
    assert all(4.0 <= r["tokens_per_sample"] <= 16.0 for r in rows["stage1_images"])   # 2 DP ranks: 2 buckets
    assert min(sum(r[f"res_{n}"] for r in rows["stage1_images"]) for n in ("32px", "64px")) > 0   # both trained
    assert all(4.0 <= r["tokens_per_sample"] <= 8.0 for r in rows["stage2_lowres"])
    assert {r["tokens_per_sample"] for r in rows["stage3_64px"]} <= {48.0, 16.0}   # t2i on a clip: frame 0 alone


def test_identical_rerun_is_a_cache_hit(pipeline_run, repo_root):
    out, seconds = _run(repo_root, pipeline_run["config"], pipeline_run["tmp"] / "home")
    trained = re.search(r"\] step=\d+ loss=", out)   # a training progress line ("Checkpoint(step=30)" reprs are not)
    assert "[curate]" not in out and not trained and "[evaluate]" not in out, out[-3000:]
    assert "every task was a cache hit" in out
    client = _client(pipeline_run["root"])
    versions = client.search_model_versions("name='video-dit-tiny'")
    assert len(versions) == 1
    exp = client.get_experiment_by_name("video-gen-tiny")
    parents = [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, "a fully cached rerun must not leave an empty parent run"
    print(f"cached rerun: {seconds:.1f} s")


def test_mlflow_experiment_and_parent_run_as_a_user_browses_them(pipeline_run):
    client = _client(pipeline_run["root"])
    exp = client.get_experiment_by_name("video-gen-tiny")
    assert exp.tags.get("mlflow.experimentKind") == "custom_model_development"
    (parent,) = [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.run_name.startswith("tiny manual ")
    assert len(parent.data.tags["mlflow.source.git.commit"]) >= 40
    children = {r.data.tags["pipeline.task"]: r for r in client.search_runs([exp.experiment_id])
                if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    inputs = {name: [(d.dataset.name, [t.value for t in d.tags]) for d in r.inputs.dataset_inputs]
              for name, r in children.items()}
    assert inputs["curate"] == [("raw-inputs", ["curation"])] and inputs["compress"] == [("clip-manifest",
                                                                                         ["compression"])]
    assert inputs["stage1_images"] == [("latents", ["training"])]
    models = client.search_logged_models(experiment_ids=[exp.experiment_id])
    stage_run = children["stage1_images"]
    assert stage_run.data.tags["stage.data"] == "resolutions 32px, 64px; frames 1; every aspect"
    (stage_model,) = [m for m in models if m.source_run_id == stage_run.info.run_id]
    assert stage_model.name == "stage1_images" and stage_model.tags["checkpoint"].endswith("step_00000012")
    assert [o.model_id for o in stage_run.outputs.model_outputs] == [stage_model.model_id]
    assert {m.key for m in stage_model.metrics} == {"final_loss"}


def test_failed_execution_marks_its_parent_run_failed(pipeline_run, repo_root):
    """A run whose curation input folder is gone fails after its parent run started: the failure handler closes
    the parent run as FAILED with the error."""
    cfg = yaml.safe_load(pipeline_run["config"].read_text())
    cfg["tracking"]["root"] = str(pipeline_run["tmp"] / "runs-failed")
    cfg["curate"]["input_uri"] = str(pipeline_run["tmp"] / "no-such-folder")
    config = pipeline_run["tmp"] / "broken.yaml"
    config.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "HOME": str(pipeline_run["tmp"] / "home"), "PYTHONPATH": str(repo_root), "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([str(Path(sys.executable).parent / "pyflyte"), "run", "workflows/pipeline.py",
                           "train_video_model", "--config", str(config)], cwd=repo_root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    client = _client(pipeline_run["tmp"] / "runs-failed")
    exp = client.get_experiment_by_name("video-gen-tiny")
    parents = [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" not in r.data.tags]
    assert [r.info.status for r in parents] == ["FAILED"], proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "no-such-folder" in parents[0].data.tags["pipeline.failure"]


KEY_ID, SECRET = "AKIAVGENE2EKEY4R7T", "vgenE2eSecret/Never+Written+5c2a"   # grepped for in what run 2 wrote


@pytest.fixture(scope="module")
def weekly_run(pipeline_run, repo_root):
    """The scheduled retraining, simulated: run 1 was ``pipeline_run``; one good and one corrupt video are added,
    and run 2 uses the weekly config (the image and low-resolution stages skipped, the 64px stage warm-started from
    the champion) as a remote run would: Flyte's raw-output prefix and ``tracking.artifact_uri`` on an S3 endpoint
    and the runs on an MLflow tracking server (``make services``, its SQLite backend the database of run 1), with
    distinctive credentials. The endpoint's objects are listed before the services stop."""
    from common.objectstore import read_manifest
    from common.storage import s3_client
    from helpers import running_services
    from tasks.curate.synthetic import SceneSpec, make_scenes_video

    tmp = pipeline_run["tmp"]
    make_scenes_video(tmp / "videos" / "weekly_new.mp4", [SceneSpec("texture", 40, seed=21)])
    (tmp / "videos" / "weekly_new.txt").write_text("a new textured square drifting\n")
    (tmp / "videos" / "weekly_broken.mp4").write_bytes(b"\x00not a video" * 50)
    cfg = yaml.safe_load(pipeline_run["config"].read_text())
    cfg["train"]["stages"][0]["skip"] = True
    cfg["train"]["stages"][1]["skip"] = True
    cfg["train"]["stages"][2]["init"] = "champion"
    cfg["tracking"]["artifact_uri"] = "s3://vgen/weekly"
    config = tmp / "weekly.yaml"
    config.write_text(yaml.safe_dump(cfg))
    folder = pipeline_run["root"]   # the server's backend: <folder>/mlflow.db, run 1's database
    with running_services(folder, KEY_ID, SECRET) as state:
        url = state["s3_url"]
        out, seconds = _run(repo_root, config, tmp / "home", raw_prefix="s3://vgen/flyte-raw", extra_env={
            "AWS_ENDPOINT_URL": url, "FLYTE_AWS_ENDPOINT": url, "FLYTE_AWS_ACCESS_KEY_ID": KEY_ID,
            "FLYTE_AWS_SECRET_ACCESS_KEY": SECRET, "MLFLOW_TRACKING_URI": state["mlflow_url"],
            "MLFLOW_S3_ENDPOINT_URL": url})
        objects = {o.object_name: int(o.size or 0) for o in s3_client().list_objects("vgen", recursive=True)}
        manifests = {n.rsplit("/", 1)[0]: read_manifest(f"s3://vgen/{n.rsplit('/', 1)[0]}") for n in objects
                     if n.startswith("weekly/") and n.endswith("/_MANIFEST.json")}
    server_log = (folder / "mlflow.log").read_text()
    return {"out": out, "seconds": seconds, "objects": objects, "manifests": manifests, "server_log": server_log}


def test_weekly_run_outputs_are_in_object_storage(pipeline_run, weekly_run):
    """Every artifact a remote run needs is in object storage, complete (manifest last, every listed file there with
    its size): the clip manifest with its clips and images, the latents, each stage's exported weights (never
    optimizer state or older steps), the evaluation report; Flyte's raw-output prefix holds only small literals
    (artifact folders are passed by path); the runs went through the tracking server; and no file, log or output of
    the run holds the test secret."""
    objects, manifests = weekly_run["objects"], weekly_run["manifests"]
    assert "/api/2.0/mlflow/runs/create" in weekly_run["server_log"], weekly_run["server_log"][-2000:]
    kinds = {f.split("/")[1] for f in manifests}
    assert {"curate", "compress", "train", "evaluate"} <= kinds, sorted(manifests)
    for folder, listed in manifests.items():
        assert all(objects[f"{folder}/{f['path']}"] == f["size"] for f in listed["files"]), folder
    (curated,) = [f for f in manifests if f.startswith("weekly/curate/")]
    names = [n for n in objects if n.startswith(curated + "/")]
    assert f"{curated}/manifest.parquet" in objects and any(n.endswith(".mp4") for n in names)
    assert any("/images/" in n and n.endswith(".png") for n in names)
    steps = {"stage3_64px": 12, "post_train_sft": 10, "preference_dpo": 8}
    trained = sorted(f for f in manifests if f.startswith("weekly/train/"))
    assert sorted(f.split("/")[2].split("-")[0] for f in trained) == sorted(steps), trained
    for f in trained:
        step = f"step_{steps[f.split('/')[2].split('-')[0]]:08d}"
        assert {x["path"] for x in manifests[f]["files"]} == {
            "latest", "metrics.jsonl", f"{step}/model.safetensors", f"{step}/ema.safetensors", f"{step}/meta.json"}, f
    (report,) = [f for f in manifests if f.startswith("weekly/evaluate/")]
    assert {f"{report}/report.html", f"{report}/metrics.json"} <= set(objects)
    raw = {n: s for n, s in objects.items() if n.startswith("flyte-raw/")}
    assert not any("optim" in n or n.endswith(".safetensors") for n in raw), sorted(raw)[:20]
    assert sum(raw.values()) < 1 << 20, sum(raw.values())   # literals only: the folders stay where they are
    root = pipeline_run["root"]
    texts = [weekly_run["out"]] + [p.read_bytes().decode("latin-1") for p in root.rglob("*")
                                   if p.is_file() and p.stat().st_size < 1 << 22]
    assert not [t for t in texts if SECRET in t]


def test_weekly_run_is_incremental_warm_started_gated_and_traceable(pipeline_run, weekly_run, repo_root):
    out, root = weekly_run["out"], pipeline_run["root"]
    print(f"weekly run: {weekly_run['seconds']:.1f} s")
    # curation processed only the two new inputs; the corrupt one is a failed input, not a crash
    assert "weekly_new.mp4: processed" in out and "weekly_broken.mp4: processed (not a video" in out
    assert "synthetic_a.mp4: reused stored result" in out
    # the VAE fitted by run 1 is reused; compress encodes only the new clips (the others come from the latent store)
    assert "[fit_vae]" not in out or "reusing the VAE" in out
    store = re.search(r"latent store .*: (\d+) samples from the store, (\d+) to encode", out)
    assert store, out[-3000:]
    assert int(store.group(1)) == pipeline_run["samples"] and int(store.group(2)) >= 1
    # stages 1-2 skipped, stage 3 warm-started from version 1 (the champion by default after run 1)
    assert "stage1_images: skipped" in out and "stage2_lowres: skipped" in out
    assert "stage3_64px: warm start from models:/video-dit-tiny/1" in out
    client = _client(root)
    versions = sorted(client.search_model_versions("name='video-dit-tiny'"), key=lambda v: int(v.version))
    assert [str(v.version) for v in versions] == ["1", "2"]
    v2 = client.get_model_version("video-dit-tiny", "2")
    assert v2.tags["eval.champion_version"] == "1" and v2.tags["gate.promoted"] in ("True", "False")
    assert v2.tags["gate.decision"].startswith(("promoted", "not promoted"))
    champion = str(client.get_model_version_by_alias("video-dit-tiny", "champion").version)
    assert champion == ("2" if v2.tags["gate.promoted"] == "True" else "1")
    # lineage: version 2 lists exactly the union of both runs' sources; the new video finds version 2 only
    from common import lineage

    doc1, doc2 = (lineage.lineage_of(client, f"models:/video-dit-tiny/{v}") for v in ("1", "2"))
    uris1, uris2 = {s["uri"] for s in doc1["sources"]}, {s["uri"] for s in doc2["sources"]}
    new = {str(pipeline_run["tmp"] / "videos" / n) for n in ("weekly_new.mp4", "weekly_broken.mp4")}
    assert uris2 == uris1 | new and not uris1 & new
    hits = lineage.versions_using(client, str(pipeline_run["tmp"] / "videos" / "weekly_new.mp4"))
    assert [h["model"]["version"] for h in hits] == ["2"]
    assert [c["stage"] for c in doc2["checkpoints"]] == ["stage3_64px", "post_train_sft", "preference_dpo"]
