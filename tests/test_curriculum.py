"""The curriculum's data: stages that choose their samples (``StageConfig.data``, ``common.selection``).

Config time: the shipped configs are image -> low resolution -> largest resolution curricula; a selection naming a
resolution, a clip length or an aspect curation does not produce, images with a video-only mix, a data selection on
a Flow-DPO stage and a token budget without a micro-batch budget are errors naming the stage. Data time: on a real
curation (the demo folder: videos, image files, key frames) and compression at two resolutions, every sample is
its bucket (latent shape = resolution / 8, (frames - 1) / 8 + 1 latent frames), clips are encoded at every
resolution their source covers and every shorter length, variants share their clip's split, and each stage of
configs/tiny.yaml reads exactly its selection; a selection the dataset cannot feed fails before training, naming
the stage and the missing buckets. The trainer side (images always t2i, resume bitwise on a mixed image/video
stage) is tests/test_task_mix.py.
"""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import yaml

from common.config import DataSelection, PipelineConfig, StageConfig, from_dict, load_config
from common.selection import describe, missing_buckets, select


def test_shipped_curricula(repo_root):
    tiny = load_config(repo_root / "configs/tiny.yaml")
    frames = [s.data.frames for s in tiny.train.stages]
    assert frames[0] == [1] and 9 in frames[1] and frames[2] == [17]                 # images -> short -> long
    assert [s.data.resolutions for s in tiny.train.stages] == [["32px", "64px"], ["32px"], ["64px"]]
    big = load_config(repo_root / "configs/mugv_10b.yaml")
    assert [s.data.resolutions for s in big.train.stages] == [["360p", "720p"], ["360p"], ["720p"]]
    s1 = big.train.stages[0]
    assert s1.data.frames == [1] and s1.steps == math.ceil(s1.tokens / (50400 * s1.data_parallel))
    assert [r.name for r in big.curate.resolution_list] == ["360p", "720p"]


def _cfg(stage: dict, curate: dict | None = None) -> dict:
    resolutions = [{"name": "32px", "sizes": [[32, 32]]}, {"name": "64px", "sizes": [[64, 64]]}]
    return {"curate": {"bucket_frames": [9], "resolutions": resolutions, **(curate or {})},
            "train": {"stages": [{"name": "s1", **stage}]}}


@pytest.mark.parametrize("stage, curate, message", [
    ({"data": {"resolutions": ["720p"]}}, None,
     r"train\.stages\[0\]\.data\.resolutions \('s1'\): \['720p'\] not among"),
    ({"data": {"frames": [33]}}, None, r"data\.frames \('s1'\): \[33\] not among the clip lengths curation cuts"),
    ({"data": {"frames": [8]}}, None, r"data\.frames: 8 is not 8k\+1"),
    ({"data": {"frames": [1]}}, None, r"stage 's1': data\.frames \[1\] selects images only.*t2i"),
    ({"data": {"frames": [1, 17]}, "task_mix": [{"task": "t2v"}]}, None, r"stage 's1': data\.frames has 1.*add t2i"),
    ({"data": {"aspect_ratios": ["16:9"]}}, None, r"data\.aspect_ratios \('s1'\): no selected size has aspect 16:9"),
    ({"data": {"aspect_ratios": ["wide"]}}, None, r"'wide' is not 'W:H'"),
    ({"tokens": 1000}, None, r"stage 's1': tokens \(1000\) needs tokens_per_micro_batch"),
    ({}, {"resolutions": [{"name": "a b", "sizes": [[32, 32]]}]}, r"curate\.resolutions: names must be unique"),
    ({}, {"bucket_sizes": [[64, 64]]}, r"set either bucket_sizes .* or resolutions"),
])
def test_bad_selections_name_the_stage(stage, curate, message):
    with pytest.raises(ValueError, match=message):
        from_dict(PipelineConfig, _cfg(stage, curate))


def test_tokens_set_the_steps_and_dpo_stages_take_every_pair():
    s = StageConfig(name="t", tokens=1000, tokens_per_micro_batch=64, data_parallel=2, micro_batches=2)
    assert s.steps == 4   # ceil(1000 / (64 * 2 * 2))
    cfg = _cfg({"data": {"resolutions": ["32px"], "frames": [9]}})
    cfg["train"]["preference"] = {"name": "dpo", "objective": "flow_dpo", "data": {"frames": [9]}}
    with pytest.raises(ValueError, match=r"train\.preference \('dpo'\): data selects samples of a flow stage"):
        from_dict(PipelineConfig, cfg)


def _index() -> pd.DataFrame:
    rows = []
    for clip, kind in (("a", "clip"), ("b", "clip"), ("k", "keyframe"), ("i", "image")):
        frames = [17, 9] if kind == "clip" else [1]
        for res, size in (("64px", 64), ("32px", 32)):
            for f in frames:
                rows.append(dict(clip_id=f"{clip}-{res}-{f}", split="train", resolution=res, num_frames=f,
                                 height=size, width=size * (2 if clip == "b" else 1), kind=kind,
                                 top_resolution=res == "64px", full_length=f == frames[0]))
    return pd.DataFrame(rows)


def test_selection_takes_exactly_its_buckets():
    idx = _index()
    pick = lambda sel: sorted(idx[select(idx, sel)]["clip_id"])   # noqa: E731
    assert pick(DataSelection()) == ["a-64px-17", "b-64px-17"]   # each clip once, largest, full length, no images
    assert pick(DataSelection(frames=[1])) == ["i-64px-1", "k-64px-1"]   # resolutions []: each one's largest
    assert pick(DataSelection(resolutions=["32px"], frames=[9, 1])) == ["a-32px-9", "b-32px-9", "i-32px-1",
                                                                       "k-32px-1"]
    assert pick(DataSelection(resolutions=["64px"], aspect_ratios=["2:1"])) == ["b-64px-17"]
    assert missing_buckets(idx, DataSelection(resolutions=["32px", "720p"], frames=[9, 33])) == ["720p", "frames 33"]
    assert missing_buckets(idx, DataSelection(resolutions=["64px"], aspect_ratios=["16:9"])) == ["aspect 16:9"]
    assert missing_buckets(idx[idx.kind == "clip"], DataSelection(frames=[1])) == ["frames 1"]
    assert describe(DataSelection(resolutions=["32px"], frames=[1])) == "resolutions 32px; frames 1; every aspect"
    legacy = idx[["clip_id", "split"]]   # a dataset written before samples had resolutions: all of it, or an error
    assert select(legacy, DataSelection()).all()
    with pytest.raises(ValueError, match="re-run the compress stage"):
        select(legacy, DataSelection(frames=[1]))


@pytest.fixture(scope="module")
def demo_dataset(repo_root, tmp_path_factory):
    """The demo folder curated and compressed with the tiny config's curriculum data settings (VAE not fitted)."""
    from tasks.compress.encode import run_compress
    from tasks.curate.driver import run_curation

    tmp = tmp_path_factory.mktemp("curriculum")
    cfg = load_config(repo_root / "configs/tiny.yaml")
    cfg.curate.input_uri = str(repo_root / "data/demo")
    cfg.curate.caption.backend = "sidecar"
    summary = run_curation(cfg.curate, tmp / "manifest", store_dir=tmp / "store", progress=lambda m: None)
    cfg.compress.vae_train_steps = 0
    meta = run_compress(cfg.compress, tmp / "manifest", tmp / "latents", progress=lambda m: None)
    return cfg, summary, meta, tmp


def test_every_sample_is_its_bucket_and_variants_share_their_split(demo_dataset):
    from common.latents import LatentReader

    cfg, summary, meta, tmp = demo_dataset
    assert summary["images_kept"] == 2 and summary["keyframes_kept"] >= 5
    reader = LatentReader(tmp / "latents")
    idx = reader.index
    for r in idx.itertuples():
        c, t, h, w = reader.latent_shape(r.clip_id)
        assert (t, h * 8, w * 8) == ((r.num_frames - 1) // 8 + 1, r.height, r.width), r.clip_id
        assert r.resolution == {32: "32px", 64: "64px"}[r.height] and r.bucket == f"{r.height}x{r.width}x{r.num_frames}"
    clips = idx[idx.kind == "clip"]
    full = clips[clips.top_resolution & clips.full_length & (clips.num_frames == 17)]
    for cid in full.clip_id:   # a 17-frame 64px clip is also 64px x 9, 32px x 17 and 32px x 9, in the same split
        variants = clips[clips.source_clip == cid]
        assert sorted(zip(variants.resolution, variants.num_frames)) == [("32px", 9), ("32px", 17), ("64px", 9),
                                                                          ("64px", 17)]
        assert variants.split.nunique() == 1
    keyframes = idx[idx.kind == "keyframe"]
    manifest = pd.read_parquet(tmp / "manifest" / "manifest.parquet").set_index("clip_id")
    split_of = dict(zip(idx.clip_id, idx.split))
    assert all(split_of[k] == split_of[manifest.loc[s, "parent_clip"]] for k, s in zip(keyframes.clip_id,
                                                                                       keyframes.source_clip))
    assert meta["buckets"] == dict(sorted(pd.Series([f"{r}x{n}" for r, n in zip(idx.resolution, idx.num_frames)])
                                          .value_counts().items()))


def test_each_tiny_stage_reads_exactly_its_selection(demo_dataset):
    from trainer.data import LatentSplit

    cfg, _, _, tmp = demo_dataset
    for stage in cfg.train.stages:
        data = LatentSplit(tmp / "latents", selection=stage.data, stage_name=stage.name)
        rows = data.reader.index.set_index("clip_id").loc[data.clip_ids]
        assert set(rows.resolution) == set(stage.data.resolutions), stage.name
        assert set(rows.num_frames) == set(stage.data.frames) and (rows.split == "train").all(), stage.name
        assert all(s[1] == (f - 1) // 8 + 1 for s, f in zip(data.shapes, rows.num_frames))


def test_a_selection_the_dataset_cannot_feed_fails_before_training(demo_dataset, tmp_path):
    from tasks.train.task import check_stage_data
    from trainer.data import LatentSplit

    cfg, _, _, tmp = demo_dataset
    wide = StageConfig(name="wide", data=DataSelection(resolutions=["64px"], aspect_ratios=["16:9"]))
    ok = cfg.train.stages[0]
    with pytest.raises(ValueError, match=r"stage 'wide' \(resolutions 64px; .*16:9\): no train sample for aspect "
                                         r"16:9") as e:
        check_stage_data([ok, wide], tmp / "latents")
    assert "stage1_images" not in str(e.value) and "64pxx17" in str(e.value)   # names only the bad stage
    with pytest.raises(ValueError, match=r"stage 'wide': data .* has no 'train' sample for aspect 16:9"):
        LatentSplit(tmp / "latents", selection=wide.data, stage_name="wide")
    spec = yaml.safe_load((Path(__file__).parents[1] / "configs/tiny.yaml").read_text())
    spec["train"]["stages"][0]["data"]["resolutions"] = ["48px"]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(ValueError, match=r"stage1_images.*\['48px'\] not among curate\.resolutions"):
        load_config(tmp_path / "c.yaml")
