"""``evaluate:``, ``register:`` and ``tracking:``: the evaluation suite, the champion gate, the MLflow store."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List


@dataclass
class EvalConfig:
    """The evaluation suite (docs/evaluation.md): what is generated and measured, identical for the candidate and the
    champion, so two reports compare only when their suite hashes (``tasks/evaluate/suite.py``) match."""
    prompts: List[str] = field(default_factory=lambda: [
        "a red square moving across a blue background", "a calm landscape with slow camera motion"])
    i2v_images: List[str] = field(default_factory=lambda: [""])   # I2V conditioning images (paths); "" = the first
                                   # frame of held-out clip k (k counts the "" entries), generated at that clip's bucket
    i2v_prompts: List[str] = field(default_factory=list)   # one per i2v image, or []: "" / missing = the held-out
                                   # clip's caption for a "" image, the empty prompt for a path image
    seeds: List[int] = field(default_factory=lambda: [42])   # every prompt and image is sampled once per seed
    heldout_clips: int = 4         # held-out clips, chosen by hash from the dataset's "val" split (never train)
    sample_steps: int = 8          # Euler steps (MUG-V inference: 25)
    cfg_scale: float = 4.0         # MUG-V inference default
    num_frames: int = 17           # T2V sample length (8k+1); I2V from a held-out clip uses that clip's own length
    height: int = 0                # T2V sample size in pixels; 0 = the first held-out clip's bucket size
    width: int = 0
    seed: int = 42                 # the fixed noise of the held-out flow loss (clip k: seed + k)
    fps: int = 8                   # sample mp4s; dynamic degree's threshold factor max(1, 8 / fps) (VBench)
    features: str = "vae"          # Fréchet distance feature space: "i3d" (FVD; needs i3d_path) | "vae" (our encoder)
    i3d_path: str = ""             # i3d_torchscript.pt (StyleGAN-V / "FVD done right"); required for "i3d"
    fd_eps: float = 1e-6           # ridge added to both covariances before sqrtm (few samples: singular covariances)
    clip_pretrained: str = ""      # local CLIPModel + processor folder (e.g. openai/clip-vit-base-patch32); "" = a
                                   # tiny random CLIP (its scores are noise and marked so)
    clip_frames: int = 4           # frames per video scored against the prompt (evenly spaced)
    tiny_clip_hidden: int = 32     # widths of the tiny random CLIP used when clip_pretrained == ""
    tiny_clip_layers: int = 2
    tiny_clip_image_size: int = 32
    clip_seed: int = 0
    evaluate_raw: bool = True      # also evaluate the raw (non-EMA) weights on the whole suite, shown beside EMA

    def __post_init__(self) -> None:
        if self.num_frames % 8 != 1:
            raise ValueError(f"evaluate.num_frames must be 8k+1, got {self.num_frames}")
        if not self.prompts and not self.i2v_images:
            raise ValueError("evaluate: prompts and i2v_images are both empty; the suite needs at least one sample")
        if not self.seeds:
            raise ValueError("evaluate.seeds must list at least one seed")
        if self.i2v_prompts and len(self.i2v_prompts) != len(self.i2v_images):
            raise ValueError(f"evaluate.i2v_prompts must be [] or one per i2v image ({len(self.i2v_images)}), "
                             f"got {len(self.i2v_prompts)}")
        if self.heldout_clips < 1 or self.sample_steps < 1 or self.clip_frames < 1:
            raise ValueError("evaluate.heldout_clips, sample_steps and clip_frames must be >= 1")
        if (self.height or self.width) and (self.height % 16 or self.width % 16 or min(self.height, self.width) < 16):
            raise ValueError(f"evaluate.height/width must be 0 (the held-out bucket) or multiples of 16, got "
                             f"{self.height}x{self.width}")
        if self.features not in ("i3d", "vae"):
            raise ValueError(f"evaluate.features must be 'i3d' or 'vae', got '{self.features}'")
        if self.features == "i3d" and not self.i3d_path:
            raise ValueError("evaluate.features 'i3d' needs evaluate.i3d_path (the i3d_torchscript.pt file)")
        if self.fd_eps < 0:
            raise ValueError(f"evaluate.fd_eps must be >= 0, got {self.fd_eps}")


@dataclass
class GateMetric:
    """One rule of the champion gate (directions come from the evaluation's metric table)."""
    name: str = "heldout_flow_loss"
    must_improve: bool = False   # the candidate must be better than the champion, by at least ``margin``
    margin: float = 0.0
    tolerance: float = 0.0       # the candidate may be worse than the champion by at most this


@dataclass
class GateConfig:
    """Promote the candidate to champion only when it beats the champion on the same suite (docs/evaluation.md)."""
    metrics: List[GateMetric] = field(default_factory=lambda: [
        GateMetric("frechet_distance", must_improve=True),   # must get better: comparable across weekly datasets
        GateMetric("heldout_flow_loss", tolerance=0.05),     # the others may not get much worse (a flow loss in
        GateMetric("temporal_flickering", tolerance=0.02),   # another latent space is not comparable: skipped)
        GateMetric("clip_alignment", tolerance=0.05),
    ])
    relative: bool = True        # margins and tolerances as fractions of the champion's value
    enabled: bool = True         # False: every candidate stays a candidate (promote by hand)

    def __post_init__(self) -> None:
        names = [m.name for m in self.metrics]
        if len(set(names)) != len(names):
            raise ValueError(f"register.gate.metrics: a metric is listed twice ({names})")
        if any(m.margin < 0 or m.tolerance < 0 for m in self.metrics):
            raise ValueError("register.gate.metrics: margin and tolerance must be >= 0")


@dataclass
class RegisterConfig:
    model_name: str = "video-dit-tiny"
    alias: str = "candidate"       # set on every registered version
    champion_alias: str = "champion"   # the version evaluation compares against; the gate moves it
    gate: GateConfig = field(default_factory=GateConfig)


@dataclass
class TrackingConfig:
    experiment: str = "video-gen"
    root: str = "runs"   # SQLite store + artifacts go here when MLFLOW_TRACKING_URI is not set
    artifact_uri: str = ""   # s3://bucket/prefix: stages also upload their outputs there (common.objectstore:
                             # manifest last, checksummed; checkpoints: the exported weights only); "" = local only

    def __post_init__(self) -> None:
        if self.artifact_uri and not (self.artifact_uri.startswith("s3://") and
                                      self.artifact_uri[len("s3://"):].strip("/")):
            raise ValueError(f"tracking.artifact_uri must be s3://bucket/prefix (or \"\" for local only), got "
                             f"'{self.artifact_uri}'")
