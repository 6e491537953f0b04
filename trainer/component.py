"""TorchX component for one training stage: ``nnodes`` replicas of torchrun, each starting ``nproc_per_node``
``trainer.train`` workers on the same job file.

    from trainer.component import stage_app
    app = stage_app("runs/stage1/job.json", nnodes=1, nproc_per_node=2)        # a specs.AppDef

Rendezvous: c10d on ``<rank-0 host>:rdzv_port``. With one node the host is ``localhost``; with several it is the
shell expansion of TorchX's ``rank0_env`` macro (the scheduler fills in the name of the variable that holds replica
0's address; ``localhost`` when unset, as on replica 0 of some schedulers), so the role runs under ``bash -c``.

Environment: ``OMP_NUM_THREADS = max(1, cpu // nproc_per_node)`` unless ``env`` sets it, so the workers of one
node share its CPUs instead of each starting ``cpu`` threads (torchrun would otherwise force 1);
``PYTHONUNBUFFERED=1`` so every loss line reaches the log as it is printed; ``LOGLEVEL=WARNING`` keeps torchrun quiet;
``CUDA_DEVICE_MAX_CONNECTIONS=1`` with GPUs (megatron's TP layers expect it, docs/mugv.md §6.3).

Shared volume: ``volume_claim`` names a PersistentVolumeClaim that every replica mounts at ``mount_path``
(``specs.VolumeMount``; TorchX's kubernetes scheduler turns it into the pod's volume), where the job file, the latents
and the checkpoints live. Credentials never go through here: ``trainer.launch`` adds them to the generated pods as
``secretKeyRef`` variables.
"""
from __future__ import annotations

import re
import shlex
from typing import Dict, List, Optional

from torchx import specs

ROLE = "train"


def stage_app(job_path: str, nnodes: int = 1, nproc_per_node: int = 2,
              image: str = "", python: str = "python", rdzv_port: int = 29500,
              cpu: int = 2, gpu: int = 0, memMB: int = 8192, env: Optional[Dict[str, str]] = None,
              max_restarts: int = 0, name: str = "train-stage", volume_claim: str = "",
              mount_path: str = "/mnt/shared") -> specs.AppDef:
    """One role, ``nnodes`` replicas: ``python -m torch.distributed.run ... -m trainer.train --job <job_path>``.

    Args:
        job_path: the StageJob JSON (trainer/job.py), at a path every replica can read
        nnodes: replicas (nodes); the stage's world size (tensor_parallel*context_parallel*pipeline_parallel*
                data_parallel, ``StageConfig.world_size``) must equal nnodes*nproc_per_node
        nproc_per_node: worker processes per node (at most ``gpu`` when gpu > 0)
        image: container image (kubernetes: a full name with a fixed tag, e.g. containers.images.image_for("cuda"));
               local_cwd ignores it and runs in the current directory
        python: interpreter inside the image (local: ``sys.executable``, so the venv is used)
        rdzv_port: port of the c10d rendezvous store on the rank-0 host
        cpu, gpu, memMB: resources per replica
        env: extra environment variables for every replica
        max_restarts: torchrun restarts of the worker group after a failure (each resumes from ``latest``)
        name: application name (lowercase letters, digits and '-')
        volume_claim: a PersistentVolumeClaim mounted read-write at ``mount_path`` in every replica ("" = none)
        mount_path: where the claim is mounted; job_path must lie under it when a claim is given
    """
    _validate(job_path, nnodes, nproc_per_node, python, rdzv_port, cpu, gpu, memMB, env, max_restarts, name)
    mounts: List[specs.Mount] = []
    if volume_claim:
        if not mount_path.startswith("/") or not str(job_path).startswith(mount_path.rstrip("/") + "/"):
            raise ValueError(f"job_path must lie on the shared volume so every replica reads it: with "
                             f"volume_claim={volume_claim!r} mounted at mount_path={mount_path!r}, write the job "
                             f"under it (e.g. {mount_path.rstrip('/')}/runs/stage1/job.json: set tracking.root "
                             f"under train.launch.mount_path). Given: {job_path!r}")
        mounts.append(specs.VolumeMount(src=volume_claim, dst_path=mount_path, read_only=False))
    if nnodes == 1:
        endpoint = shlex.quote(f"localhost:{rdzv_port}")
    else:   # `$$` survives TorchX's macro substitution as a literal `$` for bash to expand at run time
        endpoint = f"$${{{specs.macros.rank0_env}:=localhost}}:{rdzv_port}"
    cmd = " ".join([
        shlex.quote(python), "-m", "torch.distributed.run",
        "--nnodes", str(nnodes), "--nproc_per_node", str(nproc_per_node),
        "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", specs.macros.app_id,
        "--max_restarts", str(max_restarts),
        "-m", "trainer.train", "--job", shlex.quote(job_path),
    ])
    role_env = {"OMP_NUM_THREADS": str(max(1, cpu // nproc_per_node)), "PYTHONUNBUFFERED": "1", "LOGLEVEL": "WARNING"}
    if gpu > 0:   # megatron's TP all-reduce ordering assumption (docs/mugv.md §6.3)
        role_env["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
    role_env.update(env or {})
    return specs.AppDef(name=name, roles=[specs.Role(
        name=ROLE, image=image, entrypoint="bash", args=["-c", cmd], num_replicas=nnodes, env=role_env,
        resource=specs.resource(cpu=cpu, gpu=gpu, memMB=memMB), port_map={"c10d": rdzv_port}, mounts=mounts,
    )])


def _validate(job_path, nnodes, nproc_per_node, python, rdzv_port, cpu, gpu, memMB, env, max_restarts, name) -> None:
    if not job_path or not str(job_path).endswith(".json"):
        raise ValueError(f"job_path must be the StageJob .json file written by the launcher, e.g. "
                         f"runs/stage1/job.json. Given: {job_path!r}")
    if nnodes < 1:
        raise ValueError(f"nnodes must be >= 1 (one replica per node), e.g. nnodes=2. Given: {nnodes}")
    if nproc_per_node < 1:
        raise ValueError(f"nproc_per_node must be >= 1, e.g. nproc_per_node=8 on an 8-GPU node. "
                         f"Given: {nproc_per_node}")
    if gpu < 0 or cpu < 1 or memMB < 256:
        raise ValueError(f"resources per replica need cpu >= 1, gpu >= 0, memMB >= 256. Given: cpu={cpu}, gpu={gpu}, "
                         f"memMB={memMB}")
    if gpu > 0 and nproc_per_node > gpu:
        raise ValueError(f"nproc_per_node ({nproc_per_node}) exceeds the GPUs per node (gpu={gpu}): use "
                         f"nproc_per_node <= gpu, e.g. nproc_per_node={gpu}, or request gpu={nproc_per_node}")
    if not 1024 <= rdzv_port <= 65535:
        raise ValueError(f"rdzv_port must be an unprivileged TCP port in [1024, 65535], e.g. 29500. Given: {rdzv_port}")
    if max_restarts < 0:
        raise ValueError(f"max_restarts must be >= 0, e.g. max_restarts=3. Given: {max_restarts}")
    if not python.strip():
        raise ValueError("python must name the interpreter inside the image, e.g. python or /opt/venv/bin/python")
    if not re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,50}[a-z0-9])?", name):
        raise ValueError(f"name must be lowercase letters, digits and '-' (a Kubernetes name), e.g. "
                         f"{re.sub(r'[^a-z0-9-]+', '-', name.lower()).strip('-') or 'train-stage'}. Given: {name!r}")
    for k, v in (env or {}).items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(k)) or not isinstance(v, str):
            raise ValueError(f"env must map variable names to strings, e.g. {{'NCCL_DEBUG': 'WARN'}}. "
                             f"Given: {k!r}={v!r}")
