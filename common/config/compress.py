"""``compress:``: the VAE and the text encoder that turn clips and captions into a LatentDataset."""
from __future__ import annotations

from dataclasses import dataclass, field

from models.config import VAEConfig


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
