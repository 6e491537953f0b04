"""``python -m common.lineage``: from a registered model version to its raw inputs, and from a raw input to the model
versions trained on it, through a real MLflow store (SQLite) and registry."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from common import lineage


def _register(client, name: str, version_sources, manifest_folder: str) -> str:
    import mlflow

    exp = client.get_experiment_by_name("lin") or client.get_experiment(client.create_experiment("lin"))
    with mlflow.start_run(experiment_id=exp.experiment_id) as run:
        sources = [{"uri": u, "hash": h, "status": "kept", "clips": 1} for u, h in version_sources]
        doc = lineage.build_lineage(
            model={"name": name}, execution={"flyte_execution": "local", "parent_run": "p", "config_hash": "c",
                                             "config_name": "tiny", "git_commit": "abc", "code_versions": {"t": "1"}},
            checkpoints=[{"stage": "s1", "step": 3, "content_hash": f"ck-{run.info.run_id[:6]}", "parent_hash": ""}],
            latents={"content_hash": "lat" * 8, "num_train": 3, "num_val": 1},
            manifest={"content_hash": "man", "folder": manifest_folder, "inputs": len(sources), "kept": len(sources),
                      "rejected": 0, "failed": 0},
            sources=sources)
        lineage.log_lineage(doc)
        if not client.search_registered_models(f"name='{name}'"):
            client.create_registered_model(name)
        mv = client.create_model_version(name, source=f"runs:/{run.info.run_id}/lineage", run_id=run.info.run_id)
    return str(mv.version)


@pytest.fixture
def store(tmp_path, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    manifest = tmp_path / "manifest"
    manifest.mkdir()
    pd.DataFrame([{"clip_id": "c1", "source_uri": "s3://b/a.mp4", "source_hash": "aaaa1111bbbb2222", "status": "kept",
                   "reason": "", "bucket": "64x64x17"},
                  {"clip_id": "", "source_uri": "s3://b/bad.mp4", "source_hash": "", "status": "failed",
                   "reason": "empty file", "bucket": ""}]).to_parquet(manifest / "manifest.parquet")
    v1 = _register(client, "m", [("s3://b/a.mp4", "aaaa1111bbbb2222")], str(manifest))
    v2 = _register(client, "m", [("s3://b/a.mp4", "aaaa1111bbbb2222"), ("s3://b/new.mp4", "cccc3333dddd4444")],
                   str(manifest))
    client.set_registered_model_alias("m", "champion", v2)
    return client, v1, v2


def test_forward_query_prints_the_chain_and_json(store, capsys):
    client, v1, v2 = store
    assert lineage.main(["models:/m@champion"]) == 0
    out = capsys.readouterr().out
    assert f"model m version {v2} (aliases: champion)" in out and "s3://b/new.mp4" in out and "checkpoint s1" in out
    assert lineage.main([f"models:/m/{v1}", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [s["uri"] for s in doc["sources"]] == ["s3://b/a.mp4"] and doc["counts"]["sources"] == 1


def test_reverse_query_finds_exactly_the_versions_trained_on_a_source(store, capsys):
    client, v1, v2 = store
    hits = lineage.versions_using(client, "s3://b/new.mp4")
    assert [h["model"]["version"] for h in hits] == [v2]
    assert [h["model"]["version"] for h in lineage.versions_using(client, "aaaa1111")] == [v1, v2]   # hash prefix
    assert lineage.main(["--source", "s3://b/a.mp4", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert [c["clip_id"] for c in res["used_by"][0]["clips"]] == ["c1"]
    assert lineage.main(["--source", "s3://b/never.mp4"]) == 0
    assert "no registered model version lists" in capsys.readouterr().out


def test_bad_queries_are_clear(store, capsys):
    assert lineage.main(["models:/m@nope"]) == 2
    assert "no such model or alias" in capsys.readouterr().err
    assert lineage.main(["m@champion"]) == 2
    assert "expected models:/<name>@<alias>" in capsys.readouterr().err
