"""A stage's task mix (``stage.task_mix``): which task each micro-batch trains and what the task does to its batch.

    share = draw_task(stage.task_mix, stage.seed, step, vrank)   # a TaskShare: task, ratio, loss_weight
    batch, cond_BT = task_batch(batch, share.task)               # t2v: as is; t2i: latent frame 0; i2v: cond frame 0
    check_task_shapes(stage, shapes, patch_size)                 # at load: i2v needs >= 2 latent frames per clip

One task per micro-batch (one shape per micro-batch), drawn with probability ratio / sum(ratios) from its own
generator, ``numpy.random.default_rng([seed, step, virtual rank, TASK_STREAM])``: never the flow-input generator,
so a resumed run draws the same tasks and a mix of one task draws nothing (a pure t2v stage is the plain stage
bitwise). As in MUG-V's training code (docs/mugv.md §4.3, §5.1):

- ``t2v``: text to video, the clip as it is;
- ``i2v``: image to video: latent frame 0 is the clean condition: x_t keeps x0 there, the model gets
  ``cond_mask_BT[:, 0] = True`` (t = 0 modulation on those tokens) and the frame is left out of the loss;
- ``t2i``: text to image: latent frame 0 alone (the VAE encodes the first pixel frame on its own: an image latent),
  so the micro-batch has T·H·W/patch tokens of one frame. A micro-batch of images (image files and key frames, one
  latent frame: the sampler never mixes them with clips) is always t2i, with the mix's t2i loss weight.

The micro-batch's loss is multiplied by its task's ``loss_weight`` (MUG-V: t2i 0.3).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from common.config import StageConfig, TaskShare
from trainer.data import Batch

TASK_STREAM = 0x7A5C_2024   # the task draw's stream tag (the flow inputs use [seed, step, vrank] alone)


def draw_task(mix: Sequence[TaskShare], seed: int, step: int, vrank: int, image: bool = False) -> TaskShare:
    """The task of micro-batch (step, virtual rank): ratios normalised over the mix; one task: no draw at all.
    ``image``: the micro-batch is images (one latent frame), which always train as the mix's t2i."""
    if image:
        for share in mix:
            if share.task == "t2i":
                return share
        raise ValueError(f"an image micro-batch needs t2i in the task mix, got {[t.task for t in mix]}")
    if len(mix) == 1:
        return mix[0]
    u = np.random.default_rng([seed, step, vrank, TASK_STREAM]).random()
    total, acc = sum(t.ratio for t in mix), 0.0
    for share in mix:
        acc += share.ratio / total
        if u < acc:
            return share
    return mix[-1]   # u within rounding of 1


def task_batch(batch: Batch, task: str) -> Tuple[Batch, Optional[torch.Tensor]]:
    """(the batch the task trains on, cond_BT: True on the clean conditioning latent frames, or None)."""
    if task == "t2v":
        return batch, None
    if task == "t2i":
        return Batch(batch.clip_ids, batch.latents_BCTHW[:, :, :1].contiguous(), batch.text_BLD,
                     batch.text_mask_BL), None
    if task == "i2v":
        b, _, t, _, _ = batch.latents_BCTHW.shape
        cond_BT = torch.zeros(b, t, dtype=torch.bool, device=batch.latents_BCTHW.device)
        cond_BT[:, 0] = True
        return batch, cond_BT
    raise ValueError(f"unknown task '{task}' (expected t2v, i2v or t2i)")


def check_task_shapes(stage: StageConfig, clip_ids: List[str], shapes: List[Tuple[int, ...]],
                      patch_size: Sequence[int]) -> None:
    """Fail at load, naming the stage, on samples the mix cannot train: images (one latent frame) train as t2i, so
    the mix needs t2i when there are any; t2i keeps one frame, so the temporal patch must be 1. (i2v is drawn only
    for video micro-batches, which have >= 2 latent frames: 8k+1 pixel frames with k >= 1.)"""
    tasks = {t.task for t in stage.task_mix}
    images = [c for c, s in zip(clip_ids, shapes) if s[1] < 2]
    if images and "t2i" not in tasks:
        raise ValueError(f"stage '{stage.name}': {len(images)} sample(s) are images (one latent frame, e.g. "
                         f"{images[0]}), which train as t2i, but task_mix has no t2i: add it to the mix, or leave "
                         "frames 1 out of the stage's data selection")
    if ("t2i" in tasks or images) and patch_size[0] != 1:
        raise ValueError(f"stage '{stage.name}': task_mix has t2i (one latent frame), which needs dit.patch_size[0] "
                         f"== 1, got {patch_size[0]}")
