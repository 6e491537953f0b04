"""Preference pairs: the pair table's resolution (every outcome, counts, weight), the three table formats, automatic
pairs (corruptions, counts, train clips only), human pairs encoded end to end with a real tiny LatentDataset's VAE
and text encoder (local and S3), and the Flyte task (MLflow child run, cache hit on rerun)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from flytekit import workflow

from common import tracking
from common.config import CompressConfig, PairsConfig, TextEncoderConfig, TrackingConfig
from common.latents import LatentReader, LatentWriter
from common.pairs import read_pairs
from helpers import write_latent_dataset
from tasks.compress.encode import run_compress
from tasks.curate.decode import write_clip
from tasks.curate.synthetic import SceneSpec, render_scene
from tasks.preference.auto import corrupt, shuffle_permutation
from tasks.preference.build import run_pairs
from tasks.preference.labels import TableRow, count_keys, read_table, resolve_row, resolve_table
from tasks.preference.task import build_preference_pairs, pairs_source_hash
from tasks.types import FlyteDirectory, LatentDataset, PreferencePairs

pytestmark = pytest.mark.timeout(180)
DIMS = ["visual_quality", "motion_quality", "text_alignment"]


def _row(i, prefs, a_correct=None, b_correct=None, prompt="a cat", video_a="a.mp4", video_b="b.mp4", error=""):
    values = dict(prompt=prompt, video_a=video_a, video_b=video_b, **dict(zip(DIMS, prefs)))
    values.update({k: v for k, v in (("a_correct", a_correct), ("b_correct", b_correct)) if v is not None})
    return TableRow(i, values, error)


# --------------------------------------------------------------------------------------------------- resolution

def test_resolution_outcomes_counts_and_weight():
    rows = [
        _row(0, ["a", "a", "a"]),                                    # unanimous: weight 1
        _row(1, ["b", "tie", "B "]),                                 # b 2-0 (case, spaces): weight 2/3
        _row(2, ["a", "b", "a"], b_correct=False),                   # loser incorrect: kept, weight 1/3
        _row(3, ["tie", "tie", "tie"]),                              # all tie
        _row(4, ["a", "b", "tie"]),                                  # one win each
        _row(5, ["b", "b", "a"], b_correct="false"),                 # winner incorrect
        _row(6, ["a", "a", "a"], a_correct=False, b_correct=0),      # both incorrect
        _row(7, ["a", "maybe", "a"]),                                # bad label
        _row(8, ["a", "a", "a"], a_correct="perhaps"),               # bad flag
        _row(9, ["a", "a", "a"], video_b=float("nan")),              # no video
        _row(10, [], error="line 12: 9 fields, the header has 8"),   # malformed line
    ]
    res = resolve_table(rows, DIMS)
    kept = [r for r in res if r.kept]
    assert [(r.row, r.winner, r.loser) for r in kept] == [(0, "a", "b"), (1, "b", "a"), (2, "a", "b")]
    assert [r.weight for r in kept] == pytest.approx([1.0, 2 / 3, 1 / 3])
    assert (kept[1].wins_a, kept[1].wins_b) == (0, 2) and not kept[2].b_correct
    assert [r.key for r in res if not r.kept] == ["tie", "tie", "winner incorrect", "both incorrect",
                                                  "unreadable row", "unreadable row", "unreadable row",
                                                  "unreadable row"]
    assert count_keys(res) == {"unreadable row": 4, "tie": 2, "winner incorrect": 1, "both incorrect": 1}
    assert len(kept) + sum(count_keys(res).values()) == len(rows)
    reasons = {r.row: r.reason for r in res}
    assert reasons[4] == ("tie: 1 win(s) each over 3 dimension(s) (visual_quality a, motion_quality b, "
                          "text_alignment tie)")
    assert reasons[5] == "winner incorrect: b preferred 2-1 but b_correct is false"
    assert "motion_quality='maybe' (expected a, b or tie)" in reasons[7]
    assert "a_correct='perhaps'" in reasons[8] and "video_b is empty" in reasons[9]
    assert reasons[10] == "unreadable row: line 12: 9 fields, the header has 8"
    assert resolve_row(_row(0, ["a", "a", "a"], a_correct="TRUE", b_correct="no"), DIMS).kept


TABLE = [
    dict(prompt="a cat", video_a="a.mp4", video_b="b.mp4", visual_quality="a", motion_quality="a",
         text_alignment="tie"),
    dict(prompt="a dog", video_a="a.mp4", video_b="b.mp4", visual_quality="b", motion_quality="b",
         text_alignment="b", a_correct=False, b_correct=True),
    dict(prompt="a cow", video_a="a.mp4", video_b="b.mp4", visual_quality="a", motion_quality="b",
         text_alignment="tie"),
    dict(prompt="a fox", video_a="b.mp4", video_b="a.mp4", visual_quality="b", motion_quality="b",
         text_alignment="a", a_correct=True, b_correct=False),
]


def _write_table(path: Path, rows, bad_line: bool = False) -> Path:
    """``rows`` as .csv, .jsonl or .parquet; ``bad_line`` appends a malformed line (csv, jsonl)."""
    if path.suffix == ".parquet":
        pd.DataFrame(rows).to_parquet(path, index=False)
    elif path.suffix == ".csv":
        text = pd.DataFrame(rows).to_csv(index=False)
        path.write_text(text + ("x,y,z,a,a,a,true,true,extra\n" if bad_line else ""))
    else:
        lines = [json.dumps(r) for r in rows] + (['{"prompt": "x", "video_a": '] if bad_line else [])
        path.write_text("\n\n".join(lines) + "\n")   # blank lines are no rows
    return path


def test_csv_jsonl_and_parquet_tables_read_alike(tmp_path):
    def outcome(path):
        return [(r.row, r.kept, r.key, r.winner, r.weight, r.prompt, r.labels, r.a_correct, r.b_correct)
                for r in resolve_table(read_table(path, DIMS), DIMS)]

    csv_ = outcome(_write_table(tmp_path / "t.csv", TABLE, bad_line=True))
    jsonl = outcome(_write_table(tmp_path / "t.jsonl", TABLE, bad_line=True))
    parquet = outcome(_write_table(tmp_path / "t.parquet", TABLE))
    assert csv_ == jsonl and csv_[:-1] == parquet and len(csv_) == 5
    assert [o[2] for o in csv_] == ["", "", "tie", "winner incorrect", "unreadable row"]
    assert [(o[3], o[4]) for o in csv_[:2]] == [("a", pytest.approx(2 / 3)), ("b", 1.0)]
    with pytest.raises(ValueError, match=r"lacks columns \['motion_quality'\]"):
        read_table(_write_table(tmp_path / "m.csv", [{k: v for k, v in TABLE[0].items() if k != "motion_quality"}]),
                   DIMS)
    with pytest.raises(ValueError, match="must be a .parquet, .csv, .jsonl file"):
        read_table(tmp_path / "t.json", DIMS)


# --------------------------------------------------------------------------------------------------- auto pairs

def test_corruptions():
    x = torch.randn(4, 5, 2, 3)
    for seed in range(20):
        perm = shuffle_permutation(5, seed)
        assert sorted(perm) == list(range(5)) and perm != list(range(5))
    assert shuffle_permutation(2, 0) == [1, 0]
    assert torch.equal(corrupt(x, "shuffle", 1.0, 3), corrupt(x, "shuffle", 1.0, 3))
    assert torch.equal(corrupt(x, "reverse", 1.0, 0), x[:, [4, 3, 2, 1, 0]])
    noise = corrupt(x, "noise", 0.5, 7) - x
    assert abs(noise.std().item() - 0.5) < 0.05
    with pytest.raises(ValueError, match="shuffle needs >= 2 latent frames"):
        corrupt(x[:, :1], "shuffle", 1.0, 0)


def test_auto_pairs_from_held_in_clips(tmp_path):
    shapes = [(24, 3, 8, 8)] * 5 + [(24, 1, 8, 8)] + [(24, 3, 8, 8)] * 2   # clip0005: one latent frame
    data = write_latent_dataset(tmp_path / "latents", n_clips=8, n_val=2, shapes=shapes)
    lines: list = []
    cfg = PairsConfig(noise_std=0.5, seed=3)
    meta = run_pairs(cfg, data, tmp_path / "pairs", progress=lines.append)
    summary = json.loads((tmp_path / "pairs" / "summary.json").read_text())
    assert summary == meta["pairs"] and summary["labels"] == "auto"
    assert any(line.startswith("labels auto: no human labels") for line in lines)
    # train clips 2..7, corruptions cycled; clip0005 (one latent frame) cannot be shuffled: noise, counted
    assert (summary["rows"], summary["pairs"], summary["dropped"]) == (6, 6, 0)
    assert summary["corruptions"] == {"shuffle": 1, "reverse": 2, "noise": 3}
    assert summary["fallbacks"] == {"shuffle -> noise: one latent frame": 1}
    pairs = read_pairs(tmp_path / "pairs")
    assert list(pairs["source"]) == ["auto:shuffle", "auto:reverse", "auto:noise", "auto:noise", "auto:reverse",
                                     "auto:noise"]
    src, out = LatentReader(data), LatentReader(tmp_path / "pairs")
    assert list(pairs["winner"]) == src.clip_ids("train") and not set(pairs["winner"]) & set(src.clip_ids("val"))
    assert meta["latent_dataset_hash"] == src.meta["content_hash"] and meta["latent_std"] == src.meta["latent_std"]
    for p in pairs.itertuples():
        win, text_w, mask_w = out.load(p.winner)
        lose, text_l, mask_l = out.load(p.loser)
        assert torch.equal(win, src.load(p.winner)[0]) and win.shape == lose.shape
        assert torch.equal(text_w, text_l) and torch.equal(mask_w, mask_l)
        assert not torch.equal(win, lose)
        if p.corruption == "reverse":
            assert torch.equal(lose, win.flip(1))
        elif p.corruption == "shuffle":
            perm = [next(j for j in range(win.shape[1]) if torch.equal(lose[:, i], win[:, j]))
                    for i in range(lose.shape[1])]
            assert sorted(perm) == list(range(win.shape[1])) and perm != sorted(perm)
        else:
            assert abs((lose - win).std().item() - 0.5) < 0.05


def test_auto_pairs_cap_fallback_and_determinism(tmp_path):
    root = tmp_path / "latents"
    w = LatentWriter(root)
    text, mask = torch.randn(16, 64), torch.ones(16, dtype=torch.uint8)
    w.add("still", torch.randn(24, 1, 4, 4).expand(24, 3, 4, 4).contiguous(), text, mask)   # equal latent frames
    for i in range(3):
        w.add(f"c{i}", torch.randn(24, 3, 4, 4), text.clone(), mask.clone())
    w.finish({"vae": {"config": {"spatial_downsample": 8}}, "latent_mean": [0.0] * 24, "latent_std": [1.0] * 24})
    cfg = PairsConfig(corruptions=["reverse", "shuffle"], max_pairs=3)
    first = run_pairs(cfg, root, tmp_path / "a", progress=lambda m: None)
    s = first["pairs"]
    assert (s["rows"], s["pairs"], s["dropped"], s["reasons"]) == (4, 3, 1, {"over max_pairs": 1})
    assert s["fallbacks"] == {"reverse -> noise: latent frames all equal": 1}
    assert list(read_pairs(tmp_path / "a")["source"]) == ["auto:noise", "auto:shuffle", "auto:reverse"]
    assert run_pairs(cfg, root, tmp_path / "b", progress=lambda m: None)["content_hash"] == first["content_hash"]


# --------------------------------------------------------------------------------------------------- human pairs

@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A real tiny LatentDataset: 3 synthetic 64x64x17 clips through run_compress (random VAE, tiny T5; ~7 s)."""
    root = tmp_path_factory.mktemp("compress")
    (root / "clips").mkdir()
    rows = []
    for i in range(3):
        write_clip(root / "clips" / f"c{i}.mp4", render_scene(SceneSpec("texture", 17, seed=i), 64, 64, i), 8)
        rows.append(dict(clip_id=f"clip{i:012d}", status="kept", path=f"clips/c{i}.mp4", num_frames=17,
                         caption=f"scene {i}", score=1.0, bucket="64x64x17", source_hash=f"{i:016x}"))
    pd.DataFrame(rows).to_parquet(root / "manifest.parquet", index=False)
    text = TextEncoderConfig(d_model=32, num_layers=1, num_heads=2, d_ff=64, max_length=16)
    run_compress(CompressConfig(vae_train_steps=0, text=text), root, root / "latents", progress=lambda m: None)
    return root / "latents"


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """Pair videos at another size and aspect than the dataset (96x64, widths % 32 == 0 for decord), one too short,
    one a byte copy, one not a video."""
    root = tmp_path_factory.mktemp("table")
    (root / "v").mkdir()
    write_clip(root / "v" / "a.mp4", render_scene(SceneSpec("texture", 20, seed=5), 96, 64, 0), 8)
    write_clip(root / "v" / "b.mp4", render_scene(SceneSpec("flat", 20, seed=6), 96, 64, 1), 8)
    write_clip(root / "v" / "short.mp4", render_scene(SceneSpec("texture", 9, seed=7), 96, 64, 2), 8)
    shutil.copy(root / "v" / "a.mp4", root / "v" / "a_copy.mp4")
    (root / "v" / "broken.mp4").write_bytes(b"not a video at all")
    return root


def _labels(a="v/a.mp4", b="v/b.mp4", prefs=("a", "a", "tie"), prompt="a textured square", **kw):
    return dict(prompt=prompt, video_a=a, video_b=b, **dict(zip(DIMS, prefs)), **kw)


HUMAN = [
    _labels(),                                                         # a wins 2-0
    _labels(prefs=("b", "b", "b"), prompt="a soft blob"),              # b wins 3-0
    _labels(a="v/b.mp4", b="v/a.mp4", prefs=("a", "b", "a"), b_correct=False),   # b.mp4 wins, loser incorrect
    _labels(prefs=("a", "b", "tie")),                                  # tie
    _labels(b="v/missing.mp4"),                                        # missing video
    _labels(a="v/short.mp4"),                                          # video too short
    _labels(b="v/broken.mp4"),                                         # unreadable video
    _labels(b="v/a_copy.mp4"),                                         # identical videos
    _labels(a_correct=False),                                          # winner incorrect
]


def test_human_pairs_encoded_with_the_datasets_codecs(dataset, videos, tmp_path):
    table = _write_table(videos / "labels.csv", HUMAN)
    lines: list = []
    meta = run_pairs(PairsConfig(source=str(table)), dataset, tmp_path / "pairs", progress=lines.append)
    s = meta["pairs"]
    assert s["labels"] == "human" and any(line.startswith("labels human: 9 rows") for line in lines)
    assert (s["rows"], s["pairs"], s["dropped"], s["loser_incorrect"], s["clips"]) == (9, 3, 6, 1, 4)
    assert s["reasons"] == {"tie": 1, "missing video": 1, "video too short": 1, "unreadable video": 1,
                            "identical videos": 1, "winner incorrect": 1}
    dropped = [json.loads(line) for line in (tmp_path / "pairs" / "dropped.jsonl").read_text().splitlines()]
    assert [d["row"] for d in dropped] == [3, 4, 5, 6, 7, 8]
    assert dropped[2]["reason"] == "video too short: 9 < 17 frames" and "not a video" in dropped[3]["reason"]
    pairs = read_pairs(tmp_path / "pairs")
    assert list(pairs["pair_id"]) == ["row00000", "row00001", "row00002"]
    assert list(pairs["weight"]) == pytest.approx([2 / 3, 1.0, 1 / 3]) and set(pairs["source"]) == {"human"}
    assert list(pairs["video_winner"]) == ["v/a.mp4", "v/b.mp4", "v/b.mp4"]
    assert list(pairs["pref_motion_quality"]) == ["winner", "winner", "loser"]
    assert list(pairs["loser_correct"]) == [True, True, False]
    # the pairs live in the dataset's latent space: its bucket, its VAE and statistics, its text encoder
    src, out = LatentReader(dataset), LatentReader(tmp_path / "pairs")
    bucket = src.latent_shape(src.clip_ids("train")[0])
    assert {out.latent_shape(c) for c in out.clip_ids()} == {bucket}
    assert meta["latent_mean"] == src.meta["latent_mean"] and meta["vae"] == src.meta["vae"]
    for name in ("vae/vae.safetensors", "vae/config.json", "null_text.safetensors", "text_encoder/config.json"):
        assert (tmp_path / "pairs" / name).read_bytes() == (dataset / name).read_bytes()
    from tasks.curate.curate import center_crop_resize
    from tasks.curate.decode import read_video

    frames, _, _ = read_video(videos / "v" / "a.mp4", max_frames=17)
    x = torch.from_numpy(center_crop_resize(frames, 64, 64)).permute(3, 0, 1, 2).float().div(127.5).sub(1.0)
    with torch.no_grad():
        expected = src.normalize(src.load_vae().encode(x[None]).mode()[0])
    winner, text, mask = out.load(pairs["winner"][0])
    tol = 5e-2 if torch.cuda.is_available() else 1e-3   # run_pairs encodes on the GPU when there is one (TF32 convs)
    assert (winner - expected).abs().max() < tol < (out.load(pairs["loser"][0])[0] - expected).abs().max()
    feats, fmask = src.load_text_encoder().encode(["a textured square"])
    assert torch.allclose(text, feats[0], atol=1e-6) and torch.equal(mask, fmask[0])
    assert torch.equal(out.load(pairs["loser"][0])[1], text)    # one prompt per pair
    assert pairs["winner"][1] != pairs["loser"][0]               # b.mp4 under another prompt is another clip
    assert (pairs["winner"][2], pairs["loser"][2]) == (pairs["loser"][0], pairs["winner"][0])   # stored once

    capped = run_pairs(PairsConfig(source=str(table), max_pairs=1), dataset, tmp_path / "capped",
                       progress=lambda m: None)["pairs"]
    # after the cap, rows whose labels resolve are not read further (their videos are not decoded)
    assert (capped["pairs"], capped["rows"]) == (1, 9)
    assert capped["reasons"] == {"over max_pairs": 6, "tie": 1, "winner incorrect": 1}


def test_human_pairs_refuse_an_all_dropped_table(dataset, videos, tmp_path):
    table = _write_table(videos / "ties.jsonl", [_labels(prefs=("tie", "tie", "tie"))] * 2)
    with pytest.raises(ValueError, match=r"no pair left of 2 rows \(dropped: \{'tie': 2\}\)"):
        run_pairs(PairsConfig(source=str(table)), dataset, tmp_path / "none", progress=lambda m: None)


def test_human_table_and_videos_on_s3(dataset, videos, tmp_path, monkeypatch):
    """The table and its videos on S3 (an in-process moto server, read with the minio client) give the pairs of
    the same table read locally; the fingerprint follows the table's bytes."""
    import socket

    from moto.server import ThreadedMotoServer

    from common.storage import upload_dir
    from tasks.preference.labels import source_fingerprint

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        for k, v in dict(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="testing",
                         AWS_SECRET_ACCESS_KEY="testing", AWS_REGION="us-east-1").items():
            monkeypatch.setenv(k, v)
        local = tmp_path / "bucket"
        shutil.copytree(videos / "v", local / "v")
        rows = HUMAN[:5] + [_labels(b="s3://pairs/labels/v/b.mp4")]      # a relative and an absolute s3 reference
        _write_table(local / "t.jsonl", rows)
        upload_dir(local, "s3://pairs/labels/", create_bucket=True)
        remote = run_pairs(PairsConfig(source="s3://pairs/labels/t.jsonl"), dataset, tmp_path / "s3",
                           progress=lambda m: None, work_dir=tmp_path)
        here = run_pairs(PairsConfig(source=str(local / "t.jsonl")), dataset, tmp_path / "local",
                         progress=lambda m: None)
        assert remote["pairs"]["reasons"] == here["pairs"]["reasons"] == {"tie": 1, "missing video": 1}
        columns = ["pair_id", "winner", "loser", "weight"]
        assert read_pairs(tmp_path / "s3")[columns].equals(read_pairs(tmp_path / "local")[columns])
        assert remote["pairs"]["table_hash"] == here["pairs"]["table_hash"]
        fingerprint = source_fingerprint("s3://pairs/labels/t.jsonl", DIMS, tmp_path / "fp")
        assert len(fingerprint) == 16 and fingerprint == source_fingerprint("s3://pairs/labels/t.jsonl", DIMS,
                                                                            tmp_path / "fp2")
        _write_table(local / "t.jsonl", rows[:3])
        upload_dir(local, "s3://pairs/labels/")
        assert source_fingerprint("s3://pairs/labels/t.jsonl", DIMS, tmp_path / "fp3") != fingerprint
    finally:
        server.stop()


# --------------------------------------------------------------------------------------------------- Flyte task

def test_task_writes_the_artifact_logs_a_child_run_and_is_cached(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data = write_latent_dataset(tmp_path / "latents", n_clips=4, n_val=1)
    meta = json.loads((data / "meta.json").read_text())
    tracking_cfg = TrackingConfig(root=str(tmp_path / "runs"))
    parent = tracking.start_parent_run(tracking_cfg.root, "pairs-test", "parent", {}, {})

    @workflow
    def wf(cfg: PairsConfig, data: LatentDataset, tracking_cfg: TrackingConfig, parent_run: str) -> PreferencePairs:
        return build_preference_pairs(cfg=cfg, data=data, tracking_cfg=tracking_cfg, parent_run=parent_run,
                                      source_hash=pairs_source_hash(cfg=cfg))

    dataset = LatentDataset(folder=FlyteDirectory(str(data)), content_hash=meta["content_hash"], manifest_hash="",
                            vae_identity="", text_encoder_identity="", num_train=3, num_val=1)
    first = wf(cfg=PairsConfig(), data=dataset, tracking_cfg=tracking_cfg, parent_run=parent)
    assert (first.labels, first.num_pairs, first.dropped, first.data_hash) == ("auto", 3, 0, meta["content_hash"])
    folder = Path(first.folder.path)
    assert folder.parent == tmp_path / "runs" / "artifacts" / "pairs" and len(read_pairs(folder)) == 3
    assert json.loads((folder / "meta.json").read_text())["content_hash"] == first.content_hash
    again = wf(cfg=PairsConfig(), data=dataset, tracking_cfg=tracking_cfg, parent_run=parent)
    assert again.content_hash == first.content_hash
    client = MlflowClient(tracking_uri=tracking.tracking_uri(tracking_cfg.root))
    runs = client.search_runs([client.get_run(parent).info.experiment_id],
                              f"tags.`mlflow.parentRunId` = '{parent}'")
    assert [r.info.run_name for r in runs] == ["preference_pairs"]   # the rerun was a cache hit: no second run
    assert runs[0].data.tags["pairs.labels"] == "auto" and runs[0].data.metrics["pairs"] == 3
