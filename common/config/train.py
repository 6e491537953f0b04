"""``train:``: the DiT, the flow, the curriculum's stages (layout, data selection, task mix) and post-training."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from common.config.cluster import LaunchConfig
from models.config import DiTConfig


@dataclass
class FlowConfig:
    """Rectified flow as MUG-V trains it (docs/mugv.md §4): t ~ 1000*sigmoid(N(loc, scale)), resolution shift."""
    t_loc: float = 0.0
    t_scale: float = 1.0
    use_shift: bool = True


TASKS = ("t2v", "i2v", "t2i")


@dataclass
class TaskShare:
    """One task of a stage's mix. MUG-V's training code trains text-to-video, image-to-video and text-to-image, with
    the t2i loss weighted 0.3 (docs/mugv.md §5.1)."""
    task: str = "t2v"         # "t2v"; "i2v": latent frame 0 is a clean condition, out of the loss; "t2i": frame 0 alone
    ratio: float = 1.0        # share of the stage's micro-batches (normalised over the mix; drawn per micro-batch)
    loss_weight: float = 1.0  # the micro-batch's loss is multiplied by it (MUG-V: t2i 0.3)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got '{self.task}'")
        if self.ratio <= 0 or self.loss_weight <= 0:
            raise ValueError(f"task '{self.task}': ratio and loss_weight must be > 0")


@dataclass
class QualityRanking:
    """How a stage ranks its clips when it keeps only the best ``top_fraction``: the weighted sum of per-column
    z-scores over the split (a weight of 0 ignores the column). The default is curation's score alone."""
    score: float = 1.0            # curation's ranking score
    aesthetic: float = 0.0        # the LAION-style aesthetic score
    motion: float = 0.0           # closeness to the middle of curation's motion band (log scale)
    sharpness: float = 0.0        # Laplacian variance (log scale)
    caption_length: float = 0.0   # words in the caption: dense captions first

    def __post_init__(self) -> None:
        if any(w < 0 for w in (self.score, self.aesthetic, self.motion, self.sharpness, self.caption_length)):
            raise ValueError("quality weights must be >= 0")
        if not any((self.score, self.aesthetic, self.motion, self.sharpness, self.caption_length)):
            raise ValueError("quality: at least one weight must be > 0")


ASPECT_TOLERANCE = 0.03   # "16:9" matches 1280x720 exactly and the /16-rounded 832x1104 for "4:3" (0.5 % off)


def aspect_matches(height: int, width: int, ratio: str) -> bool:
    """Whether [height, width] has aspect ``ratio`` ("W:H") within ``ASPECT_TOLERANCE`` (relative)."""
    w, h = (int(v) for v in ratio.split(":"))
    return abs((width / height) / (w / h) - 1.0) <= ASPECT_TOLERANCE


@dataclass
class DataSelection:
    """Which samples of the LatentDataset a stage trains on (``common.selection``). Every list empty: each kept
    clip once, at its largest resolution and full length (no images): what every stage trained on before."""
    resolutions: List[str] = field(default_factory=list)   # names of curate.resolutions; [] = each clip's largest
    frames: List[int] = field(default_factory=list)        # pixel frames: 8k+1 clip lengths (a longer clip gives its
                                                           # first n frames), 1 = images and key frames; [] = each
                                                           # clip's full length, no images
    aspect_ratios: List[str] = field(default_factory=list)  # "W:H" (e.g. "16:9", "1:1"), within 3 %; [] = all

    def __post_init__(self) -> None:
        for f in self.frames:
            if f % 8 != 1:
                raise ValueError(f"data.frames: {f} is not 8k+1 (1 = images; clips: 9, 17, ..., 105)")
        for a in self.aspect_ratios:
            parts = a.split(":")
            if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
                raise ValueError(f"data.aspect_ratios: '{a}' is not 'W:H' with positive integers (e.g. '16:9')")


@dataclass
class StageConfig:
    name: str = "stage1"
    steps: int = 10
    lr: float = 3e-4            # tiny model from scratch; the released MUG-V fine-tune uses 1e-5 (docs/mugv.md §5.2)
    warmup_steps: int = 2
    micro_batch_size: int = 2   # per data-parallel rank and micro-batch
    micro_batches: int = 1      # gradient accumulation: micro-batches per DP rank per optimizer step (global batch
                                # = micro_batch_size * micro_batches * data_parallel); the pipeline's micro-batches
    tensor_parallel: int = 1
    data_parallel: int = 2
    context_parallel: int = 1   # CP ranks split each clip's tokens (all-gathered K/V); any count: the model pads
    sequence_parallel: bool = False   # Megatron SP: TP ranks also split the tokens between the TP linears (any
                                      # count: the model pads); no effect with tensor_parallel=1
    pipeline_parallel: int = 1   # PP stages: each keeps dit.depth / pipeline_parallel consecutive blocks (conditioning
                                 # embedders replicated, x_embedder on the first, final layer on the last; megatron's
                                 # 1F1B over micro_batches); combines with TP, SP, CP, "dist" checkpoints and
                                 # the distributed optimizer (the embedders' grads summed over the stages before
                                 # its DP reduce, counted once in its grad norm). MUG-V's 512-GPU example: PP 4
    nnodes: int = 1
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    checkpoint_interval: int = 5
    keep_checkpoints: int = 2
    top_fraction: float = 1.0   # train on the best-scored fraction of clips (post-training uses < 1)
    seed: int = 1234
    lr_schedule: str = "constant"   # after warmup: "constant" (MUG-V fine-tune), "cosine" or "linear" to min_lr
    min_lr: float = 0.0             # the LR at the stage's last step ("cosine"/"linear" only)
    recompute: bool = False         # activation recomputation: torch.utils.checkpoint around every DiT block
    compile: str = "none"           # "blocks": torch.compile each DiT block (models/compile.py; eager is the
                                    # reference); needs tensor_parallel = context_parallel = 1
    tokens_per_micro_batch: int = 0   # > 0: per-bucket micro-batch size = this // video tokens per clip (min 1)
    peak_tflops: float = 0.0        # per-process peak for MFU; 0 = $VGEN_PEAK_TFLOPS, else the device default
    checkpoint_format: str = "full"   # "full": unsharded safetensors + per-rank optimizer files; "dist": also a
                                      # megatron dist_checkpointing folder (sharded, reshardable between TP sizes)
    distributed_optimizer: bool = False   # megatron DDP + DistributedOptimizer (needs checkpoint_format "dist")
    # Hiding the trainer's overheads (docs/parallelism.md, "A step without idle time"); none changes a CPU result
    overlap_grad_reduce: bool = True   # the DP gradient reduce runs in buckets during the (last micro-batch's)
                                       # backward; with distributed_optimizer and pipeline_parallel > 1 it waits
    grad_bucket_mb: float = 25.0   # the torch path's overlap bucket (torch DDP's bucket_cap_mb); megatron DDP
                                   # sizes its own (40 M parameters)
    optimizer_impl: str = "auto"   # torch AdamW kernels: "auto" (fused on CUDA, foreach on CPU), "fused",
                                   # "foreach" or "for_loop" (one tensor at a time); all bitwise equal on CPU
    prefetch: bool = True          # read and build the next step's micro-batches in a thread during this step
    async_checkpoint: bool = True  # copy the state synchronously, write the step folder in a thread (the next save
                                   # and the end of the stage wait for it)
    bf16_weights: str = "auto"     # a bf16 copy of the weights for the forward, refreshed from the fp32 masters after
                                   # each step (no autocast re-cast): "auto" (on where the forward runs under bf16
                                   # autocast, i.e. CUDA), "on", "off"; not with PP. With distributed_optimizer
                                   # the parameters are bf16, megatron's optimizer keeps fp32 masters (saved)
    full_weights: str = "every"   # when rank 0 gathers and writes the full model/ema.safetensors: "every" checkpoint,
                                  # or only at the stage's "final" step (needs "dist"; export others from dist/)
    task_mix: List[TaskShare] = field(default_factory=lambda: [TaskShare()])   # which tasks, how often, loss weights
    quality: QualityRanking = field(default_factory=QualityRanking)        # the ranking that top_fraction keeps
    objective: str = "flow"       # "flow": rectified-flow loss; "flow_dpo": Flow-DPO on preference pairs (reference =
                                  # the init checkpoint, frozen; or the same weights with the LoRA adapters off)
    dpo_beta: float = 500.0       # Flow-DPO's constant beta (Liu et al. 2025: 500; a time-weighted beta reward-hacked)
    lora_rank: int = 0            # > 0: train LoRA adapters on the attention and MLP linears only (MUG-V: r 64)
    lora_alpha: float = 32.0      # adapter scale alpha / rank (MUG-V: alpha 32)
    init: str = ""                # where the weights start: "" = the previous stage's (the first stage: scratch),
                                  # "scratch", "champion" (the registered champion: warm start), or a step folder
    skip: bool = False            # leave the stage out (a warm-started weekly run skips e.g. the low-res stages)
    data: DataSelection = field(default_factory=DataSelection)   # which samples: resolutions, frames, aspects
    tokens: int = 0               # > 0: train this many video tokens: steps = ceil(tokens / (tokens_per_micro_batch
                                  # * micro_batches * data_parallel)), replacing `steps` (needs tokens_per_micro_batch)

    def __post_init__(self) -> None:
        if self.tokens < 0:
            raise ValueError(f"stage '{self.name}': tokens must be >= 0, got {self.tokens}")
        if self.tokens:
            if not self.tokens_per_micro_batch:
                raise ValueError(f"stage '{self.name}': tokens ({self.tokens}) needs tokens_per_micro_batch > 0 (the "
                                 "budget of one micro-batch), or set steps instead")
            per_step = self.tokens_per_micro_batch * max(1, self.micro_batches) * max(1, self.data_parallel)
            self.steps = -(-self.tokens // per_step)
        for k in ("steps", "micro_batch_size", "micro_batches", "tensor_parallel", "data_parallel", "context_parallel",
                  "pipeline_parallel", "nnodes", "checkpoint_interval", "keep_checkpoints"):
            if getattr(self, k) < 1:
                raise ValueError(f"stage '{self.name}': {k} must be >= 1, got {getattr(self, k)}")
        if self.world_size % self.nnodes:
            raise ValueError(f"stage '{self.name}': tensor_parallel*context_parallel*pipeline_parallel*data_parallel "
                             "must be divisible by nnodes")
        if not 0.0 < self.top_fraction <= 1.0:
            raise ValueError(f"stage '{self.name}': top_fraction must be in (0, 1], got {self.top_fraction}")
        if self.lr_schedule not in ("constant", "cosine", "linear"):
            raise ValueError(f"stage '{self.name}': lr_schedule must be 'constant', 'cosine' or 'linear', "
                             f"got '{self.lr_schedule}'")
        if not 0.0 <= self.min_lr <= self.lr:
            raise ValueError(f"stage '{self.name}': min_lr must be in [0, lr={self.lr}], got {self.min_lr}")
        if self.warmup_steps < 0 or self.tokens_per_micro_batch < 0 or self.peak_tflops < 0:
            raise ValueError(f"stage '{self.name}': warmup_steps, tokens_per_micro_batch and peak_tflops must be >= 0")
        if self.checkpoint_format not in ("full", "dist"):
            raise ValueError(f"stage '{self.name}': checkpoint_format must be 'full' or 'dist', "
                             f"got '{self.checkpoint_format}'")
        if self.distributed_optimizer and self.checkpoint_format != "dist":
            raise ValueError(f"stage '{self.name}': distributed_optimizer needs checkpoint_format 'dist' (its state "
                             "is saved sharded with megatron dist_checkpointing)")
        if self.optimizer_impl not in ("auto", "fused", "foreach", "for_loop"):
            raise ValueError(f"stage '{self.name}': optimizer_impl must be 'auto', 'fused', 'foreach' or 'for_loop', "
                             f"got '{self.optimizer_impl}'")
        if self.grad_bucket_mb <= 0:
            raise ValueError(f"stage '{self.name}': grad_bucket_mb must be > 0 (MiB of gradients per all_reduce; "
                             f"torch DDP's default is 25), got {self.grad_bucket_mb}")
        if self.bf16_weights not in ("auto", "on", "off"):
            raise ValueError(f"stage '{self.name}': bf16_weights must be 'auto', 'on' or 'off', "
                             f"got '{self.bf16_weights}'")
        if self.bf16_weights == "on" and self.pipeline_parallel > 1:
            raise ValueError(f"stage '{self.name}': bf16_weights 'on' is not supported with pipeline_parallel > 1 "
                             "(the stages exchange fp32 activations; bf16 weights are untested there): set "
                             "bf16_weights 'auto' (off there)")
        if self.compile not in ("none", "blocks"):
            raise ValueError(f"stage '{self.name}': compile must be 'none' or 'blocks', got '{self.compile}'")
        if self.compile == "blocks" and (self.tensor_parallel > 1 or self.context_parallel > 1):
            raise ValueError(f"stage '{self.name}': compile 'blocks' needs tensor_parallel=1 and context_parallel=1 "
                             f"(got {self.tensor_parallel} and {self.context_parallel}: their collectives inside "
                             "the blocks are not traced by torch.compile here); set compile: none for this stage")
        if self.full_weights not in ("every", "final"):
            raise ValueError(f"stage '{self.name}': full_weights must be 'every' or 'final', got '{self.full_weights}'")
        if not self.task_mix:
            raise ValueError(f"stage '{self.name}': task_mix must list at least one task")
        if len({t.task for t in self.task_mix}) != len(self.task_mix):
            raise ValueError(f"stage '{self.name}': task_mix lists a task twice")
        if self.init not in ("", "scratch", "champion") and not (self.init.startswith("models:/")
                                                                   or "/" in self.init or self.init.startswith(".")):
            raise ValueError(f"stage '{self.name}': init must be '', 'scratch', 'champion', a models:/ URI or a "
                             f"step folder path, got '{self.init}'")
        if self.objective not in ("flow", "flow_dpo"):
            raise ValueError(f"stage '{self.name}': objective must be 'flow' or 'flow_dpo', got '{self.objective}'")
        if self.dpo_beta <= 0 or self.lora_rank < 0 or self.lora_alpha <= 0:
            raise ValueError(f"stage '{self.name}': dpo_beta and lora_alpha must be > 0, lora_rank >= 0")
        if self.full_weights == "final" and self.checkpoint_format != "dist":
            raise ValueError(f"stage '{self.name}': full_weights 'final' needs checkpoint_format 'dist' (the other "
                             "checkpoints then hold the weights only in dist/)")
        tasks = [t.task for t in self.task_mix]
        if self.data.frames and set(self.data.frames) == {1} and tasks != ["t2i"]:
            raise ValueError(f"stage '{self.name}': data.frames [1] selects images only, which train text-to-image: "
                             f"set task_mix to [{{task: t2i}}] (got {tasks})")
        if 1 in self.data.frames and "t2i" not in tasks:
            raise ValueError(f"stage '{self.name}': data.frames has 1 (images), which train as t2i: add t2i to "
                             f"task_mix (its loss_weight applies to them; MUG-V: 0.3), got {tasks}")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel * self.context_parallel * self.pipeline_parallel * self.data_parallel

    @property
    def nproc_per_node(self) -> int:
        return self.world_size // self.nnodes


@dataclass
class PairsConfig:
    """Preference pairs for the ``preference`` stage (format: docs/artifacts.md, "PreferencePairs")."""
    source: str = "auto"      # "auto": built from held-in clips (no human labels); else a pair table: a .parquet,
                              # .csv or .jsonl file (or s3:// URI) whose video paths are relative to it
    corruptions: List[str] = field(default_factory=lambda: ["shuffle", "reverse", "noise"])   # auto losers, in turn
    noise_std: float = 1.0    # "noise": the winner's normalised latent + noise_std * N(0, 1)
    max_pairs: int = 0        # 0: every pair
    dimensions: List[str] = field(default_factory=lambda: ["visual_quality", "motion_quality", "text_alignment"])
    seed: int = 0

    def __post_init__(self) -> None:
        bad = sorted(set(self.corruptions) - {"shuffle", "reverse", "noise"})
        if bad or not self.corruptions:
            raise ValueError(f"train.pairs.corruptions must be a non-empty list of 'shuffle', 'reverse', 'noise'; "
                             f"got {self.corruptions}")
        if self.noise_std <= 0 or self.max_pairs < 0:
            raise ValueError("train.pairs.noise_std must be > 0 and max_pairs >= 0")


@dataclass
class TrainConfig:
    dit: DiTConfig = field(default_factory=DiTConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    stages: List[StageConfig] = field(default_factory=lambda: [
        StageConfig(name="stage1_dp2", data_parallel=2, tensor_parallel=1),
        StageConfig(name="stage2_tp2", data_parallel=1, tensor_parallel=2),
    ])
    post_train: StageConfig = field(default_factory=lambda: StageConfig(
        name="post_train_sft", steps=5, lr=1e-4, warmup_steps=0, top_fraction=0.5, lr_schedule="linear", min_lr=0.0,
        quality=QualityRanking(score=0.0, aesthetic=1.0, motion=0.5, sharpness=0.5, caption_length=0.25)))
    preference: StageConfig = field(default_factory=lambda: StageConfig(
        name="preference_dpo", steps=5, lr=1e-5, warmup_steps=0, objective="flow_dpo"))
    pairs: PairsConfig = field(default_factory=lambda: PairsConfig())
    launch: LaunchConfig = field(default_factory=LaunchConfig)

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("train.stages must list at least one stage")
        if all(s.skip for s in self.stages):
            raise ValueError("train.stages: every stage has skip: true; at least one must run")
        names = [s.name for s in self.stages] + [self.post_train.name, self.preference.name]
        if len(set(names)) != len(names):
            raise ValueError(f"train.stages: stage names must be unique, got {names}")
        named = [(f"train.stages[{i}]", s) for i, s in enumerate(self.stages)]
        named += [("train.post_train", self.post_train), ("train.preference", self.preference)]
        for where, s in named:
            check_stage_layout(s, self.dit, where)
        if self.preference.objective != "flow_dpo":
            raise ValueError("train.preference.objective must be 'flow_dpo' (the preference stage optimises pairs)")
        for where, s in named[:-1]:
            if s.objective != "flow":
                raise ValueError(f"{where}.objective must be 'flow' (only train.preference trains on pairs)")


def check_stage_layout(stage: StageConfig, dit: DiTConfig, where: str) -> None:
    """The parallel layout against the model, checked once where a stage meets its DiT (the pipeline config and the
    trainer's job file): TP divides the heads and the width (every TP rank holds whole heads), PP the depth; and the
    post-training combinations the trainer does not implement (Flow-DPO with a task mix or top_fraction)."""
    if dit.hidden_size % stage.tensor_parallel or dit.num_heads % stage.tensor_parallel:
        raise ValueError(f"{where}.tensor_parallel ({stage.tensor_parallel}) must divide dit.num_heads "
                         f"({dit.num_heads}) and dit.hidden_size")
    if dit.depth % stage.pipeline_parallel:
        raise ValueError(f"{where}.pipeline_parallel ({stage.pipeline_parallel}) must divide dit.depth "
                         f"({dit.depth}): every stage keeps depth / pipeline_parallel blocks")
    # post-training: what the trainer does not implement is refused here, with the stage named
    if stage.objective == "flow_dpo":
        if [t.task for t in stage.task_mix] != ["t2v"]:
            raise ValueError(f"{where} ('{stage.name}'): objective flow_dpo trains text-to-video pairs; task_mix must "
                             "be the default [t2v]")
        if stage.top_fraction < 1.0:
            raise ValueError(f"{where} ('{stage.name}'): top_fraction selects clips of a flow stage; a flow_dpo "
                             "stage trains on every pair of its PreferencePairs folder (set top_fraction: 1.0)")
        if stage.data != DataSelection():
            raise ValueError(f"{where} ('{stage.name}'): data selects samples of a flow stage; a flow_dpo stage "
                             "trains on every pair of its PreferencePairs folder (remove data)")
