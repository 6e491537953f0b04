"""Offline registration check: `pyflyte package` serialises the workflow, its tasks (each with the content-tagged name
of its image, as fast registration computes it) and the weekly launch plan."""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path


def test_pyflyte_package_serialises_dag_and_schedule(repo_root, tmp_path):
    out = tmp_path / "pkg.tgz"
    env = {**os.environ, "PYTHONPATH": str(repo_root), "HOME": str(tmp_path)}
    proc = subprocess.run([str(Path(sys.executable).parent / "pyflyte"), "--pkgs", "workflows", "package",
                           "--copy", "auto", "-o", str(out), "--force"],
                          cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from flyteidl.admin import launch_plan_pb2, task_pb2

    with tarfile.open(out) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    lp_name = next(n for n in members if "train_video_model_weekly" in n)
    lp = launch_plan_pb2.LaunchPlan()
    lp.ParseFromString(members[lp_name])
    assert lp.spec.entity_metadata.schedule.cron_schedule.schedule == "0 3 * * 1"
    assert lp.spec.entity_metadata.schedule.kickoff_time_input_arg == "kickoff_time"   # recorded in MLflow
    tasks = {}
    for name, blob in members.items():
        if name.endswith("_1.pb"):   # pyflyte package names files <n>_<entity>_<1 task | 2 workflow | 3 launch plan>
            t = task_pb2.TaskSpec()
            t.ParseFromString(blob)
            tasks[t.template.id.name] = t.template
    for cached in ("tasks.curate.task.curate", "tasks.compress.task.compress", "tasks.train.task.train_stage",
                   "tasks.train.task.post_train", "tasks.evaluate.task.evaluate", "tasks.register.task.register"):
        meta = tasks[cached].metadata
        assert meta.discoverable and len(meta.discovery_version) == 12, cached
        assert "parent_run" in list(meta.cache_ignore_input_vars), cached
    from containers.images import image_for

    assert "workflows.pipeline.run_pipeline" in tasks   # the @dynamic that applies resources.* to the nodes
    images = {name: t.container.image for name, t in tasks.items()}
    assert set(images.values()) == {image_for("cpu")}, images   # the tiny defaults: CPU image everywhere
    evaluate = {r.name: r.value for r in tasks["tasks.evaluate.task.evaluate"].container.resources.limits}
    assert evaluate == {1: "2", 3: "4Gi"}   # ResourcesConfig().evaluate: requests = limits (CPU, MEMORY)
