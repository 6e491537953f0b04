"""The models behind the model-based metrics: video features for the Fréchet distance, and CLIP for text-video
alignment (docs/evaluation.md).

    feats = video_features(cfg, vae)               # "i3d": I3DFeatures(cfg.i3d_path); "vae": VAEFeatures(vae)
    feats(frames_THWC) -> np.ndarray [D]           # one feature vector per video (uint8 RGB [T, H, W, 3])
    clip = ClipScorer(cfg)                         # CLIPModel from cfg.clip_pretrained, or a tiny random one
    clip.score(prompt, frames_THWC) -> float       # mean cosine(text, frame) over cfg.clip_frames frames

I3D follows StyleGAN-V / "FVD done right" (universome/fvd-comparison ``compare_metrics.py``; songweige/content-
debiased-fvd ``cdfvd/third_party/i3d/utils.py`` ``preprocess_i3d``): ``torch.jit.load("i3d_torchscript.pt")``, videos
[B, 3, T, 224, 224] float in [-1, 1] (frames resized bilinearly to 224x224, then 2 x / 255 - 1), called with
``rescale=False, resize=False, return_features=True`` -> [B, 400] logits-layer features before the softmax.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, List

import cv2
import numpy as np

from common.config import EvalConfig
from common.hashing import sha256_file

I3D_SIZE = 224
I3D_KWARGS = dict(rescale=False, resize=False, return_features=True)   # inputs already in [-1, 1] at 224x224


class I3DFeatures:
    """FVD features: the Kinetics-400 I3D TorchScript port (``i3d_torchscript.pt``) loaded from a local path."""

    def __init__(self, path: str, device: str = "cpu") -> None:
        import torch

        if not Path(path).is_file():
            raise FileNotFoundError(f"evaluate.i3d_path {path} not found: download i3d_torchscript.pt (StyleGAN-V's "
                                    "FVD detector) to the cluster's model store and point evaluate.i3d_path at it")
        self.device = device
        self.model = torch.jit.load(str(path), map_location=device).eval()
        self.identity = f"i3d:{sha256_file(path, n=16)}"
        self.comparable = True   # the published FVD network (still: few samples, our clips)

    @staticmethod
    def preprocess(frames_THWC: np.ndarray):
        """uint8 [T, H, W, 3] -> float [1, 3, T, 224, 224] in [-1, 1] (bilinear resize, as preprocess_i3d)."""
        import torch
        import torch.nn.functional as F

        x_T3HW = torch.from_numpy(np.ascontiguousarray(frames_THWC)).permute(0, 3, 1, 2).float()
        x_T3HW = F.interpolate(x_T3HW, size=(I3D_SIZE, I3D_SIZE), mode="bilinear", align_corners=False)
        return (2.0 * x_T3HW / 255.0 - 1.0).permute(1, 0, 2, 3)[None].contiguous()

    def __call__(self, frames_THWC: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            out = self.model(self.preprocess(frames_THWC).to(self.device), **I3D_KWARGS)
        return out.reshape(-1).float().cpu().numpy()


class VAEFeatures:
    """The project's own feature space: the VAE encoder's posterior mean, mean-pooled over (t, h, w) -> [C].
    Needs H, W multiples of the VAE's spatial factor (every sample and clip here is). Not comparable to FVD."""

    def __init__(self, vae: Any, identity: str) -> None:
        self.vae = vae.eval()
        self.identity = f"vae:{identity}"
        self.comparable = False

    def __call__(self, frames_THWC: np.ndarray) -> np.ndarray:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(frames_THWC)).permute(3, 0, 1, 2).float() / 127.5 - 1.0
        with torch.no_grad():
            z = self.vae.encode(x[None]).mode()                   # (1, C, t, h, w)
        return z.mean(dim=(2, 3, 4))[0].float().numpy()


def video_features(cfg: EvalConfig, vae: Any, vae_identity: str) -> Callable[[np.ndarray], np.ndarray]:
    """The feature extractor ``cfg.features`` names (it has ``.identity`` and ``.comparable``)."""
    if cfg.features == "i3d":
        import torch

        return I3DFeatures(cfg.i3d_path, "cuda" if torch.cuda.is_available() else "cpu")
    return VAEFeatures(vae, vae_identity)




class ClipScorer:
    """Text-video alignment with CLIP: ``score(prompt, frames)`` = mean cosine between the prompt's text embedding and
    the image embeddings of ``cfg.clip_frames`` evenly spaced frames.

    ``cfg.clip_pretrained``: a local folder with a transformers ``CLIPModel`` and its tokenizer (e.g. a download of
    openai/clip-vit-base-patch32). "" builds a tiny CLIP from a config, randomly initialised with ``cfg.clip_seed``
    and a byte-level tokenizer (as curation's aesthetic scorer does): its scores are noise and ``random`` says so.
    """

    def __init__(self, cfg: EvalConfig) -> None:
        import torch

        self.cfg = cfg
        self.random = not cfg.clip_pretrained
        if cfg.clip_pretrained:
            from transformers import AutoTokenizer, CLIPModel

            self.model = CLIPModel.from_pretrained(cfg.clip_pretrained).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(cfg.clip_pretrained)
            self.identity = f"clip:{cfg.clip_pretrained}"
        else:
            from transformers import CLIPConfig, CLIPModel

            from models.text_encoder import byte_level_tokenizer

            h = cfg.tiny_clip_hidden
            self.tokenizer = byte_level_tokenizer(32)
            text = dict(hidden_size=h, intermediate_size=2 * h, num_hidden_layers=cfg.tiny_clip_layers,
                        num_attention_heads=4, vocab_size=len(self.tokenizer), max_position_embeddings=32,
                        pad_token_id=self.tokenizer.pad_token_id, bos_token_id=self.tokenizer.eos_token_id,
                        eos_token_id=self.tokenizer.eos_token_id)
            vision = dict(hidden_size=h, intermediate_size=2 * h, num_hidden_layers=cfg.tiny_clip_layers,
                          num_attention_heads=4, image_size=cfg.tiny_clip_image_size, patch_size=8)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.clip_seed)
                self.model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=h)).eval()
            self.identity = (f"clip:tiny-random(seed={cfg.clip_seed},hidden={h},layers={cfg.tiny_clip_layers},"
                             f"image={cfg.tiny_clip_image_size})")
        self.image_size = int(self.model.config.vision_config.image_size)
        self.comparable = not self.random

    def preprocess(self, frames_THWC: np.ndarray):
        """uint8 [T, H, W, 3] -> [T, 3, S, S] (``clip_preprocess``, bicubic as CLIP's own preprocessing)."""
        from tasks.curate.aesthetic import clip_preprocess

        return clip_preprocess(frames_THWC, self.image_size, cv2.INTER_CUBIC)

    @staticmethod
    def _pooled(out: Any):
        return out if hasattr(out, "shape") else out.pooler_output   # transformers 5 returns a model output

    def embed_text(self, prompts: List[str]) -> np.ndarray:
        import torch

        tok = self.tokenizer(list(prompts), padding=True, truncation=True,
                             max_length=int(self.model.config.text_config.max_position_embeddings),
                             return_tensors="pt")
        with torch.no_grad():
            out = self.model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
        return self._pooled(out).float().numpy()

    def embed_frames(self, frames_THWC: np.ndarray) -> np.ndarray:
        import torch

        idx = np.linspace(0, len(frames_THWC) - 1, min(self.cfg.clip_frames, len(frames_THWC))).round().astype(int)
        with torch.no_grad():
            out = self.model.get_image_features(pixel_values=self.preprocess(frames_THWC[idx]))
        return self._pooled(out).float().numpy()

    def score(self, prompt: str, frames_THWC: np.ndarray) -> float:
        from tasks.evaluate.metrics import clip_alignment

        return clip_alignment(self.embed_text([prompt])[0], self.embed_frames(frames_THWC))
