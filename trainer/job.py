"""What one training stage needs, as one JSON file: the contract between the launcher and ``trainer.train``.

``StageJob`` imports no torch, so the Flyte task and the TorchX launcher can write it cheaply; every process that
torchrun starts reads the same file (``python -m trainer.train --job job.json``). Parsing is strict
(``common.config.from_dict``): an unknown key or a wrong type is an error naming the key. A job carries no
credentials: an MLflow URI with a user:password in it is refused (``check_no_credentials``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from common.config import FlowConfig, StageConfig, check_stage_layout, from_dict, to_dict
from models.config import DiTConfig


@dataclass
class StageJob:
    stage: StageConfig = field(default_factory=StageConfig)
    dit: DiTConfig = field(default_factory=DiTConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    latents_dir: str = ""            # a LatentDataset folder, or a PreferencePairs one for objective flow_dpo
                                     # (docs/artifacts.md)
    init_checkpoint: str = ""        # a step folder of another stage; "" = train from scratch
    output_dir: str = ""             # the Checkpoint folder this stage writes (and resumes from)
    config_hash: str = ""            # recorded in every checkpoint's meta.json
    mlflow_tracking_uri: str = ""    # "" = no MLflow logging
    mlflow_run_id: str = ""          # an existing run; the trainer never creates runs

    def __post_init__(self) -> None:
        if not self.latents_dir:
            raise ValueError("job.latents_dir must name a LatentDataset (or, for flow_dpo, PreferencePairs) folder")
        if not self.output_dir:
            raise ValueError("job.output_dir must name the folder the stage writes checkpoints to")
        check_no_credentials(self.mlflow_tracking_uri, "job.mlflow_tracking_uri")   # job files carry no secrets
        if bool(self.mlflow_tracking_uri) != bool(self.mlflow_run_id):
            raise ValueError("job.mlflow_tracking_uri and job.mlflow_run_id must be set together (or both empty)")
        check_stage_layout(self.stage, self.dit, f"stage '{self.stage.name}'")

    def to_json(self) -> str:
        return json.dumps(to_dict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "StageJob":
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("job file: the top level must be a JSON object")
        return from_dict(cls, data)

    def write(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(self.to_json())
        return p

    @classmethod
    def read(cls, path: str | Path) -> "StageJob":
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"job file not found: {p}")
        return cls.from_json(p.read_text())


def check_no_credentials(uri: str, what: str) -> None:
    """Refuse a URI that carries a user or password (``https://user:pw@host``): it would be written into job files
    and Kubernetes objects in clear text."""
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"{what} carries credentials (user:password@{parts.hostname}); they would be written into "
                         f"the job file and the pod spec. Give the URI without them (e.g. "
                         f"{parts.scheme}://{parts.hostname}{':' + str(parts.port) if parts.port else ''}) and put "
                         "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN in a Kubernetes "
                         "secret listed in train.launch.secret_env")
