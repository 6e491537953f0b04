"""The cluster path, offline: resources from the config reach the Flyte nodes, the images are content-tagged, and the
Volcano job of the 10B config's first stage is valid Kubernetes (checked against the official client's models)."""
from __future__ import annotations

import re
from typing import Any

import pytest

from common.config import PipelineConfig, TaskResources, from_dict, load_config
from containers.images import image_for, locked_packages
from trainer.job import StageJob

MLFLOW = "http://mlflow.video-gen.svc:5000"


def strict(data: Any, klass: str, path: str = "") -> None:
    """``data`` (JSON as sent to the API server) against the kubernetes client's model ``klass``: every key must be a
    field of the model, every value of the field's type, recursively; required fields must be present (the model's
    own constructor checks those)."""
    from kubernetes import client

    m = re.fullmatch(r"list\[(.+)\]", klass)
    if m:
        assert isinstance(data, list), f"{path}: expected a list, got {type(data).__name__}"
        for i, item in enumerate(data):
            strict(item, m.group(1), f"{path}[{i}]")
        return
    m = re.fullmatch(r"dict[(\[]str, (.+)[)\]]", klass)
    if m:
        assert isinstance(data, dict), f"{path}: expected a mapping, got {type(data).__name__}"
        for k, v in data.items():
            assert isinstance(k, str), f"{path}: key {k!r} is not a string"
            strict(v, m.group(1), f"{path}.{k}")
        return
    prim: dict[str, Any] = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object}
    if klass in prim:
        assert isinstance(data, prim[klass]) and not (klass == "int" and isinstance(data, bool)), \
            f"{path}: expected {klass}, got {type(data).__name__} ({data!r})"
        return
    model = getattr(client, klass, None)
    assert model is not None, f"{path}: no kubernetes client model {klass!r}"
    assert isinstance(data, dict), f"{path}: expected a {klass} mapping, got {type(data).__name__}"
    by_json = {v: k for k, v in model.attribute_map.items()}
    unknown = sorted(set(data) - set(by_json))
    assert not unknown, f"{path}: {klass} has no field {unknown[0]!r}"
    for key, value in data.items():
        if value is not None:
            strict(value, model.openapi_types[by_json[key]], f"{path}.{key}")
    # the model's constructor rejects missing required fields and enum values it knows
    client.ApiClient().deserialize(type("R", (), {"data": __import__("json").dumps(data)})(), klass)


def volcano_job_is_valid(job: dict) -> None:
    """The Volcano wrapper by hand (not a core Kubernetes model), every pod template with ``strict``."""
    assert job["apiVersion"] == "batch.volcano.sh/v1alpha1" and job["kind"] == "Job"
    assert set(job) == {"apiVersion", "kind", "metadata", "spec"}
    strict(job["metadata"], "V1ObjectMeta", "metadata")
    assert set(job["spec"]) <= {"schedulerName", "queue", "tasks", "maxRetry", "plugins", "priorityClassName",
                                "minAvailable", "policies", "volumes", "ttlSecondsAfterFinished"}
    for i, task in enumerate(job["spec"]["tasks"]):
        assert set(task) <= {"replicas", "name", "template", "maxRetry", "policies", "minAvailable"}
        strict(task["template"], "V1PodTemplateSpec", f"spec.tasks[{i}].template")


@pytest.fixture(scope="module")
def mugv_job() -> tuple[PipelineConfig, dict]:
    from tasks.resources import with_launch_image
    from trainer.launch import dryrun_kubernetes

    cfg = load_config("configs/mugv_10b.yaml")
    train = with_launch_image(cfg.train)
    stage = train.stages[0]
    job_path = f"{train.launch.mount_path}/artifacts/train/{stage.name}-0123456789abcdef/job.json"
    return cfg, dryrun_kubernetes(job_path, train.launch, stage.nnodes, stage.nproc_per_node, MLFLOW)


def test_10b_first_stage_volcano_job_is_valid_kubernetes(mugv_job):
    cfg, job = mugv_job
    launch = cfg.train.launch
    volcano_job_is_valid(job)
    tasks = job["spec"]["tasks"]
    assert len(tasks) == cfg.train.stages[0].nnodes == 16
    for task in tasks:
        spec = task["template"]["spec"]
        (container,) = spec["containers"]
        assert container["image"] == image_for("cuda") and not container["image"].endswith(":latest")
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"]
                  if "persistentVolumeClaim" in v}
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert [mounts[n] for n, c in claims.items() if c == "video-gen-runs"] == ["/mnt/runs"]
        env = {e["name"]: e for e in container["env"]}
        assert env["MLFLOW_TRACKING_URI"]["value"] == MLFLOW
        assert env["AWS_ENDPOINT_URL"]["value"] == launch.s3_endpoint_url
        for s in launch.secret_env:   # credentials only as references to Kubernetes secrets
            assert "value" not in env[s.env]
            assert env[s.env]["valueFrom"]["secretKeyRef"] == {"name": s.secret, "key": s.key, "optional": False}
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
        assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}   # train.launch.accelerator
        assert "--job /mnt/runs/artifacts/train/" in " ".join(container["command"])


def test_the_readme_pod_template_mounts_the_training_claim_for_the_flyte_pods():
    """README "Running on a cluster": the PodTemplate that gives the Flyte task pods the shared volume is a valid
    Kubernetes PodTemplate and mounts the 10B config's claim at its mount path."""
    from pathlib import Path

    import yaml

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (doc,) = [d for d in map(yaml.safe_load, re.findall(r"```yaml\n(.*?)```", readme, re.S)) if d.get("kind") ==
              "PodTemplate"]
    strict(doc, "V1PodTemplate")
    launch = load_config("configs/mugv_10b.yaml").train.launch
    spec = doc["template"]["spec"]
    (container,) = spec["containers"]
    assert container["name"] == "default"   # the name Flyte merges into every container it builds
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"]}
    assert [(claims[m["name"]], m["mountPath"]) for m in container["volumeMounts"]] == [
        (launch.volume_claim, launch.mount_path)]
    assert f"default-pod-template-name: {doc['metadata']['name']}" in readme


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c.update(volumeMountz=[]), "has no field 'volumeMountz'"),
    (lambda c: c["env"][0].update(value=3), "expected str, got int"),
    (lambda c: c["env"][-1]["valueFrom"].update(secretKeyRef="video-gen-s3"), "expected a V1SecretKeySelector"),
    (lambda c: c.pop("name"), "name"),
])
def test_the_kubernetes_check_rejects_unknown_fields_and_wrong_types(mugv_job, mutate, message):
    import copy

    template = copy.deepcopy(mugv_job[1]["spec"]["tasks"][0]["template"])
    mutate(template["spec"]["containers"][0])
    with pytest.raises((AssertionError, ValueError), match=re.escape(message)):
        strict(template, "V1PodTemplateSpec")


def test_job_files_and_pods_carry_no_credentials(tmp_path):
    from trainer.launch import dryrun_kubernetes

    with pytest.raises(ValueError, match=r"carries credentials .*https://mlflow\.example:5000"):
        StageJob(latents_dir="l", output_dir="o", mlflow_tracking_uri="https://bob:s3cret@mlflow.example:5000",
                 mlflow_run_id="r")
    launch = from_dict(PipelineConfig, {"train": {"launch": {"scheduler": "kubernetes", "image": "r/i:abc"}}})
    with pytest.raises(ValueError, match="MLFLOW_TRACKING_TOKEN in a Kubernetes secret"):
        dryrun_kubernetes("/mnt/shared/j/job.json", launch.train.launch, 1, 1, "http://u:p@mlflow:5000")
    with pytest.raises(ValueError, match="job_path must lie on the shared volume"):
        from common.config import LaunchConfig

        dryrun_kubernetes("/elsewhere/job.json", LaunchConfig(scheduler="kubernetes", image="r/i:abc",
                                                              volume_claim="runs", mount_path="/mnt/runs"), 1, 1)


@pytest.mark.parametrize("data, message", [
    ({"resources": {"evaluate": {"gpu": 1}}}, "resources.evaluate: gpu: 1 needs image: cuda"),
    ({"resources": {"compress": {"memory": "lots"}}}, "resources.compress: memory must be a positive Kubernetes"),
    ({"resources": {"register": {"accelerator": "nvidia-h100"}}}, "resources.register: accelerator 'nvidia-h100'"),
    ({"resources": {"trainer": {}}}, "resources.trainer: unknown config key"),
    ({"train": {"launch": {"image": "ghcr.io/video-gen/trainer:latest"}}}, "train.launch.image must name a fixed tag"),
    ({"train": {"launch": {"secret_env": [{"env": "A", "secret": "Bad_Name"}]}}},
     "secret must be a Kubernetes Secret name"),
    ({"train": {"launch": {"gpu": 8, "accelerator": "NVIDIA H100 80GB HBM3"}}},
     "train.launch.accelerator must be a node label value (at most 63 letters, digits, '-', '_', '.'; no spaces), "
     "as `kubectl get nodes -L nvidia.com/gpu.product` shows it, e.g. NVIDIA-H100-80GB-HBM3"),
    ({"train": {"launch": {"accelerator": "NVIDIA-H100-80GB-HBM3"}}}, "train.launch.gpu is 0: set gpu"),
    ({"train": {"launch": {"gpu": 8, "accelerator": "a", "accelerator_label": "gpu type"}}},
     "train.launch.accelerator_label must be a node label key"),
])
def test_cluster_config_errors_name_the_key(data, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        from_dict(PipelineConfig, data)


def test_images_install_the_lock_and_are_tagged_by_content(tmp_path):
    from containers.images import cpu_image, cuda_image

    pins = locked_packages()
    assert cpu_image.packages == cuda_image.packages == ["torch==2.13.0", *pins]
    for kind in ("cpu", "cuda"):
        name = image_for(kind)
        assert re.fullmatch(r"[\w.-]+/video-gen/video-gen-%s:[\w-]{20,}" % kind, name), name
    bad = tmp_path / "requirements.lock"
    bad.write_text("numpy>=2\n")
    with pytest.raises(ValueError, match=r"requirements.lock:1: every line must be an exact pin"):
        locked_packages(bad)


def test_the_10b_config_reaches_the_nodes_of_the_dynamic_dag():
    """``run_pipeline`` compiled as Flyte compiles it in the pod (a DynamicJobSpec): every node carries the requests,
    limits, GPU type and image of its kind from the 10B config, and a pod template that mounts the shared volume
    (train.launch.volume_claim) where the artifact folders it is passed by path live."""
    from flytekit.configuration import ImageConfig, SerializationSettings
    from flytekit.core.context_manager import ExecutionState, FlyteContextManager
    from flytekit.core.type_engine import TypeEngine
    from kubernetes import client

    from tasks.resources import overrides
    from workflows.pipeline import run_pipeline

    cfg = load_config("configs/mugv_10b.yaml")
    settings = SerializationSettings(project="p", domain="d", version="v",
                                     image_config=ImageConfig.auto_default_image())
    ctx = FlyteContextManager.current_context().with_serialization_settings(settings)
    with FlyteContextManager.with_context(ctx) as ctx:
        state = ctx.execution_state.with_params(mode=ExecutionState.Mode.TASK_EXECUTION)
        with FlyteContextManager.with_context(ctx.with_execution_state(state)) as ctx:
            inputs = TypeEngine.dict_to_literal_map(ctx, {"cfg": cfg, "run": "r"}, run_pipeline.python_interface.inputs)
            spec = run_pipeline.dispatch_execute(ctx, inputs)
    kind = {"plan_curation": "orchestration", "snapshot_inputs": "orchestration", "curate": "curate_merge",
            "fit_vae": "fit_vae", "compress": "compress", "pretrain": "orchestration", "post_train": "train_launcher",
            "preference": "train_launcher", "build_preference_pairs": "preference_pairs", "evaluate": "evaluate",
            "register": "register", "current_champion": "orchestration", "finish_tracking": "orchestration"}
    seen = set()
    for node in spec.nodes:
        name = node.task_node.reference_id.name.rsplit(".", 1)[-1] if node.task_node else "map"
        if name not in kind:
            continue
        want: TaskResources = getattr(cfg.resources, kind[name])
        o = node.task_node.overrides
        limits = {r.name: r.value for r in o.resources.limits}
        assert o.container_image == overrides(want)["container_image"], name
        assert limits[1] == want.cpu and limits[3] == want.memory, name   # ResourceName.CPU, MEMORY
        assert (o.extended_resources.gpu_accelerator.device if want.accelerator else "") == want.accelerator, name
        pod = client.ApiClient().sanitize_for_serialization(o.pod_template.pod_spec)   # the shared volume: every node
        strict(pod, "V1PodSpec")
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]}
        mounts = [(claims[m["name"]], m["mountPath"]) for c in pod["containers"] for m in c["volumeMounts"]]
        assert mounts == [(cfg.train.launch.volume_claim, cfg.train.launch.mount_path)], name
        assert o.pod_template.primary_container_name == pod["containers"][0]["name"], name
        seen.add(name)
    assert seen >= {"compress", "evaluate", "register", "post_train", "curate"}
