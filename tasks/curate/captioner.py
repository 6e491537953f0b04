"""Clip captions behind one interface: ``Captioner.caption(frames_THWC, aesthetic) -> str``, and
``caption_batch([(frames_THWC, aesthetic), ...]) -> [str]`` for several clips in one model call.

- ``QwenVLCaptioner``: a transformers Qwen2-VL model (the report's captioner family, docs/mugv.md §1.2) asked for one
  dense paragraph (scene -> lighting -> background -> subject -> framing -> camera -> motion). ``pretrained`` is a local
  folder with the model and its processor (cluster: a Qwen2-VL-7B caption fine-tune). ``pretrained == ""`` builds
  a tiny, randomly initialised Qwen2-VL from a ``Qwen2VLConfig`` with a byte-level tokenizer made offline: its
  captions are random bytes, useful only to exercise the code path (the manifest says so in ``caption_source``).
- ``SidecarCaptioner``: the ``<video>.txt`` caption, or the configured default.

Frames become Qwen2-VL video patches here (numpy, the layout of ``Qwen2VLVideoProcessor.patchify``), so the path
does not need torchvision. Every caption gets the clip's aesthetic score appended as the report does at inference
(``" aesthetic score: 5.3."``).

Batches: ``QwenVLCaptioner.caption_batch`` left-pads the prompts to the longest one (attention mask 0 on the pads;
Qwen2-VL's rope index counts positions from the first real token) and concatenates the videos' patches, then decodes
greedily. The tiny random model gives the same captions batched as one by one (tests/test_caption_batch.py). That is
not a bitwise guarantee in general: the padded batch changes matmul and attention shapes, so logits can differ in
the last bits, and greedy decoding then picks another token only where two top logits are that close.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np

from common.config import CaptionConfig

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
            "<|video_pad|>"]


def with_aesthetic(caption: str, aesthetic: Optional[float]) -> str:
    """``caption`` + " aesthetic score: x.x." (MUG-V inference appends the same string to prompts)."""
    caption = " ".join(str(caption).split()).rstrip()
    if aesthetic is None or not np.isfinite(aesthetic):
        return caption
    return f"{caption} aesthetic score: {aesthetic:.1f}."


class Captioner:
    """One interface for every caption source."""
    source = "base"

    def caption(self, frames_THWC: np.ndarray, aesthetic: Optional[float]) -> str:
        raise NotImplementedError

    def caption_batch(self, items: Sequence[Tuple[np.ndarray, Optional[float]]]) -> List[str]:
        """Captions of several (frames_THWC, aesthetic) items; the same strings as ``caption`` one by one."""
        return [self.caption(frames_THWC, aesthetic) for frames_THWC, aesthetic in items]

    def frames_read(self, frames_THWC: np.ndarray) -> np.ndarray:
        """The frames of a clip that ``caption`` reads, as a new array (no view of the clip) that gives the same
        caption: what a caller holds until the clip's batch is captioned. All of them unless a subclass knows."""
        return frames_THWC


class SidecarCaptioner(Captioner):
    source = "sidecar"

    def __init__(self, text: str) -> None:
        self.text = text

    def caption(self, frames_THWC: np.ndarray, aesthetic: Optional[float]) -> str:
        return with_aesthetic(self.text, aesthetic)

    def frames_read(self, frames_THWC: np.ndarray) -> np.ndarray:
        return np.empty((0, *frames_THWC.shape[1:]), frames_THWC.dtype)   # the text does not depend on them


def tiny_tokenizer():
    """A byte-level BPE tokenizer (256 byte tokens, no merges) + Qwen2-VL's special tokens, built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def tiny_qwen2vl(cfg: CaptionConfig, tokenizer):
    """A randomly initialised Qwen2-VL of ``cfg``'s tiny widths, token ids matching ``tokenizer``."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    ids = {s: tokenizer.convert_tokens_to_ids(s) for s in SPECIALS}
    head_dim = cfg.tiny_hidden // cfg.tiny_heads
    half = head_dim // 2   # mrope sections (t, h, w) must sum to head_dim / 2
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=cfg.tiny_hidden, intermediate_size=2 * cfg.tiny_hidden,
                         num_hidden_layers=cfg.tiny_layers, num_attention_heads=cfg.tiny_heads,
                         num_key_value_heads=cfg.tiny_heads, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [half - 2 * (half // 3), half // 3, half // 3]},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=cfg.tiny_layers, embed_dim=32, hidden_size=cfg.tiny_hidden, num_heads=4, mlp_ratio=2,
                           patch_size=cfg.patch_size, spatial_merge_size=cfg.merge_size,
                           temporal_patch_size=cfg.temporal_patch_size),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(cfg.seed)
    return Qwen2VLForConditionalGeneration(config).eval()


def smart_size(h: int, w: int, factor: int, min_pixels: int, max_pixels: int) -> tuple:
    """(H, W) multiples of ``factor`` with about the same aspect and a pixel count in [min_pixels, max_pixels]."""
    hb, wb = max(factor, round(h / factor) * factor), max(factor, round(w / factor) * factor)
    if hb * wb > max_pixels:
        beta = (h * w / max_pixels) ** 0.5
        hb, wb = max(factor, int(h / beta // factor) * factor), max(factor, int(w / beta // factor) * factor)
    elif hb * wb < min_pixels:
        beta = (min_pixels / (h * w)) ** 0.5
        hb, wb = int(np.ceil(h * beta / factor)) * factor, int(np.ceil(w * beta / factor)) * factor
    return hb, wb


def video_patches(frames_THWC: np.ndarray, patch: int, merge: int, tps: int, min_pixels: int,
                  max_pixels: int) -> tuple:
    """uint8 [T,H,W,3] -> (pixel_values [grid_t*gh*gw, 3*tps*patch*patch] float32, grid_thw (t, gh, gw))."""
    t, h, w, _ = frames_THWC.shape
    rh, rw = smart_size(h, w, patch * merge, min_pixels, max_pixels)
    x_THWC = np.stack([cv2.resize(np.ascontiguousarray(f), (rw, rh), interpolation=cv2.INTER_CUBIC)
                       for f in frames_THWC]).astype(np.float32) / 255.0
    x_THWC = (x_THWC - CLIP_MEAN) / CLIP_STD
    if pad := -t % tps:
        x_THWC = np.concatenate([x_THWC, np.repeat(x_THWC[-1:], pad, 0)])
    x_TCHW = x_THWC.transpose(0, 3, 1, 2)
    gt, gh, gw = len(x_TCHW) // tps, rh // patch, rw // patch
    p = x_TCHW.reshape(gt, tps, 3, gh // merge, merge, patch, gw // merge, merge, patch)
    p = p.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)   # (gt, gh/m, gw/m, mh, mw, C, tps, ph, pw)
    return np.ascontiguousarray(p.reshape(gt * gh * gw, 3 * tps * patch * patch)), (gt, gh, gw)


class QwenVLCaptioner(Captioner):
    """Dense paragraph captions from a Qwen2-VL model (tiny random when ``cfg.pretrained`` is "")."""

    def __init__(self, cfg: CaptionConfig) -> None:
        self.cfg = cfg
        if cfg.pretrained:
            from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration

            self.tokenizer = AutoTokenizer.from_pretrained(cfg.pretrained)
            self.model = Qwen2VLForConditionalGeneration.from_pretrained(cfg.pretrained, dtype="auto").eval()
            self.source = f"qwen2_vl:{cfg.pretrained}"
        else:
            self.tokenizer = tiny_tokenizer()
            self.model = tiny_qwen2vl(cfg, self.tokenizer)
            self.source = f"qwen2_vl:tiny-random(seed={cfg.seed})"
        v = self.model.config.vision_config
        self.patch, self.merge, self.tps = int(v.patch_size), int(v.spatial_merge_size), int(v.temporal_patch_size)

    def prompt(self, num_video_tokens: int) -> str:
        return ("<|im_start|>user\n<|vision_start|>" + "<|video_pad|>" * num_video_tokens + "<|vision_end|>"
                + self.cfg.prompt + "<|im_end|>\n<|im_start|>assistant\n")

    def caption(self, frames_THWC: np.ndarray, aesthetic: Optional[float]) -> str:
        return self.caption_batch([(frames_THWC, aesthetic)])[0]

    def _sampled(self, num_frames: int) -> np.ndarray:
        """Indices of the ``cfg.num_frames`` frames (or all, when fewer) given to the model, spread evenly; on its
        own output it is the identity (``linspace(0, m - 1, m)`` is exact), so ``frames_read`` keeps the caption."""
        return np.linspace(0, num_frames - 1, min(self.cfg.num_frames, num_frames)).round().astype(int)

    def frames_read(self, frames_THWC: np.ndarray) -> np.ndarray:
        return frames_THWC[self._sampled(len(frames_THWC))]   # fancy indexing: a copy

    def caption_batch(self, items: Sequence[Tuple[np.ndarray, Optional[float]]]) -> List[str]:
        """One ``generate`` call for all ``items``: prompts left-padded to the longest (attention mask 0 on the pads,
        so Qwen2-VL's rope index and attention skip them), the videos' patches concatenated in order, greedy."""
        import torch

        if not items:
            return []
        prompts, pixels, grids = [], [], []
        for frames_THWC, _ in items:
            p, grid = video_patches(frames_THWC[self._sampled(len(frames_THWC))], self.patch, self.merge, self.tps,
                                    self.cfg.min_pixels, self.cfg.max_pixels)
            pixels.append(p)
            grids.append(grid)
            prompts.append(self.prompt(grid[0] * grid[1] * grid[2] // self.merge ** 2))
        ids = self.tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
        from tasks.curate.aesthetic import one_thread

        with torch.inference_mode(), one_thread(not self.cfg.pretrained):
            out = self.model.generate(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"],
                                      pixel_values_videos=torch.from_numpy(np.concatenate(pixels)).to(self.model.dtype),
                                      video_grid_thw=torch.tensor(grids), max_new_tokens=self.cfg.max_new_tokens,
                                      do_sample=False)
        texts = self.tokenizer.batch_decode(out[:, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        return [with_aesthetic("".join(c if c.isprintable() else " " for c in text), aesthetic)
                for text, (_, aesthetic) in zip(texts, items)]
