"""Production curation (issue 4): every filter, gradual transitions, buckets, VLM captions, bad inputs, VFR, the
per-input store (incremental re-run), map_task sharding and the report."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import List

import av
import numpy as np
import pandas as pd
import pytest
from flytekit import workflow

from common.config import CaptionConfig, CurateConfig, TrackingConfig
from tasks.curate import buckets
from tasks.curate.decode import DecodeError, read_video
from tasks.curate.dedup import clip_phash, distance, find_duplicates
from tasks.curate.driver import run_curation
from tasks.curate.filters import assess
from tasks.curate.scenes import analyse
from tasks.curate.synthetic import SceneSpec, make_scenes_video, make_vfr_video, render_scene, render_video
from tasks.curate.task import ShardResult, curate_shards, plan_curation

pytestmark = pytest.mark.timeout(120)
# the synthetic square moves ~0.1 px of mean flow at 96 rows, static ~0.001, shaky ~3.5
CFG = CurateConfig(motion_min=0.02, motion_max=2.0, motion_height=96, caption=CaptionConfig(backend="sidecar"))


@pytest.mark.parametrize("spec, reason", [
    (SceneSpec("texture", 17), ""),
    (SceneSpec("static", 17), "motion < 0.02"),
    (SceneSpec("shaky", 17), "motion > 2"),
    (SceneSpec("texture", 17, text="BREAKING NEWS 24"), "text_area > 0.05"),
])
def test_motion_and_text_filters(spec, reason):
    report = assess(render_scene(spec, 256, 144), CFG)
    failure = report.first_failure
    assert (failure.key if failure else "") == reason, report
    assert np.isfinite([report.motion, report.text_area]).all() and np.isnan(report.aesthetic)


def test_aesthetic_scorer_random_identity_and_threshold():
    from tasks.curate.aesthetic import AestheticScorer

    scorer = AestheticScorer(CFG.aesthetic)
    frames_THWC = render_scene(SceneSpec("texture", 9), 128, 96)
    a, b = scorer.score(frames_THWC), AestheticScorer(CFG.aesthetic).score(frames_THWC)
    assert a == pytest.approx(b) and 4.0 < a < 6.0 and scorer.random and "tiny-random" in scorer.identity
    strict = CurateConfig(motion_min=0.0, aesthetic=CFG.aesthetic.__class__(min_score=100.0))
    assert assess(frames_THWC, strict, scorer).first_failure.key == "aesthetic < 100"


def test_phash_near_duplicates():
    a_THWC = render_scene(SceneSpec("texture", 9, seed=1), 128, 96)
    noisy_THWC = np.clip(a_THWC.astype(int) + np.random.default_rng(0).integers(-6, 7, a_THWC.shape), 0, 255)
    other_THWC = render_scene(SceneSpec("texture", 9, seed=2), 128, 96)
    ha, hn, ho = clip_phash(a_THWC), clip_phash(noisy_THWC.astype(np.uint8)), clip_phash(other_THWC)
    assert len(ha) == 48 and distance(ha, hn) <= 4 < 12 <= distance(ha, ho)
    assert find_duplicates([("a", ha), ("o", ho), ("n", hn)], 8) == {"n": ("a", distance(ha, hn))}


@pytest.mark.parametrize("transition", [("dissolve", 12), ("fade", 6)])
def test_gradual_transitions_and_cut_positions(transition):
    scenes = [SceneSpec("texture", 30), SceneSpec("texture", 30, seed=1), SceneSpec("texture", 30, seed=2)]
    frames_THWC, cuts, ranges = render_video(scenes, transitions=[transition, None])
    result = analyse(frames_THWC, 8.0, CurateConfig())
    assert len(result.cuts) == 1 and abs(result.cuts[0] - cuts[0]) <= 1
    (ts, te), = result.transitions
    (gs, ge), = ranges
    assert ts <= gs + 1 and te >= ge - 1 and te - ts <= (ge - gs) + 12   # covers the truth, a few frames wider
    for s, e in result.scenes:   # no scene keeps transition frames
        assert e <= ts or s >= te


def test_clip_with_missed_cut_is_dropped(tmp_path):
    (tmp_path / "in").mkdir()
    make_scenes_video(tmp_path / "in" / "v.mp4", [SceneSpec("texture", 12), SceneSpec("texture", 12, seed=1)])
    cfg = CurateConfig(input_uri=str(tmp_path / "in"), scene_threshold=255.0, adaptive_threshold=0.0,
                       gradual_min_change=1e9, motion_min=0.0, caption=CaptionConfig(backend="sidecar"))
    summary = run_curation(cfg, tmp_path / "out", progress=lambda m: None)
    assert summary["reasons"] == {"cut inside clip": 1} and summary["clips_kept"] == 0


def test_buckets():
    sizes = [[720, 1280], [832, 1104], [960, 960], [1104, 832], [1280, 720]]
    cfg = CurateConfig(clip_frames=105, bucket_frames=[73], bucket_sizes=sizes, height=720, width=1280)
    assert buckets.size_bucket(1080, 1920, cfg) == (720, 1280)
    assert buckets.size_bucket(1920, 1080, cfg) == (1280, 720)
    assert buckets.size_bucket(600, 640, cfg) == (960, 960) and buckets.size_bucket(480, 640, cfg) == (832, 1104)
    assert buckets.length_bucket(200, cfg, 24.0) == 105 and buckets.length_bucket(80, cfg, 24.0) == 73
    assert buckets.length_bucket(72, cfg, 24.0) is None
    assert buckets.lengths(CurateConfig(clip_frames=105, bucket_frames=[73], max_clip_s=4.0), 24.0) == [73]
    with pytest.raises(ValueError, match=r"curate.bucket_frames\[0\] must be 8k\+1"):
        CurateConfig(bucket_frames=[72])


def test_qwen2vl_captioner_tiny_random():
    from tasks.curate.captioner import QwenVLCaptioner, video_patches

    frames_THWC = render_scene(SceneSpec("texture", 17), 128, 96)
    pixels, grid = video_patches(frames_THWC[:8], 14, 2, 2, 3136, 200704)
    assert grid[0] == 4 and pixels.shape == (grid[0] * grid[1] * grid[2], 3 * 2 * 14 * 14)
    cap = QwenVLCaptioner(CaptionConfig(max_new_tokens=8))
    text = cap.caption(frames_THWC, 5.27)
    assert text.endswith(" aesthetic score: 5.3.") and text == cap.caption(frames_THWC, 5.27)
    assert cap.source.startswith("qwen2_vl:tiny-random")


def _zero_frame_mp4(path: Path) -> None:
    """A valid MP4 header with no frames (written without a single packet)."""
    with av.open(str(path), mode="w", format="mp4") as c:
        s = c.add_stream("libx264", rate=8)
        s.width, s.height, s.pix_fmt = 64, 64, "yuv420p"
        c.start_encoding()


def test_vfr_is_resampled_to_constant_rate(tmp_path):
    pts = make_vfr_video(tmp_path / "vfr.mp4")
    frames_THWC, fps, meta = read_video(tmp_path / "vfr.mp4")
    steps = np.diff(meta["timestamps"])
    assert meta["vfr"] and len(frames_THWC) == len(meta["timestamps"])
    assert abs(len(frames_THWC) - (pts[-1] - pts[0]) / 16 * fps - 1) <= 1
    assert np.all(steps >= 0) and abs(float(np.mean(steps)) - 1 / fps) < 0.3 / fps


def test_bad_inputs_never_crash(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    make_scenes_video(folder / "big.mp4", [SceneSpec("texture", 20)], width=128, height=96)
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "notes.txt").write_text("not a video\n")
    _zero_frame_mp4(folder / "zero_length.mp4")
    data = (folder / "big.mp4").read_bytes()
    (folder / "truncated.mp4").write_bytes(data[: len(data) // 3])
    (folder / "corrupt.mp4").write_bytes(data[:64] + np.random.default_rng(2).bytes(len(data) - 64))
    cfg = CurateConfig(input_uri=str(folder), max_pixels=100 * 100, caption=CaptionConfig(backend="sidecar"))
    with pytest.raises(DecodeError, match="resolution too large"):
        read_video(folder / "big.mp4", max_pixels=100 * 100)
    summary = run_curation(cfg, tmp_path / "out", progress=lambda m: None)
    assert summary["inputs"] == 6 == summary["failed"], summary["input_status"]
    assert summary["kept"] == summary["rejected"] == 0
    df = pd.read_parquet(tmp_path / "out" / "manifest.parquet")
    assert (df.status == "failed").all() and (df.reason != "").all() and len(df) == 6
    assert summary["reasons"]["resolution too large"] == 1 and summary["reasons"]["empty file"] == 1


def test_incremental_rerun_processes_only_new_inputs(tmp_path):
    folder, store = tmp_path / "in", tmp_path / "store"
    folder.mkdir()
    make_scenes_video(folder / "a.mp4", [SceneSpec("texture", 20, seed=3)])
    make_scenes_video(folder / "b.mp4", [SceneSpec("texture", 20, seed=4), SceneSpec("flat", 20)])
    (folder / "empty.mp4").write_bytes(b"")
    cfg = CurateConfig(input_uri=str(folder), motion_min=0.02, motion_height=96, shard_size=2,
                       caption=CaptionConfig(backend="sidecar"))
    first = run_curation(cfg, tmp_path / "o1", progress=lambda m: None, store_dir=store)
    assert (first["processed"], first["reused"], first["shards"]) == (3, 0, 2)
    make_scenes_video(folder / "a2.mp4", [SceneSpec("texture", 20, seed=5)])
    messages = []
    second = run_curation(cfg, tmp_path / "o2", progress=messages.append, store_dir=store)
    assert (second["processed"], second["reused"], second["inputs"]) == (1, 3, 4)
    assert [m.split(":")[0] for m in messages if ": processed" in m] == ["a2.mp4"]
    assert second["clips_kept"] == first["clips_kept"] + 1
    third = run_curation(cfg, tmp_path / "o3", progress=lambda m: None, store_dir=store)
    assert (third["processed"], third["content_hash"]) == (0, second["content_hash"])


def test_map_task_shards_and_report(tmp_path, monkeypatch):
    from tasks.curate.merge import merge_shards
    from tasks.curate.report import write_report
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        make_scenes_video(folder / f"v{i}.mp4", [SceneSpec("texture", 20, seed=10 + i), SceneSpec("dark", 20)])
    cfg = CurateConfig(input_uri=str(folder), motion_min=0.02, motion_height=96, shard_size=2,
                       caption=CaptionConfig(backend="sidecar"))

    @workflow
    def wf(cfg: CurateConfig, tracking_cfg: TrackingConfig) -> List[ShardResult]:
        return curate_shards(shard=plan_curation(cfg=cfg, inputs_fingerprint="x", tracking_cfg=tracking_cfg))

    results = wf(cfg=cfg, tracking_cfg=TrackingConfig(root=str(tmp_path / "runs")))
    assert [r.index for r in results] == [0, 1]
    parsed = [json.loads(r.result_json) for r in results]
    assert [len(p["entries"]) for p in parsed] == [2, 1] and sum(p["processed"] for p in parsed) == 3
    summary = merge_shards(parsed, cfg, Path(results[0].store), tmp_path / "out", progress=lambda m: None)
    assert summary["inputs"] == 3 == summary["kept"] and summary["reasons"] == {"brightness < 0.05": 3}
    page = write_report(tmp_path / "out", tmp_path / "report")
    assert "brightness &lt; 0.05" in page and "RANDOM" not in page and "randomly initialised" in page
    for name in ("report.html", "histograms.png", "contact_sheet.png"):
        assert (tmp_path / "report" / name).stat().st_size > 1000
    shutil.rmtree(tmp_path / "runs", ignore_errors=True)
