"""The task mix of a training stage (stage.task_mix: t2v, i2v, t2i) and the quality ranking of top_fraction
(stage.quality).

Checked in one process: i2v keeps latent frame 0 clean in x_t, passes cond_mask_BT to the model and leaves frame 0
out of the loss (changing the model's output there changes nothing); t2i trains latent frame 0 alone and scales its
loss by the task's weight; tasks are drawn per micro-batch from their own generator (a one-task mix draws nothing;
the flow inputs are the plain stage's); images without t2i in the mix fail at load naming the stage, and an image
micro-batch is always t2i; the quality
ranking keeps the expected clips of a hand-made index (z-scored weighted sum, motion band, log sharpness, caption
words, NaN last), the default keeps the score ranking, and a missing column is an error naming it and the fix.
Through the real launch path, on a mixed image/video stage (data frames [17, 1]): a t2v/i2v/t2i mix under DP=2
logs per-task sample counts (images always t2i), equals PP=2 with 2 micro-batches, and a run SIGKILLed after step 3
resumes and ends bitwise equal to an uninterrupted one.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from common.config import DataSelection, QualityRanking, StageConfig, TaskShare
from helpers import (
    TINY_DIT,
    assert_equal_step_folders,
    killed_and_rerun,
    run_stage_job,
    stage_config,
    stage_metrics,
    write_latent_dataset,
)
from models.config import DiTConfig
from trainer.job import StageJob

MIX = [TaskShare("t2v", 0.4), TaskShare("i2v", 0.4), TaskShare("t2i", 0.2, 0.3)]   # MUG-V weights t2i 0.3
DIT2 = {**TINY_DIT, "depth": 2}   # pipeline_parallel 2 needs two blocks


def _job(tmp: Path, latents: Path, mix) -> StageJob:
    return StageJob(stage=StageConfig(name="mix", data_parallel=1, task_mix=mix), dit=DiTConfig(**TINY_DIT),
                    latents_dir=str(latents), output_dir=str(tmp / "out"))


CLIP = dict(resolution="64px", num_frames=17, height=64, width=64, kind="clip")
IMAGE = dict(resolution="64px", num_frames=1, height=64, width=64, kind="image")


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    """6 clips (3 latent frames) and 4 images (1): the default selection takes the clips, frames [17, 1] both."""
    tmp = tmp_path_factory.mktemp("mix")
    return tmp, write_latent_dataset(tmp / "latents", n_clips=10, shapes=[(24, 3, 8, 8)] * 6 + [(24, 1, 8, 8)] * 4,
                                     samples=[CLIP] * 6 + [IMAGE] * 4)


def test_i2v_keeps_frame0_clean_passes_the_condition_and_leaves_it_out_of_the_loss(latents):
    from trainer.data import LatentSplit
    from trainer.train import _forward, _loss, micro_batch

    tmp, lat = latents
    job = _job(tmp, lat, [TaskShare("i2v")])
    batch = LatentSplit(lat).batch([0, 1])
    m = micro_batch(job, batch, step=3, vrank=0, vae_factor=8)
    x0 = batch.latents_BCTHW
    assert m.task == "i2v" and m.cond_BT is not None and m.cond_BT.tolist() == [[True, False, False]] * 2
    assert torch.equal(m.x_t[:, :, 0], x0[:, :, 0]) and not torch.equal(m.x_t[:, :, 1], x0[:, :, 1])
    seen = {}

    def model(x, t, text, mask, **kw):
        seen.update(kw)
        return torch.zeros_like(x)
    v = _forward(model, m, rt=_cpu())
    assert torch.equal(seen["cond_mask_BT"], m.cond_BT)
    moved = v.clone()
    moved[:, :, 0] += 10.0
    assert torch.equal(_loss(v, m), _loss(moved, m))
    moved[:, :, 1] += 10.0
    assert not torch.equal(_loss(v, m), _loss(moved, m))
    # the t2v micro-batch of the same (step, vrank) draws the same noise and t: only frame 0 differs in x_t
    plain = micro_batch(_job(tmp, lat, [TaskShare("t2v")]), batch, step=3, vrank=0, vae_factor=8)
    assert plain.cond_BT is None and torch.equal(plain.noise, m.noise) and torch.equal(plain.t_B, m.t_B)
    assert torch.equal(plain.x_t[:, :, 1:], m.x_t[:, :, 1:])


def test_t2i_trains_frame0_alone_with_its_loss_weight(latents):
    from trainer.data import LatentSplit
    from trainer.train import _loss, micro_batch

    tmp, lat = latents
    batch = LatentSplit(lat).batch([2, 3])
    heavy = micro_batch(_job(tmp, lat, [TaskShare("t2i")]), batch, step=1, vrank=0, vae_factor=8)
    light = micro_batch(_job(tmp, lat, [TaskShare("t2i", loss_weight=0.3)]), batch, step=1, vrank=0, vae_factor=8)
    assert heavy.batch.latents_BCTHW.shape == (2, 24, 1, 8, 8) and heavy.x_t.shape == (2, 24, 1, 8, 8)
    assert torch.equal(heavy.batch.latents_BCTHW[:, :, 0], batch.latents_BCTHW[:, :, 0])
    assert light.loss_weight == 0.3 and torch.equal(light.x_t, heavy.x_t)
    v = torch.randn(heavy.x_t.shape, generator=torch.Generator().manual_seed(0))
    assert torch.equal(_loss(v, light), _loss(v, heavy) * 0.3)


def test_tasks_are_drawn_per_micro_batch_from_their_own_generator():
    from trainer.tasks import draw_task

    one = [TaskShare("i2v")]
    assert all(draw_task(one, 1234, s, v) is one[0] for s in range(5) for v in range(3))
    mix = [TaskShare("t2v", 3.0), TaskShare("i2v", 1.0)]
    draws = [draw_task(mix, 1234, s, v).task for s in range(400) for v in range(2)]
    assert draws == [draw_task(mix, 1234, s, v).task for s in range(400) for v in range(2)]   # pure function
    assert 0.70 < draws.count("t2v") / len(draws) < 0.80                                     # ratio 3:1
    assert draws != [draw_task(mix, 99, s, v).task for s in range(400) for v in range(2)]


def test_images_without_t2i_in_the_mix_fail_at_load_naming_the_stage(tmp_path):
    from trainer.tasks import draw_task
    from trainer.train import _check_inputs

    lat = write_latent_dataset(tmp_path / "images", latent_shape=(24, 1, 8, 8))
    with pytest.raises(ValueError, match=r"stage 'mix': 6 sample\(s\) are images .* task_mix has no t2i"):
        _check_inputs(_job(tmp_path, lat, [TaskShare("t2v"), TaskShare("i2v")]))
    _check_inputs(_job(tmp_path, lat, [TaskShare("t2v"), TaskShare("t2i", 0.1, 0.3)]))
    # an image micro-batch is always t2i, with the mix's t2i weight, whatever the draw says
    assert all(draw_task(MIX, 1234, s, v, image=True) is MIX[2] for s in range(20) for v in range(2))
    from trainer.data import LatentSplit
    from trainer.train import micro_batch

    job = _job(tmp_path, lat, MIX)
    for step in range(6):
        m = micro_batch(job, LatentSplit(lat).batch([0, 1]), step=step, vrank=0, vae_factor=8)
        assert (m.task, m.loss_weight, m.cond_BT, m.batch.latents_BCTHW.shape[2]) == ("t2i", 0.3, None, 1)


@pytest.mark.timeout(200)
def test_mixed_tasks_dp2_log_counts_match_pp2_and_resume_bitwise(latents, monkeypatch):
    """A depth-2 DiT: DP=2 and PP=2 x 2 micro-batches (the same virtual ranks, so the same clips, tasks and flow
    inputs; the pipeline stages pass i2v's cond_mask_BT and take t2i's token count) give the same losses (measured:
    equal to the printed digits; grad norms 8.6e-8 relative, weights 2.4e-7; CP=2 and TP=2 + SP the same by hand)."""
    from helpers import load_weights
    from trainer import checkpoint
    from trainer.data import LatentSplit, StepSampler

    tmp, lat = latents
    both = DataSelection(frames=[17, 1])   # a mixed image/video stage
    stage = stage_config(name="mixed", steps=4, checkpoint_interval=2, task_mix=MIX, data=both)
    straight, lines = run_stage_job(tmp, "mixed", stage, lat, dit=DIT2)
    rows = stage_metrics(straight)
    pp, _ = run_stage_job(tmp, "mixed-pp2", stage_config(name="mixed-pp2", steps=4, checkpoint_interval=4, task_mix=MIX,
                                                         data_parallel=1, micro_batches=2, pipeline_parallel=2,
                                                         data=both),
                          lat, dit=DIT2)
    for a, b in zip(rows, stage_metrics(pp)):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * a["loss"] and abs(a["grad_norm"] - b["grad_norm"]) <= \
            1e-5 * a["grad_norm"] and a["task_i2v"] == b["task_i2v"], (a, b)
    w1, w2 = load_weights(checkpoint.latest(straight)), load_weights(checkpoint.latest(pp))
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-5
    assert any("task_mix=t2v:0.4x1,i2v:0.4x1,t2i:0.2x0.3" in line for line in lines)
    counts = [(r["task_t2v"], r["task_i2v"], r["task_t2i"]) for r in rows]
    assert all(sum(c) == 4 for c in counts)                     # 2 DP ranks x 2 clips, each micro-batch one task
    assert {t for c in counts for t, n in zip(("t2v", "i2v", "t2i"), c) if n} == {"t2v", "i2v", "t2i"}, counts
    data = LatentSplit(lat, selection=both)
    sampler = StepSampler(data.shapes, 2, 2, stage.seed, patch_size=(1, 2, 2))
    images = [sum(data.shapes[i][1] == 1 for i in sampler.global_indices(k)) for k in range(4)]
    assert len(data) == 10 and sum(images) > 0, images   # the stage reads its images, which train as t2i
    assert all(c[2] >= n for c, n in zip(counts, images)), (counts, images)
    t2i_only = [r for r, c in zip(rows, counts) if c[2] == 4]
    for r in t2i_only:   # one-frame micro-batches: 16 video tokens per clip instead of 48
        assert r["tokens_per_s"] * r["step_time_s"] == pytest.approx(4 * 16)
    assert all(math.isfinite(r["loss"]) for r in rows)
    resumed = killed_and_rerun(tmp, "mixed-resume", stage, lat, monkeypatch, dit=DIT2)
    assert stage_metrics(resumed) != [] and [r["loss"] for r in stage_metrics(resumed)] == [r["loss"] for r in rows]
    assert [r["task_i2v"] for r in stage_metrics(resumed)] == [r["task_i2v"] for r in rows]
    assert_equal_step_folders(resumed / "step_00000004", straight / "step_00000004")


def _cpu():
    from trainer.device import Runtime

    return Runtime(torch.device("cpu"), "gloo", torch.float32)


# ------------------------------------------------------------------------------------------------ quality ranking


def _index(root: Path, rows) -> Path:
    """A LatentDataset whose clips carry the given (score, aesthetic, motion, sharpness, caption) rows."""
    from common.latents import CURATION, LatentWriter

    w = LatentWriter(root)
    for i, (score, aesthetic, motion, sharpness, caption) in enumerate(rows):
        w.add(f"c{i}", torch.zeros(24, 1, 2, 2), torch.zeros(4, 64), torch.ones(4), caption=caption, score=score,
              aesthetic=aesthetic, motion=motion, sharpness=sharpness)
    w.finish({"vae": {"config": {"spatial_downsample": 8}}, "latent_mean": [0.0] * 24, "latent_std": [1.0] * 24,
              CURATION: {"motion_min": 1.0, "motion_max": 16.0}})   # the band's middle in log space: motion 4
    return root


def test_quality_ranking_picks_the_expected_clips(tmp_path):
    from trainer.data import LatentSplit

    nan = math.nan
    root = _index(tmp_path / "q", [
        # score aesthetic motion sharpness caption
        (0.9, 4.0, 1.0, 100.0, "a"),                                       # c0: best score, static, blurry, short
        (0.1, 6.0, 4.0, 1000.0, "a dense caption of many words here"),    # c1: mid-band motion, sharp, dense
        (0.5, 5.0, 16.0, 300.0, "two words"),                              # c2: at the band's edge
        (0.5, 5.5, 3.5, 900.0, "three short words"),                       # c3: close to the middle
        (nan, 7.0, 4.0, 1000.0, "unknown score"),                          # c4: NaN score
        (0.2, nan, 4.0, 2000.0, "unknown aesthetic"),                      # c5: NaN aesthetic
    ])

    def pick(fraction, **weights):
        return LatentSplit(root, top_fraction=fraction, quality=QualityRanking(**weights)).clip_ids

    assert pick(0.5) == ["c0", "c2", "c3"]                             # default: curation's score, NaN last
    assert pick(0.5) == pick(0.5, score=3.0)                           # one column: its order, whatever the weight
    assert pick(0.33, score=0.0, motion=1.0) == ["c1", "c4"]           # |log m - log 4| = 0 (c5 ties: clip_id)
    assert pick(0.5, score=0.0, sharpness=1.0) == ["c1", "c4", "c5"]   # log sharpness
    assert pick(0.16, score=0.0, caption_length=1.0) == ["c1"]
    # several columns: z-scores over the split, weighted (by hand: c4 2.13, c1 1.13, c3 0.47, c2 -1.57, c0 -3.13)
    assert pick(0.5, score=0.0, aesthetic=1.0, motion=0.5, sharpness=0.5) == ["c1", "c3", "c4"]
    # a NaN in a weighted column ranks last: c4 (score) and c5 (aesthetic) tie there, clip_id keeps c4
    assert pick(0.83, score=1.0, aesthetic=1.0) == ["c0", "c1", "c2", "c3", "c4"]


def test_quality_ranking_needs_its_columns(tmp_path):
    import pandas as pd

    from common.latents import INDEX
    from trainer.data import LatentSplit

    root = write_latent_dataset(tmp_path / "old", n_clips=4)
    idx = pd.read_parquet(root / INDEX)
    idx.drop(columns=["aesthetic", "motion", "sharpness"]).to_parquet(root / INDEX, index=False)   # an older index
    assert len(LatentSplit(root, top_fraction=0.5).clip_ids) == 2      # the default needs only the score
    with pytest.raises(ValueError, match=r"quality.aesthetic > 0 but .*index.parquet has no 'aesthetic' column.*"
                                         r"re-run the compress stage"):
        LatentSplit(root, top_fraction=0.5, quality=QualityRanking(aesthetic=1.0))
    idx.to_parquet(root / INDEX, index=False)                          # columns back, but no motion band
    with pytest.raises(ValueError, match=r"quality.motion > 0 but .*meta.json has no 'curation' motion band"):
        LatentSplit(root, top_fraction=0.5, quality=QualityRanking(motion=1.0))


def test_compress_records_the_motion_band(tmp_path):
    import json

    from tasks.compress.encode import motion_band

    assert motion_band(tmp_path) is None                                # no summary.json
    (tmp_path / "summary.json").write_text(json.dumps({"inputs": 1}))
    assert motion_band(tmp_path) is None                                # a summary without curation's config
    (tmp_path / "summary.json").write_text(json.dumps({"config": {"motion_min": 1, "motion_max": 20.0}}))
    assert motion_band(tmp_path) == {"motion_min": 1.0, "motion_max": 20.0}
