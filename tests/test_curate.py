"""Curation stage: decoding (incl. the decord width fallback), scene cuts, filters, accounting and the demo set."""
from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from common.config import CurateConfig
from common.storage import list_inputs
from tasks.curate.curate import center_crop_resize, window_starts
from tasks.curate.decode import DecodeError, _decode_pyav, read_video, write_clip
from tasks.curate.driver import run_curation
from tasks.curate.filters import assess
from tasks.curate.manifest import SCHEMA, content_hash
from tasks.curate.scenes import detect_scenes, detect_scenes_in_file
from tasks.curate.synthetic import SceneSpec, make_scenes_video, render_scene, write_demo_set

pytestmark = pytest.mark.timeout(120)
CFG = CurateConfig()
LOOSE = CurateConfig(motion_min=0.02, motion_height=96)   # the synthetic square moves ~0.1 px of mean flow


def _cfg(folder: Path, **kw) -> CurateConfig:
    """Tiny-demo thresholds (motion scaled to the small synthetic videos) on a folder; sidecar captions."""
    from common.config import CaptionConfig

    kw.setdefault("motion_min", 0.02)
    kw.setdefault("motion_height", 96)
    kw.setdefault("caption", CaptionConfig(backend="sidecar"))
    return CurateConfig(input_uri=str(folder), **kw)


@pytest.mark.parametrize("scenes, size", [
    ([SceneSpec("texture", 20), SceneSpec("texture", 18, seed=1), SceneSpec("flat", 20), SceneSpec("dark", 20)],
     (128, 96)),
    ([SceneSpec("dark", 12), SceneSpec("texture", 25, seed=3), SceneSpec("texture", 9, seed=4)], (160, 64)),
])
def test_cuts_found_within_one_frame(tmp_path, scenes, size):
    path = tmp_path / "cuts.mp4"
    cuts = make_scenes_video(path, scenes, width=size[0], height=size[1])
    assert cuts == list(np.cumsum([s.frames for s in scenes])[:-1])
    frames_THWC, fps, _ = read_video(path)
    found = [start for start, _ in detect_scenes(frames_THWC, fps)][1:]
    assert len(found) == len(cuts), (found, cuts)
    assert all(abs(f - c) <= 1 for f, c in zip(found, cuts)), (found, cuts)
    assert detect_scenes_in_file(path)[-1][1] == sum(s.frames for s in scenes)


def test_single_scene_has_no_cut():
    frames_THWC = render_scene(SceneSpec("texture", 30), 64, 64)
    assert detect_scenes(frames_THWC, 8.0) == [(0, 30)]


def test_filters_reject_flat_and_dark_with_reason():
    texture = assess(render_scene(SceneSpec("texture", 9), 128, 96), LOOSE)
    flat = assess(render_scene(SceneSpec("flat", 9), 128, 96), CFG)
    dark = assess(render_scene(SceneSpec("dark", 9), 128, 96), CFG)
    rng = np.random.default_rng(0)
    noise = assess(rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8), CFG)
    assert texture.passed and texture.first_failure is None
    assert CFG.sharpness_min < texture.sharpness < CFG.sharpness_max
    assert re.fullmatch(r"sharpness \d+\.\d < 200", flat.first_failure.reason), flat.first_failure
    assert flat.first_failure.key == "sharpness < 200"
    assert re.fullmatch(r"brightness 0\.0\d\d < 0.05", dark.first_failure.reason), dark.first_failure
    assert dark.first_failure.key == "brightness < 0.05"
    assert re.fullmatch(r"sharpness \d+\.\d > 2000", noise.first_failure.reason), noise.first_failure
    assert 0.0 <= flat.score < texture.score <= 1.0 and noise.score == 1.0


def test_sharpness_is_the_laplacian_variance_and_brightness_the_mean_luma():
    """The int16 Laplacian and meanStdDev give the float64 Laplacian's variance (the definition), also at the extreme
    values (a 0/255 checkerboard)."""
    import cv2

    from tasks.curate.filters import sample_indices, sharpness_brightness

    rng = np.random.default_rng(1)
    checker_THWC = np.broadcast_to(((np.indices((48, 64)).sum(0) % 2) * 255).astype(np.uint8)[None, :, :, None],
                                   (2, 48, 64, 3))
    for frames_THWC in (render_scene(SceneSpec("texture", 9), 128, 96), checker_THWC,
                        rng.integers(0, 256, (7, 33, 47, 3), dtype=np.uint8)):
        grays = [cv2.cvtColor(np.ascontiguousarray(frames_THWC[i]), cv2.COLOR_RGB2GRAY)
                 for i in sample_indices(len(frames_THWC))]
        sharp, bright = sharpness_brightness(frames_THWC)
        assert sharp == pytest.approx(np.mean([cv2.Laplacian(g, cv2.CV_64F).var() for g in grays]), rel=1e-12)
        assert bright == np.mean([g.mean() for g in grays]) / 255
    assert sharpness_brightness(checker_THWC)[0] > 1e5   # |Laplacian| = 4 * 255 inside: no int16 overflow


def test_assess_converts_each_sampled_frame_to_gray_once(monkeypatch):
    import tasks.curate.filters as filters

    calls = []
    gray = filters._gray_HW
    monkeypatch.setattr(filters, "_gray_HW", lambda frame_HWC: calls.append(1) or gray(frame_HWC))
    assess(render_scene(SceneSpec("texture", 17), 64, 48), LOOSE)
    assert len(calls) == len(filters.sample_indices(17)) == filters.NUM_SAMPLED_FRAMES


def test_decord_width_fallback(tmp_path):
    narrow, wide = tmp_path / "w48.mp4", tmp_path / "w64.mp4"
    make_scenes_video(narrow, [SceneSpec("texture", 12)], width=48, height=32)
    make_scenes_video(wide, [SceneSpec("texture", 12)], width=64, height=32)
    frames_THWC, fps, meta = read_video(narrow, backend="decord")
    assert frames_THWC.shape == (12, 32, 48, 3) and frames_THWC.dtype == np.uint8 and fps == 8.0
    assert meta["backend"] == "pyav" and "% 32" in meta["fallback"]
    expected_THWC = render_scene(SceneSpec("texture", 12), 48, 32)
    assert np.abs(frames_THWC.astype(int) - expected_THWC).mean() < 6
    frames_THWC, _, meta = read_video(wide, backend="decord")
    assert meta["backend"] == "decord" and frames_THWC.shape == (12, 32, 64, 3)
    assert np.array_equal(frames_THWC, _decode_pyav(wide))


def _truncated(tmp_path: Path) -> Path:
    good = tmp_path / "good_src.mp4"
    make_scenes_video(good, [SceneSpec("texture", 20)])
    data = good.read_bytes()
    (tmp_path / "truncated.mp4").write_bytes(data[: len(data) // 2])
    return tmp_path / "truncated.mp4"


@pytest.mark.parametrize("case, kind", [("empty.mp4", DecodeError.EMPTY), ("random.mp4", DecodeError.NOT_VIDEO),
                                        ("notes.txt", DecodeError.NOT_VIDEO), ("truncated.mp4", DecodeError.CORRUPT),
                                        ("missing.mp4", DecodeError.MISSING)])
def test_read_video_errors(tmp_path, case, kind):
    path = tmp_path / case
    if case == "empty.mp4":
        path.write_bytes(b"")
    elif case == "random.mp4":
        path.write_bytes(np.random.default_rng(0).bytes(3000))
    elif case == "notes.txt":
        path.write_text("not a video\n")
    elif case == "truncated.mp4":
        path = _truncated(tmp_path)
    with pytest.raises(DecodeError) as info:
        read_video(path)
    assert info.value.kind == kind and str(info.value).startswith(kind)


def test_write_clip_roundtrip_is_reproducible(tmp_path):
    frames_THWC = render_scene(SceneSpec("texture", 9), 64, 64)
    write_clip(tmp_path / "a.mp4", frames_THWC, 12.5)
    write_clip(tmp_path / "b.mp4", frames_THWC, 12.5)
    assert (tmp_path / "a.mp4").read_bytes() == (tmp_path / "b.mp4").read_bytes()
    decoded_THWC, fps, meta = read_video(tmp_path / "a.mp4")
    assert decoded_THWC.shape == (9, 64, 64, 3) and fps == pytest.approx(12.5) and meta["codec"] == "h264"
    with pytest.raises(ValueError, match="even"):
        write_clip(tmp_path / "c.mp4", frames_THWC[:, :63], 8)


def test_write_clip_x264_bytes_do_not_depend_on_the_cpu(tmp_path, monkeypatch):
    """x264 picks some algorithms by CPU: without ``cpu-independent`` these frames (a dissolve into a shaky scene)
    encode to other bytes with its assembly off than on, as they did on an AMD EPYC against a Xeon. With
    ``X264_OPTIONS`` the bytes are those of x264's plain C code, which every CPU computes. x264's part only: both files
    go through the same swscale rgb24 -> yuv420p conversion."""
    import tasks.curate.decode as decode
    from tasks.curate.synthetic import render_video

    frames_THWC, _, _ = render_video([SceneSpec("texture", 30), SceneSpec("shaky", 40, seed=3)], width=112, height=80,
                                     transitions=[("dissolve", 10)])
    write_clip(tmp_path / "a.mp4", frames_THWC, 8)
    options = decode.X264_OPTIONS
    monkeypatch.setattr(decode, "X264_OPTIONS", {**options, "x264-params": options["x264-params"] + ":asm=0"})
    write_clip(tmp_path / "c.mp4", frames_THWC, 8)
    assert (tmp_path / "a.mp4").read_bytes() == (tmp_path / "c.mp4").read_bytes()


def test_windows_and_crop():
    two, one = CurateConfig(max_clips_per_scene=2), CurateConfig(max_clips_per_scene=1)
    assert window_starts(0, 20, 17, two) == [2]
    assert window_starts(10, 50, 17, two) == [12, 31]
    assert window_starts(0, 16, 17, two) == []
    assert window_starts(0, 100, 17, one) == [42]
    frames_THWC = np.zeros((2, 40, 100, 3), np.uint8)
    frames_THWC[:, :, 30:70] = 255   # the centre 40x40 square survives the crop to 1:1
    out_THWC = center_crop_resize(frames_THWC, 16, 16)
    assert out_THWC.shape == (2, 16, 16, 3) and out_THWC.min() == 255
    assert center_crop_resize(np.zeros((1, 96, 32, 3), np.uint8), 32, 64).shape == (1, 32, 64, 3)


def test_list_inputs_local_rules(tmp_path):
    for name in ["a.mp4", "a.txt", "notes.txt", "README.md", "ATTRIBUTION.md", "LICENSE", ".hidden.mp4",
                 ".git/objects/x", "sub/b.MOV", "sub/b.txt", "orphan_caption.txt", "x.bin"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    items = list_inputs(str(tmp_path))
    assert [i.name for i in items] == ["a.mp4", "notes.txt", "orphan_caption.txt", "sub/b.MOV", "x.bin"]
    by_name = {i.name: i for i in items}
    assert by_name["a.mp4"].caption_uri == str(tmp_path / "a.txt") and by_name["a.mp4"].size == 5
    assert by_name["sub/b.MOV"].caption_uri == str(tmp_path / "sub/b.txt")
    assert by_name["notes.txt"].caption_uri == "" and by_name["x.bin"].uri == str(tmp_path / "x.bin")
    with pytest.raises(FileNotFoundError, match="input folder not found"):
        list_inputs(str(tmp_path / "nope"))
    with pytest.raises(NotADirectoryError):
        list_inputs(str(tmp_path / "x.bin"))


def make_bad_and_good_folder(folder: Path) -> None:
    """good.mp4 (2 kept + 1 flat rejected, captioned), allbad.mp4 (dark + too short), 4 broken inputs, 1 duplicate."""
    folder.mkdir(parents=True, exist_ok=True)
    make_scenes_video(folder / "good.mp4", [SceneSpec("texture", 40), SceneSpec("flat", 20)])
    (folder / "good.txt").write_text("  a textured square\nmoving  \n")
    make_scenes_video(folder / "allbad.mp4", [SceneSpec("dark", 20), SceneSpec("texture", 10, seed=2)],
                      width=112, height=80)
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "random.mp4").write_bytes(np.random.default_rng(1).bytes(2048))
    data = (folder / "good.mp4").read_bytes()
    (folder / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (folder / "notes.txt").write_text("just notes\n")
    shutil.copy(folder / "good.mp4", folder / "zz_copy.mp4")
    (folder / "README.md").write_text("documentation, not an input\n")


def test_run_curation_accounts_for_every_input(tmp_path):
    make_bad_and_good_folder(tmp_path / "in")
    messages = []
    summary = run_curation(_cfg(tmp_path / "in"), tmp_path / "out", progress=messages.append)
    df = pq.read_table(tmp_path / "out" / "manifest.parquet").to_pandas()
    assert list(df.columns) == [f.name for f in SCHEMA]
    # input level: 7 inputs (README is documentation, good.txt a sidecar) = 1 kept + 2 rejected + 4 failed
    assert (summary["inputs"], summary["kept"], summary["rejected"], summary["failed"]) == (7, 1, 2, 4)
    assert summary["inputs"] == summary["kept"] + summary["rejected"] + summary["failed"] == df.source_uri.nunique()
    assert summary["rows"] == len(df) == summary["clips_kept"] + summary["clips_rejected"] + summary["failed"]
    assert sum(summary["reasons"].values()) == summary["clips_rejected"] + summary["failed"]
    assert summary["reasons"] == {"brightness < 0.05": 1, "duplicate source": 1, "empty file": 1, "not a video": 2,
                                  "scene too short": 1, "sharpness < 200": 1, "truncated or corrupt": 1}
    status = {Path(u).name: s for u, s in summary["input_status"].items()}
    assert status == {"allbad.mp4": "rejected", "empty.mp4": "failed", "good.mp4": "kept", "notes.txt": "failed",
                      "random.mp4": "failed", "truncated.mp4": "failed", "zz_copy.mp4": "rejected"}
    failed = df[df.status == "failed"]
    assert len(failed) == 4 and (failed.reason != "").all() and failed.start_frame.isna().all()
    assert failed.sharpness.isna().all() and (failed.clip_id == "").all() and (failed.path == "").all()
    kept = df[df.status == "kept"]
    assert len(kept) == 2 and (kept.reason == "").all()
    assert (kept.caption == "a textured square moving aesthetic score: 5.0.").all()
    assert kept.clip_id.str.fullmatch(r"[0-9a-f]{16}").all() and df[df.clip_id != ""].clip_id.is_unique
    assert ((kept.end_frame - kept.start_frame) == 17).all() and (kept.bucket == "64x64x17").all()
    assert (kept.start_frame >= 0).all() and (kept.end_frame <= 40).all()   # inside the first scene
    for row in kept.itertuples():
        frames_THWC, fps, _ = read_video(tmp_path / "out" / row.path)
        assert frames_THWC.shape == (17, 64, 64, 3) and fps == row.fps == 8.0
    assert sorted(p.name for p in (tmp_path / "out" / "clips").iterdir()) == sorted(f"{c}.mp4" for c in kept.clip_id)
    short = df[df.reason.str.startswith("scene too short")]
    assert len(short) == 1 and short.iloc[0].reason == "scene too short: 10 < 17 frames"
    assert df[df.source_uri.str.endswith("allbad.mp4")].caption.eq("a video").all()
    assert (kept.caption_source == "sidecar").all()
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == summary
    assert summary["content_hash"] == content_hash(tmp_path / "out")
    assert len(summary["source_hashes"]) == 7 and summary["source_hashes"][1] == "e3b0c44298fc1c14"  # sha256(b"")
    assert len([m for m in messages if re.match(r"\[\d/7\]", m)]) == 7


def test_run_curation_is_deterministic_and_refuses_dirty_out(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    make_scenes_video(folder / "v.mp4", [SceneSpec("texture", 40, seed=5), SceneSpec("texture", 20, seed=6)])
    a = run_curation(_cfg(folder), tmp_path / "a", progress=lambda m: None)
    b = run_curation(_cfg(folder), tmp_path / "b", progress=lambda m: None)
    assert a["content_hash"] == b["content_hash"] and a["clips_kept"] == 3
    with pytest.raises(ValueError, match="must be empty"):
        run_curation(_cfg(folder), tmp_path / "a", progress=lambda m: None)
    with pytest.raises(FileNotFoundError):
        run_curation(_cfg(tmp_path / "missing"), tmp_path / "c", progress=lambda m: None)


def test_run_curation_stride_and_aspect(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    make_scenes_video(folder / "v.mp4", [SceneSpec("texture", 40)], width=128, height=96)
    cfg = _cfg(folder, clip_frames=9, frame_stride=2, max_clips_per_scene=3, height=32, width=64)
    summary = run_curation(cfg, tmp_path / "out", progress=lambda m: None)
    df = pq.read_table(tmp_path / "out" / "manifest.parquet").to_pandas()
    assert summary["clips_kept"] == 2 and (df.end_frame - df.start_frame == 17).all()
    assert (df.fps == 4.0).all() and (df.num_frames == 9).all() and (df.duration_s == 2.25).all()
    assert (df.bucket == "32x64x9").all() and (df.src_width == 128).all()
    frames_THWC, fps, _ = read_video(tmp_path / "out" / df.path.iloc[0])
    assert frames_THWC.shape == (9, 32, 64, 3) and fps == 4.0


def test_shipped_demo_set(repo_root, tmp_path):
    demo = repo_root / "data" / "demo"
    files = {p.name: p.stat().st_size for p in demo.iterdir() if p.is_file()}
    assert sum(files.values()) < 2 * 1024 * 1024 and files["empty.mp4"] == 0 and "ATTRIBUTION.md" in files
    assert "Apache" in (demo / "ATTRIBUTION.md").read_text() and files["mugv_i2v_sample.mp4"] < 1.5 * 1024 * 1024
    summary = run_curation(_cfg(demo), tmp_path / "out", progress=lambda m: None)
    # 6 videos and 3 images (synthetic_d.jpg kept, synthetic_e.png too blurry, the MUG-V reference .webp kept)
    assert (summary["inputs"], summary["kept"], summary["rejected"], summary["failed"]) == (9, 5, 2, 2)
    # synthetic_b's first shot is a near-copy of synthetic_a's first shot (same texture seed): rejected by pHash
    assert summary["clips_kept"] == 8 and summary["images_kept"] == 2 and summary["reasons"]["near-duplicate"] == 1
    status = {Path(u).name: s for u, s in summary["input_status"].items()}
    assert status["synthetic_d.jpg"] == "kept" and status["synthetic_e.png"] == "rejected"
    df = pq.read_table(tmp_path / "out" / "manifest.parquet").to_pandas()
    assert df[df.source_uri.str.endswith("mugv_i2v_sample.mp4")].caption.str.startswith("a woman").all()


def test_synthetic_cli(tmp_path):
    from tasks.curate.synthetic import main

    main(["--out", str(tmp_path / "demo")])
    names = sorted(p.name for p in (tmp_path / "demo").iterdir())
    assert names == ["corrupt.mp4", "empty.mp4", "synthetic_a.mp4", "synthetic_a.txt", "synthetic_b.mp4",
                     "synthetic_b.txt", "synthetic_c.mp4", "synthetic_d.jpg", "synthetic_d.txt", "synthetic_e.png"]
    assert write_demo_set(tmp_path / "demo2")[0].name == "corrupt.mp4"
    assert (tmp_path / "demo" / "synthetic_a.mp4").read_bytes() == (tmp_path / "demo2" / "synthetic_a.mp4").read_bytes()
    assert not math.isnan(read_video(tmp_path / "demo" / "synthetic_c.mp4")[1])
