"""Typed pipeline configuration, loaded strictly from YAML.

Defaults live here, once. ``load_config(path)`` rejects unknown keys and wrong types with the key's path in the
message (``"train.stages[1].tensor_parallel: expected int, got str"``). Cross-field rules are checked in
``__post_init__``.
"""
from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List

from common.hashing import sha256_json
from models.config import DiTConfig, VAEConfig


@dataclass
class AestheticConfig:
    """LAION-style aesthetic predictor: an MLP head on L2-normalised CLIP image embeddings (docs/mugv.md §1.1)."""
    pretrained: str = ""        # local dir of a CLIP vision model (cluster: openai/clip-vit-large-patch14); "": tiny
    head: str = ""              # LAION MLP head weights (.pth/.safetensors, sac+logos+ava1-l14-linearMSE); "" = random
    min_score: float = 4.5      # docs/mugv.md §1.1: clips scoring < 4.5 are dropped
    num_frames: int = 3         # frames scored per clip (mean)
    tiny_hidden: int = 32       # widths of the tiny random CLIP used when pretrained == ""
    tiny_layers: int = 2
    tiny_image_size: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_frames < 1:
            raise ValueError(f"curate.aesthetic.num_frames must be >= 1, got {self.num_frames}")


@dataclass
class CaptionConfig:
    """Dense paragraph captions from a Qwen2-VL model (docs/mugv.md §1.2), or the <video>.txt sidecars."""
    backend: str = "qwen2_vl"   # "qwen2_vl" | "sidecar"
    prefer_sidecar: bool = True # a <video>.txt caption wins over the model when present
    pretrained: str = ""        # local dir of a Qwen2-VL model + tokenizer (cluster: the 7B caption model); "": tiny
    prompt: str = ("Describe this video in one dense paragraph: scene and setting, lighting, background, main "
                   "subject and appearance, position and framing, camera, motion, what stays static.")
    num_frames: int = 8         # frames given to the model per clip
    max_new_tokens: int = 256   # a ~200-word paragraph
    batch_size: int = 8         # a video's kept clips and key frames per generate call (prompts left-padded)
    min_pixels: int = 3136      # per-frame pixel budget of the Qwen2-VL video processor (56*56 .. 448*448)
    max_pixels: int = 200704
    tiny_hidden: int = 64       # widths of the tiny random Qwen2-VL used when pretrained == ""
    tiny_layers: int = 2
    tiny_heads: int = 4
    patch_size: int = 14        # tiny model only; a pretrained model's own values are used otherwise
    merge_size: int = 2
    temporal_patch_size: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.backend not in ("qwen2_vl", "sidecar"):
            raise ValueError(f"curate.caption.backend must be 'qwen2_vl' or 'sidecar', got '{self.backend}'")
        if self.num_frames < 1 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("curate.caption.num_frames, max_new_tokens and batch_size must be >= 1")


@dataclass
class Resolution:
    """One resolution bucket of the curriculum: a name the stages select by and its [H, W] size per aspect bucket."""
    name: str = "64px"
    sizes: List[List[int]] = field(default_factory=lambda: [[64, 64]])   # [H, W], multiples of 16


@dataclass
class CurateConfig:
    input_uri: str = "data/demo"          # a folder, or s3://bucket/prefix (read with the minio client)
    clip_frames: int = 17                 # longest clip length; 8k+1 so the VAE's first frame is an image latent
    bucket_frames: List[int] = field(default_factory=list)   # shorter 8k+1 lengths for shorter scenes (MUG-V: 73)
    bucket_sizes: List[List[int]] = field(default_factory=list)  # [H, W] buckets; [] = [[height, width]]
    frame_stride: int = 1                 # keep every n-th source frame
    max_clips_per_scene: int = 2
    min_clip_s: float = 0.0               # clips shorter than this (at output fps) are not cut; 0 = no limit
    max_clip_s: float = 0.0               # bucket lengths longer than this are not used; 0 = no limit
    height: int = 64                      # output clip size (center crop to this aspect, then resize)
    width: int = 64
    scene_threshold: float = 27.0         # PySceneDetect ContentDetector threshold (its default)
    adaptive_threshold: float = 3.0       # PySceneDetect AdaptiveDetector threshold (its default)
    gradual_min_change: float = 30.0      # fade/dissolve: mean |frame(a) - frame(b)| (0-255 luma) across the window
    gradual_max_residual: float = 0.25    # fade/dissolve: blend-fit residual / change; lower = stricter
    gradual_window: int = 8               # frames spanned by the fade/dissolve test
    cut_check_threshold: float = 25.0     # a clip whose max frame change (0-255 HSV) exceeds this still has a cut
    analysis_width: int = 256             # scene/text analysis on frames downscaled to this width (PySceneDetect-like)
    sharpness_min: float = 200.0          # Laplacian variance bounds, docs/mugv.md §1.1 (on source frames)
    sharpness_max: float = 2000.0
    brightness_min: float = 0.05          # mean luma in [0, 1]; black frames are rejected
    brightness_max: float = 0.95
    motion_min: float = 1.0               # docs/mugv.md §1.1: mean optical-flow magnitude on 3 frame pairs in [1, 20]
    motion_max: float = 20.0
    motion_height: int = 320              # flow is measured at this frame height (Open-Sora practice, 320x576)
    text_area_max: float = 0.05           # choice (the report uses an MLLM): fraction of the frame covered by text
    dedup_max_distance: int = 8           # choice: mean Hamming distance (of 64) of frame pHashes for a near-duplicate
    max_pixels: int = 4096 * 2304         # larger frames are a failed input ("resolution too large"), never an OOM
    max_frames: int = 20000               # longer inputs are decoded up to this many frames (a time bound:
                                          # decoding streams, memory does not grow with length)
    default_caption: str = "a video"      # used when no sidecar <video>.txt exists and the backend is "sidecar"
    aesthetic: AestheticConfig = field(default_factory=AestheticConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    shard_size: int = 4                   # inputs per map_task shard (each shard cached and retried on its own)
    store_uri: str = ""                   # per-input result store; "" = <tracking.root>/artifacts/curate/store
    resolutions: List[Resolution] = field(default_factory=list)   # the curriculum's resolution buckets, e.g. 360p
                                          # and 720p; a clip is cut at the largest its source covers (never
                                          # upscaled) and encoded at every one it covers; [] = one, "base", of the
                                          # size buckets above
    keyframes: int = 0                    # key frames taken from each kept clip as image samples (0 = none; the
                                          # tiny and 10B configs take 1, the middle frame)

    def __post_init__(self) -> None:
        lengths = [("clip_frames", self.clip_frames)]
        lengths += [(f"bucket_frames[{i}]", f) for i, f in enumerate(self.bucket_frames)]
        for k, n in lengths:
            if n % 8 != 1:
                raise ValueError(f"curate.{k} must be 8k+1 (e.g. 17, 33), got {n}")
        for i, hw in enumerate(self.bucket_sizes or [[self.height, self.width]]):
            if len(hw) != 2 or hw[0] % 16 or hw[1] % 16 or min(hw) < 16:
                raise ValueError(f"curate.bucket_sizes[{i}] must be [H, W], multiples of 16 (VAE x8, DiT patch 2), "
                                 f"got {hw}")
        if self.height % 16 or self.width % 16:
            raise ValueError(f"curate.height/width must be multiples of 16 (VAE x8, DiT patch 2), "
                             f"got {self.height}x{self.width}")
        for lo, hi in (("sharpness_min", "sharpness_max"), ("brightness_min", "brightness_max"),
                       ("motion_min", "motion_max")):
            if getattr(self, lo) > getattr(self, hi):
                raise ValueError(f"curate.{lo} must be <= curate.{hi}")
        if self.max_clip_s and self.min_clip_s > self.max_clip_s:
            raise ValueError("curate.min_clip_s must be <= curate.max_clip_s")
        if self.frame_stride < 1 or self.max_clips_per_scene < 1:
            raise ValueError("curate.frame_stride and curate.max_clips_per_scene must be >= 1")
        for k in ("shard_size", "gradual_window", "analysis_width", "motion_height", "max_pixels", "max_frames"):
            if getattr(self, k) < 1:
                raise ValueError(f"curate.{k} must be >= 1, got {getattr(self, k)}")
        if self.keyframes < 0:
            raise ValueError(f"curate.keyframes must be >= 0 (key frames per kept clip), got {self.keyframes}")
        names = [r.name for r in self.resolutions]
        if len(set(names)) != len(names) or any(not n or not n.replace("_", "").replace("-", "").isalnum()
                                                for n in names):
            raise ValueError(f"curate.resolutions: names must be unique and made of letters, digits, '-' or '_' "
                             f"(e.g. 360p, 720p), got {names}")
        for r in self.resolutions:
            for i, hw in enumerate(r.sizes):
                if len(hw) != 2 or hw[0] % 16 or hw[1] % 16 or min(hw) < 16:
                    raise ValueError(f"curate.resolutions['{r.name}'].sizes[{i}] must be [H, W], multiples of 16 "
                                     f"(VAE x8, DiT patch 2), got {hw}")
            if not r.sizes:
                raise ValueError(f"curate.resolutions['{r.name}'].sizes must list at least one [H, W]")
        if self.resolutions and self.bucket_sizes:
            raise ValueError("curate: set either bucket_sizes (one resolution) or resolutions (several, each with "
                             "its sizes), not both")

    @property
    def resolution_list(self) -> List[Resolution]:
        """The resolution buckets, smallest first (by the pixels of their first size); without ``resolutions``
        one, "base", of ``bucket_sizes`` (or ``[height, width]``)."""
        res = self.resolutions or [Resolution(name="base", sizes=[list(hw) for hw in self.bucket_sizes]
                                              or [[self.height, self.width]])]
        return sorted(res, key=lambda r: r.sizes[0][0] * r.sizes[0][1])

    @property
    def sizes(self) -> List[List[int]]:
        """The [H, W] buckets of the largest resolution (``bucket_sizes`` or the single ``[height, width]``)."""
        return [list(hw) for hw in self.resolution_list[-1].sizes]

    @property
    def frame_buckets(self) -> List[int]:
        """The clip lengths (8k+1 frames), longest first."""
        return sorted({self.clip_frames, *self.bucket_frames}, reverse=True)


@dataclass
class TextEncoderConfig:
    pretrained: str = ""       # local dir or hub id of a T5 encoder (cluster: DeepFloyd/t5-v1_1-xxl); "" = tiny random
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    d_ff: int = 128
    max_length: int = 32       # MUG-V: 300
    seed: int = 0


@dataclass
class CompressConfig:
    vae: VAEConfig = field(default_factory=VAEConfig)
    vae_pretrained: str = ""   # path to VAE weights; "" = build from config and train briefly on the clips
    vae_train_steps: int = 40  # 0 = keep random init (recorded in the LatentDataset identity)
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    holdout_fraction: float = 0.25   # clips held out for evaluation, chosen by clip-id hash
    shard_size: int = 64             # samples per safetensors shard
    encode_batch_size: int = 8       # samples of one shape per VAE encode call (memory: the VAE's micro_batch_size)
    seed: int = 0
    vae_refit: int = 0               # the fitted VAE is reused by later runs (new clips too); raise this to fit again
    store_uri: str = ""              # latent store (raw latents per clip): a local or shared folder;
    #                                  "" = <tracking.root>/artifacts/compress/latent-store

    def __post_init__(self) -> None:
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ValueError(f"compress.holdout_fraction must be in [0, 1), got {self.holdout_fraction}")
        if self.encode_batch_size < 1:
            raise ValueError(f"compress.encode_batch_size must be >= 1, got {self.encode_batch_size}")
        if self.vae_refit < 0:
            raise ValueError(f"compress.vae_refit must be >= 0 (a counter: raise it to fit the VAE again), "
                             f"got {self.vae_refit}")
        if "://" in self.store_uri:
            raise ValueError(f"compress.store_uri must be a folder path (local or a shared file system), got "
                             f"{self.store_uri!r}")


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


@dataclass
class PipelineConfig:
    name: str = "tiny"
    curate: CurateConfig = field(default_factory=CurateConfig)
    compress: CompressConfig = field(default_factory=CompressConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)   # per kind of Flyte task (cluster)

    def __post_init__(self) -> None:
        if self.compress.vae.latent_channels != self.train.dit.in_channels:
            raise ValueError(f"train.dit.in_channels ({self.train.dit.in_channels}) must equal "
                             f"compress.vae.latent_channels ({self.compress.vae.latent_channels})")
        if not self.compress.text.pretrained and self.compress.text.d_model != self.train.dit.caption_channels:
            raise ValueError(f"train.dit.caption_channels ({self.train.dit.caption_channels}) must equal "
                             f"compress.text.d_model ({self.compress.text.d_model})")
        if self.evaluate.num_frames % 8 != 1:
            raise ValueError(f"evaluate.num_frames must be 8k+1, got {self.evaluate.num_frames}")
        named = [(f"train.stages[{i}]", s) for i, s in enumerate(self.train.stages)]
        for where, stage in named + [("train.post_train", self.train.post_train)]:
            check_selection(stage, self.curate, where)


def check_selection(stage: StageConfig, curate: CurateConfig, where: str) -> None:
    """A stage's data selection against what curation and compression will produce (the config-time half; the
    pretrain task checks the LatentDataset itself before any stage runs): known resolution names, clip lengths
    curation cuts (or 1: images and key frames), aspect ratios some selected size has."""
    sel, resolutions = stage.data, curate.resolution_list
    known = [r.name for r in resolutions]
    missing = [r for r in sel.resolutions if r not in known]
    if missing:
        raise ValueError(f"{where}.data.resolutions ('{stage.name}'): {missing} not among curate.resolutions "
                         f"{known}")
    lengths = curate.frame_buckets
    bad = [f for f in sel.frames if f != 1 and f not in lengths]
    if bad:
        raise ValueError(f"{where}.data.frames ('{stage.name}'): {bad} not among the clip lengths curation cuts "
                         f"{lengths} (curate.clip_frames, curate.bucket_frames) or 1 (images)")
    sizes = [hw for r in resolutions if not sel.resolutions or r.name in sel.resolutions for hw in r.sizes]
    for a in sel.aspect_ratios:
        if not any(aspect_matches(h, w, a) for h, w in sizes):
            raise ValueError(f"{where}.data.aspect_ratios ('{stage.name}'): no selected size has aspect {a} "
                             f"(sizes {sizes})")


# ---------------------------------------------------------------- strict loading

def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{path or '<root>'}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, path)
    if origin in (list, List):
        if not isinstance(value, list):
            raise ValueError(f"{path}: expected a list, got {type(value).__name__}")
        (item_tp,) = typing.get_args(tp)
        return [_convert(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        if type(value) is not tp:
            raise ValueError(f"{path}: expected {tp.__name__}, got {type(value).__name__} ({value!r})")
        return value
    raise TypeError(f"{path}: unsupported config type {tp}")


def from_dict(cls: type, data: Dict[str, Any], path: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ValueError naming the key."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        where = f"{path}." if path else ""
        raise ValueError(f"{where}{unknown[0]}: unknown config key (valid keys: {', '.join(sorted(fields))})")
    kwargs = {k: _convert(hints[k], v, f"{path}.{k}" if path else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ValueError(f"{path}: {e}" if path and not str(e).startswith(path) else str(e)) from None


def load_config(path: str | Path) -> PipelineConfig:
    """The pipeline config of a YAML file; every problem is one ValueError/FileNotFoundError naming the file (and the
    line and column of a YAML syntax error, the key of a wrong value)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {p} (start from configs/tiny.yaml)")
    text = p.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(p)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"{where}: YAML syntax error: {problem}") from None
    if data is None:
        raise ValueError(f"{p}: the file is empty; a config names at least the pipeline (`name: ...`) and lists what "
                         "differs from the defaults (configs/tiny.yaml shows every key)")
    if not isinstance(data, dict):
        raise ValueError(f"{p}: the top level must be a mapping of sections (name, curate, compress, train, ...), "
                         f"got a {type(data).__name__}")
    try:
        return from_dict(PipelineConfig, data)
    except ValueError as e:
        raise ValueError(f"{p}: {e}") from None


def to_dict(cfg: Any) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_hash(cfg: Any) -> str:
    """Stable content hash of a config (sha256 of canonical JSON), first 16 hex digits."""
    return sha256_json(to_dict(cfg), n=16)
