"""Captions in batches: Qwen2-VL ``caption_batch`` (left-padded prompts, concatenated video patches, greedy) gives
the tiny random model's captions one by one, and curation's rows do not depend on ``curate.caption.batch_size``;
the frames a captioner reads (what curation holds until a batch is captioned) give the clip's caption."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from common.config import CaptionConfig, CurateConfig
from tasks.curate.captioner import QwenVLCaptioner, SidecarCaptioner
from tasks.curate.curate import Models, curate_video
from tasks.curate.synthetic import SceneSpec, make_scenes_video, render_scene

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def captioner() -> QwenVLCaptioner:
    return QwenVLCaptioner(CaptionConfig(max_new_tokens=12))


def test_batched_captions_equal_one_by_one(captioner: QwenVLCaptioner) -> None:
    """Clips of other sizes and lengths and single frames: different prompt lengths, so the batch is padded."""
    specs = [("texture", 128, 96, 17), ("shaky", 128, 96, 17), ("flat", 96, 96, 9), ("texture", 160, 96, 17),
             ("static", 128, 96, 1), ("shaky", 64, 64, 1)]
    items = [(render_scene(SceneSpec(kind, n, seed=i), w, h), 5.0 + i) for i, (kind, w, h, n) in enumerate(specs)]
    one = [captioner.caption(frames_THWC, aesthetic) for frames_THWC, aesthetic in items]
    assert captioner.caption_batch(items) == one
    assert captioner.caption_batch(items[2:5]) == one[2:5] and captioner.caption_batch([]) == []
    assert len(set(one)) == len(one) and all(c.endswith(f" aesthetic score: {5.0 + i:.1f}.") for i, c in enumerate(one))


def test_the_frames_read_give_the_same_caption(captioner: QwenVLCaptioner) -> None:
    """Qwen2-VL reads ``caption.num_frames`` of a clip (a copy, not a view that would hold the clip); a sidecar
    caption reads none."""
    for n in (17, 8, 3, 1):
        frames_THWC = render_scene(SceneSpec("shaky", n, seed=n), 128, 96)
        read_THWC = captioner.frames_read(frames_THWC)
        assert len(read_THWC) == min(n, captioner.cfg.num_frames) and not np.shares_memory(read_THWC, frames_THWC)
        assert captioner.caption(read_THWC, 5.0) == captioner.caption(frames_THWC, 5.0)
    sidecar = SidecarCaptioner("a text")
    assert sidecar.frames_read(frames_THWC).shape == (0, 96, 128, 3)
    assert sidecar.caption(sidecar.frames_read(frames_THWC), 5.0) == sidecar.caption(frames_THWC, 5.0)


def test_curation_rows_do_not_depend_on_the_batch_size(tmp_path: Path, captioner: QwenVLCaptioner,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    video = tmp_path / "v.mp4"
    make_scenes_video(video, [SceneSpec("texture", 20, seed=s) for s in range(3)], width=128, height=96)
    calls: list = []
    real = captioner.model.generate

    def generate(**kw):
        calls.append(len(kw["input_ids"]))
        return real(**kw)

    monkeypatch.setattr(captioner.model, "generate", generate)
    rows = {}
    for b in (1, 4):
        cfg = CurateConfig(input_uri=str(tmp_path), motion_min=0.02, motion_height=96, keyframes=1,
                           caption=CaptionConfig(max_new_tokens=12, batch_size=b))
        models = Models(cfg)
        models._vlm = captioner   # the same tiny model (built once)
        calls.clear()
        out = curate_video(video, "0" * 16, None, cfg, models, tmp_path / f"out{b}")
        rows[b] = json.dumps([r for r, _ in out], sort_keys=True, default=str)
        kept = [r for r, _ in out if r["status"] == "kept"]
        assert len(kept) >= 4 and all(r["caption_source"].startswith("qwen2_vl:") for r in kept)
        assert calls == ([1] * len(kept) if b == 1 else [min(4, len(kept) - i) for i in range(0, len(kept), 4)])
    assert rows[1] == rows[4]


def test_the_caption_batch_size_is_not_part_of_the_store_key() -> None:
    """Rows do not depend on it (above), so a stored result stays valid when it changes; other caption settings
    (here the frames given to the model) still change the key."""
    from common.config import CaptionConfig, CurateConfig
    from tasks.curate.store import processing_hash

    one, eight = (processing_hash(CurateConfig(caption=CaptionConfig(batch_size=b))) for b in (1, 8))
    assert one == eight != processing_hash(CurateConfig(caption=CaptionConfig(batch_size=1, num_frames=4)))
