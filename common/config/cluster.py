"""``train.launch:`` and ``resources:``: where training runs (TorchX/Volcano) and what each Flyte task asks for."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import List


@dataclass
class SecretEnv:
    """One environment variable of the training pods read from a Kubernetes secret (``secretKeyRef``), so that no
    credential is written into the job file, the config or the Volcano job."""
    env: str = "AWS_ACCESS_KEY_ID"   # the variable the workers see
    secret: str = "video-gen-s3"     # the Secret's name (kubectl create secret generic <secret> --from-literal=...)
    key: str = "access_key"          # the key inside the Secret

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.env):
            raise ValueError(f"env must be an environment variable name, e.g. AWS_ACCESS_KEY_ID, got {self.env!r}")
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", self.secret):
            raise ValueError(f"secret must be a Kubernetes Secret name (lowercase letters, digits, '-', '.'), e.g. "
                             f"video-gen-s3, got {self.secret!r}")
        if not re.fullmatch(r"[-._a-zA-Z0-9]+", self.key):
            raise ValueError(f"key must be a key of the Secret (letters, digits, '-', '_', '.'), e.g. access_key, "
                             f"got {self.key!r}")


@dataclass
class LaunchConfig:
    scheduler: str = "local_cwd"       # "local_cwd" (this machine) or "kubernetes" (Volcano)
    image: str = ""                    # kubernetes only; "" = the CUDA image of containers/images.py (content-
                                       # derived tag, filled in by the pipeline), or a full name with a fixed tag
    queue: str = "default"             # Volcano queue
    namespace: str = "default"
    cpu: int = 2                       # per replica (node) on kubernetes
    gpu: int = 0
    memory_mb: int = 8192
    timeout_s: int = 1800              # a stage that runs longer is stopped and reported
    volume_claim: str = ""             # kubernetes: a PersistentVolumeClaim (ReadWriteMany) mounted in every pod at
    mount_path: str = "/mnt/shared"    # mount_path: job files, latents and checkpoints live there (tracking.root)
    secret_env: List[SecretEnv] = field(default_factory=list)   # credentials of the pods, from Kubernetes secrets
    s3_endpoint_url: str = ""          # kubernetes: AWS_ENDPOINT_URL and MLFLOW_S3_ENDPOINT_URL of the pods (MinIO)
    accelerator: str = ""              # kubernetes: GPU type of the training nodes, a nodeSelector on every pod
    accelerator_label: str = "nvidia.com/gpu.product"   # its node label (NVIDIA GPU feature discovery's by default)

    def __post_init__(self) -> None:
        if self.scheduler not in ("local_cwd", "kubernetes"):
            raise ValueError(f"train.launch.scheduler must be 'local_cwd' or 'kubernetes', got '{self.scheduler}'")
        if self.image and (":" not in self.image.rsplit("/", 1)[-1] or self.image.endswith(":latest")):
            raise ValueError(f"train.launch.image must name a fixed tag (a moving ':latest' makes runs "
                             f"unreproducible), e.g. ghcr.io/video-gen/video-gen-cuda:<tag>, or be '' for the CUDA "
                             f"image of containers/images.py; got {self.image!r}")
        if self.volume_claim and not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", self.volume_claim):
            raise ValueError(f"train.launch.volume_claim must be a PersistentVolumeClaim name (lowercase letters, "
                             f"digits, '-', '.'), e.g. video-gen-shared, got {self.volume_claim!r}")
        if not self.mount_path.startswith("/"):
            raise ValueError(f"train.launch.mount_path must be an absolute path, e.g. /mnt/shared, "
                             f"got {self.mount_path!r}")
        envs = [s.env for s in self.secret_env]
        if len(set(envs)) != len(envs):
            raise ValueError(f"train.launch.secret_env sets a variable twice: {envs}")
        if "@" in self.s3_endpoint_url:
            raise ValueError("train.launch.s3_endpoint_url must not carry credentials (user:password@): put them in "
                             "a Kubernetes secret and list it in train.launch.secret_env")
        if self.accelerator and not self.gpu:
            raise ValueError(f"train.launch.accelerator {self.accelerator!r} is set but train.launch.gpu is 0: set "
                             "gpu (GPUs per node, e.g. 8) or remove accelerator")
        if self.accelerator and not _LABEL_VALUE.fullmatch(self.accelerator):
            raise ValueError(f"train.launch.accelerator must be a node label value (at most 63 letters, digits, "
                             f"'-', '_', '.'; no spaces), as `kubectl get nodes -L {self.accelerator_label}` shows "
                             f"it, e.g. {re.sub(r'[^A-Za-z0-9_.-]+', '-', self.accelerator).strip('-_.')[:63]}; "
                             f"got {self.accelerator!r}")
        if not _LABEL_KEY.fullmatch(self.accelerator_label) or len(self.accelerator_label.rsplit("/", 1)[-1]) > 63:
            raise ValueError(f"train.launch.accelerator_label must be a node label key ([prefix/]name), e.g. "
                             f"nvidia.com/gpu.product or cloud.google.com/gke-accelerator; got "
                             f"{self.accelerator_label!r}")


_LABEL_VALUE = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")   # Kubernetes label value (non-empty)
_LABEL_KEY = re.compile(r"([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")   # [prefix/]name
_QUANTITY = re.compile(r"([0-9]+(\.[0-9]+)?)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?")   # Kubernetes resource quantity


@dataclass
class TaskResources:
    """What one kind of Flyte task asks Kubernetes for (requests = limits), and which image it runs in. Applied to
    the task nodes at run time with flytekit's ``with_overrides`` (tasks/resources.py); the defaults fit the tiny
    config on a CPU-only machine."""
    cpu: str = "1"                  # Kubernetes quantity: "2", "500m"
    memory: str = "2Gi"             # Kubernetes quantity: "8Gi", "512Mi"
    gpu: int = 0                    # nvidia.com/gpu
    accelerator: str = ""           # GPU type (Flyte's accelerator node label), e.g. "nvidia-h100"; "" = any
    ephemeral_storage: str = ""     # local scratch disk, e.g. "200Gi"; "" = the cluster default
    image: str = "cpu"              # "cpu" | "cuda": the ImageSpec of containers/images.py

    def __post_init__(self) -> None:
        for k in ("cpu", "memory") + (("ephemeral_storage",) if self.ephemeral_storage else ()):
            v = getattr(self, k)
            if not _QUANTITY.fullmatch(v) or float(_QUANTITY.fullmatch(v).group(1)) <= 0:   # type: ignore[union-attr]
                raise ValueError(f"{k} must be a positive Kubernetes quantity, e.g. cpu: \"4\", memory: \"16Gi\", "
                                 f"ephemeral_storage: \"100Gi\"; got {v!r}")
        if self.image not in ("cpu", "cuda"):
            raise ValueError(f"image must be 'cpu' or 'cuda' (containers/images.py), got {self.image!r}")
        if self.gpu < 0:
            raise ValueError(f"gpu must be >= 0, got {self.gpu}")
        if self.gpu and self.image != "cuda":
            raise ValueError(f"gpu: {self.gpu} needs image: cuda (the CPU image has a CPU-only torch)")
        if self.accelerator and not self.gpu:
            raise ValueError(f"accelerator {self.accelerator!r} is set but gpu is 0: set gpu: 1 or remove "
                             "accelerator")
        if self.accelerator and not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", self.accelerator):
            raise ValueError(f"accelerator must be a GPU type label value, e.g. nvidia-h100, got "
                             f"{self.accelerator!r}")


@dataclass
class ResourcesConfig:
    """Requests and image per kind of Flyte task (README "Running on a cluster"). Training itself runs in the
    Volcano job that ``train.launch`` describes; ``train_launcher`` is the Flyte pod that submits and watches it."""
    curate_shard: TaskResources = field(default_factory=lambda: TaskResources(cpu="2", memory="4Gi"))
    curate_merge: TaskResources = field(default_factory=lambda: TaskResources(cpu="1", memory="2Gi"))
    fit_vae: TaskResources = field(default_factory=lambda: TaskResources(cpu="2", memory="8Gi"))
    compress: TaskResources = field(default_factory=lambda: TaskResources(cpu="2", memory="8Gi"))
    train_launcher: TaskResources = field(default_factory=lambda: TaskResources(cpu="2", memory="4Gi"))
    preference_pairs: TaskResources = field(default_factory=lambda: TaskResources(cpu="2", memory="8Gi"))
    evaluate: TaskResources = field(default_factory=lambda: TaskResources(cpu="2", memory="4Gi"))
    register: TaskResources = field(default_factory=lambda: TaskResources(cpu="1", memory="2Gi"))
    orchestration: TaskResources = field(default_factory=lambda: TaskResources(cpu="1", memory="1Gi"))
