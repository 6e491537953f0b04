"""Requests, limits, GPU type and image of each Flyte node, from the config's ``resources`` section.

A Flyte task's resources and image are fixed when it is registered; a node overrides them with flytekit's
``with_overrides(requests=, limits=, accelerator=, container_image=)``. The config is only known when an execution
runs, so the pipeline creates its nodes in a ``@dynamic`` (``workflows/pipeline.py``: ``run_pipeline``) and gives each
one the overrides of its kind:

    latents = compress(cfg=cfg.compress, ...).with_overrides(**overrides(cfg.resources.compress))

The task decorators carry the defaults of the same kind (``@task(..., **defaults("compress"))``: requests = limits =
``ResourcesConfig()``'s, the ImageSpec it names), so a task registered or launched on its own asks for what the tiny
config asks. Requests equal limits: a pod gets what it asked for and is never throttled below it or evicted first.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

from flytekit import Resources
from flytekit.extras.accelerators import GPUAccelerator

from common.config import LaunchConfig, ResourcesConfig, TaskResources, TrainConfig
from containers.images import IMAGES, image_for

KINDS = tuple(ResourcesConfig.__dataclass_fields__)   # curate_shard, curate_merge, ..., orchestration


def k8s_resources(r: TaskResources) -> Resources:
    """flytekit's Resources for requests and limits (a GPU count of 0 and an empty disk size are left out)."""
    return Resources(cpu=r.cpu, mem=r.memory, gpu=r.gpu or None, ephemeral_storage=r.ephemeral_storage or None)


PRIMARY = "primary"   # the container name flytekit's PodTemplate merges the task's container into


def shared_volume(launch: LaunchConfig) -> Any:
    """A flytekit ``PodTemplate`` that mounts ``train.launch.volume_claim`` at ``train.launch.mount_path`` in a task
    pod, or None when no claim is configured (local runs). Artifact folders are passed between tasks by path
    (``tasks.common.folder_ref``), so every task pod of a cluster run mounts the volume the training pods use."""
    if not launch.volume_claim:
        return None
    from flytekit import PodTemplate
    from kubernetes.client import (
        V1Container,
        V1PersistentVolumeClaimVolumeSource,
        V1PodSpec,
        V1Volume,
        V1VolumeMount,
    )

    name = "runs"
    return PodTemplate(primary_container_name=PRIMARY, pod_spec=V1PodSpec(
        containers=[V1Container(name=PRIMARY, volume_mounts=[V1VolumeMount(name=name, mount_path=launch.mount_path)])],
        volumes=[V1Volume(name=name, persistent_volume_claim=V1PersistentVolumeClaimVolumeSource(
            claim_name=launch.volume_claim))]))


def overrides(r: TaskResources, launch: Optional[LaunchConfig] = None) -> Dict[str, Any]:
    """The ``with_overrides`` arguments of a node: requests = limits, the accelerator (GPU type) when one is named,
    the full name of the image (``container_image`` must be a name; an ImageSpec's name carries its content tag)
    and, when ``launch`` names a volume claim, the pod template that mounts it (``shared_volume``)."""
    res = k8s_resources(r)
    kw: Dict[str, Any] = dict(requests=res, limits=res, container_image=image_for(r.image))
    if r.accelerator:
        kw["accelerator"] = GPUAccelerator(r.accelerator)
    template = shared_volume(launch) if launch is not None else None
    if template is not None:
        kw["pod_template"] = template
    return kw


def defaults(kind: str) -> Dict[str, Any]:
    """The decorator arguments of a task of ``kind`` (a field of ``ResourcesConfig``): its default requests = limits
    and its ImageSpec."""
    if kind not in KINDS:
        raise ValueError(f"unknown resource kind {kind!r}: use one of {', '.join(KINDS)} (common.config."
                         "ResourcesConfig)")
    r: TaskResources = getattr(ResourcesConfig(), kind)
    res = k8s_resources(r)
    return dict(requests=res, limits=res, container_image=IMAGES[r.image])


def with_launch_image(train: TrainConfig, image: Optional[str] = None) -> TrainConfig:
    """``train`` with ``launch.image`` filled in when it is empty: the CUDA image's content-derived name (the
    training pods run the same pins as the tasks). ``launch`` is not part of any training cache key."""
    import dataclasses

    if train.launch.image:
        return train
    launch: LaunchConfig = dataclasses.replace(train.launch, image=image or image_for("cuda"))
    return dataclasses.replace(train, launch=launch)
