"""``curate:``: what curation cuts, filters, scores and captions (clip lengths, sizes, resolution buckets)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List


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
    buffer_mb: int = 768                  # choice: decoded frames held so that a scene's windows are curated in the
                                          # pass that decodes it (720p: ~11 s of 24 fps, 4K: ~1.3 s); a longer
                                          # scene's windows are decoded again in a second pass. 0 = always two passes
    decoder: str = "pyav"                 # "pyav" | "decord": the same frames on MP4; decord holds up to the whole
                                          # compressed file in memory and busy-reads (tasks/curate/decode.py)
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
        if self.decoder not in ("pyav", "decord"):
            raise ValueError(f"curate.decoder must be 'pyav' (default) or 'decord', got {self.decoder!r}")
        if self.buffer_mb < 0:
            raise ValueError(f"curate.buffer_mb must be >= 0 (MB of decoded frames held; 0 = two passes), "
                             f"got {self.buffer_mb}")
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
