"""Evaluation: the metric functions on videos with known answers, the suite (held-out clips only, its hash), the
whole evaluation against a champion (self = zero deltas; a better and a worse model ranked right), buckets decoded at
their own length, and registration (weights only, the first version becomes champion).

Tiny everything: a random VideoVAE (the MUG-V graph, 8 channels wide), a random T5, clips of 17 and 9 frames at 32x32
(latents [24, 3, 4, 4] and [24, 2, 4, 4]), a one-block DiT.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import EvalConfig, FlowConfig
from models.config import DiTConfig, VAEConfig
from tasks.evaluate import metrics as M

TINY_DIT = DiTConfig(hidden_size=48, depth=1, num_heads=2, caption_channels=64, max_text_len=16)
TINY_VAE = VAEConfig(latent_channels=24, spatial_channels=[8, 8, 8, 8], spatial_layers_per_block=1,   # half the
                     temporal_channels=8, temporal_res_blocks=1, norm_groups=8)                    # demo's widths
SIZE = 32
# (frames, split): two buckets among the held-out clips, 17 and 9 frames
CLIPS = [(17, "val"), (9, "val"), (17, "val"), (9, "train"), (17, "train"), (17, "train")]
FAST = dict(prompts=["a red square moving"], i2v_images=[""], seeds=[3], heldout_clips=2, sample_steps=2,
            num_frames=9, clip_frames=2, fps=8)


# ------------------------------------------------------------------------------------------------- synthetic data

def pattern(h: int, w: int, dx: float = 0.0, dy: float = 0.0, seed: int = 0) -> np.ndarray:
    """A smooth colour texture (sum of sinusoids) translated by (dx, dy) pixels: uint8 [h, w, 3]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    out = np.zeros((h, w, 3))
    for c in range(3):
        for _ in range(3):
            fx, fy, ph = rng.uniform(0.05, 0.2), rng.uniform(0.05, 0.2), rng.uniform(0, 6.28)
            out[..., c] += np.sin(fx * (xx - dx) * 2 * np.pi / 4 + fy * (yy - dy) * 2 * np.pi / 4 + ph)
    return np.clip(128 + 40 * out, 0, 255).astype(np.uint8)


def moving(frames: int, h: int, w: int, speed: float, seed: int = 0) -> np.ndarray:
    return np.stack([pattern(h, w, dx=speed * t, seed=seed) for t in range(frames)])


# --------------------------------------------------------------------------------------------- metric functions

def test_temporal_flickering_known_values():
    static = np.repeat(pattern(16, 16)[None], 9, axis=0)
    assert M.temporal_flickering(static) == 1.0
    assert M.temporal_flickering(static[:1]) == 1.0
    alternating = np.stack([np.zeros((8, 8, 3), np.uint8), np.full((8, 8, 3), 255, np.uint8)] * 3)
    assert M.temporal_flickering(alternating) == 0.0
    ramp = np.stack([np.full((8, 8, 3), 10 * t, np.uint8) for t in range(5)])   # |diff| = 10 everywhere
    assert M.temporal_flickering(ramp) == pytest.approx(1 - 10 / 255)


def test_farneback_is_curations_flow_and_finds_a_known_shift():
    from tasks.curate.motion import flow_magnitude

    a, b = pattern(48, 64), pattern(48, 64, dx=2.0)
    flow = M.farneback_flow(a, b)
    assert float(np.linalg.norm(flow, axis=-1).mean()) == pytest.approx(flow_magnitude(a, b, height=48), rel=1e-6)
    inner = flow[8:-8, 8:-8]
    assert np.median(inner[..., 0]) == pytest.approx(2.0, abs=0.2)
    assert np.median(inner[..., 1]) == pytest.approx(0.0, abs=0.2)


def test_dynamic_degree_static_zero_moving_one():
    static = np.repeat(pattern(64, 64)[None], 17, axis=0)
    move = moving(17, 64, 64, speed=3.0)                # 3 px/frame > 6 * 64 / 256 = 1.5 px at 8 fps
    assert not M.is_dynamic(static, fps=8)
    assert M.is_dynamic(move, fps=8)
    assert M.dynamic_degree([static, move], fps=8) == 0.5
    assert M.dynamic_degree([static, static], fps=8) == 0.0
    slow = moving(17, 64, 64, speed=0.5)                # below the threshold
    assert not M.is_dynamic(slow, fps=8)
    assert M.is_dynamic(moving(33, 64, 64, speed=1.0), fps=24)   # every 3rd frame: 3 px per kept step
    assert math.isnan(M.dynamic_degree([], fps=8))


def test_motion_smoothness_static_linear_and_jerky():
    static = np.repeat(pattern(48, 48)[None], 9, axis=0)
    assert M.motion_smoothness(static) == pytest.approx(1.0, abs=1e-4)   # Farnebäck: ~0.1 px noise at edges
    linear = moving(9, 48, 48, speed=1.0)
    jerky = linear.copy()
    jerky[1::2] = np.roll(jerky[1::2], 3, axis=2)       # odd frames off the linear path
    smooth, rough = M.motion_smoothness(linear), M.motion_smoothness(jerky)
    assert smooth > 0.98 and rough < smooth - 0.02
    mid = M.interpolate_middle(linear[0], linear[2])    # a 2 px shift: the half-way frame is the 1 px frame
    assert np.abs(mid[6:-6, 6:-6] - linear[1][6:-6, 6:-6].astype(np.float32)).mean() < 2.0


def test_psnr_ssim_known_values():
    a = pattern(32, 32)
    assert M.psnr(a, a) == M.PSNR_CAP
    assert M.ssim(a, a) == pytest.approx(1.0)
    b = (a.astype(np.int16) + 10).clip(0, 255).astype(np.uint8)
    mse = float(((a.astype(np.float64) - b) ** 2).mean())
    assert M.psnr(a, b) == pytest.approx(10 * math.log10(255 ** 2 / mse))
    noisy = (a + np.random.default_rng(0).normal(0, 40, a.shape)).clip(0, 255).astype(np.uint8)
    assert M.ssim(a, noisy) < M.ssim(a, b) < 1.0
    video = np.stack([a, a])
    assert M.video_psnr_ssim(video, video) == (M.PSNR_CAP, pytest.approx(1.0))


def test_frechet_distance_known_values():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3))
    assert M.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    shift = np.array([1.0, 2.0, 0.0])
    assert M.frechet_distance(x, x + shift) == pytest.approx(5.0, rel=1e-6)   # |shift|^2, same covariance
    big = rng.normal(size=(20000, 1))
    assert M.frechet_distance(big, 2 * big) == pytest.approx(1.0, rel=0.05)  # (sigma_a - sigma_b)^2 = 1
    few = rng.normal(size=(3, 24))                      # N < D: singular covariances
    value = M.frechet_distance(few, rng.normal(size=(2, 24)))
    assert math.isfinite(value) and value > 0
    assert M.frechet_distance(few[:1], few[:1]) == pytest.approx(0.0, abs=1e-9)   # one sample each


def test_clip_alignment_and_comparison_directions():
    t = np.array([1.0, 0.0])
    assert M.clip_alignment(t, np.array([[2.0, 0.0], [3.0, 0.0]])) == pytest.approx(1.0)
    assert M.clip_alignment(t, np.array([[-1.0, 0.0]])) == pytest.approx(-1.0)
    assert M.verdict("lower", 2.0, 1.0) == "better" and M.verdict("lower", 1.0, 2.0) == "worse"
    assert M.verdict("higher", 1.0, 2.0) == "better" and M.verdict("higher", 1.0, 1.0) == "same"
    assert M.verdict("higher", math.nan, 1.0) == "n/a"
    rows = M.compare({"heldout_flow_loss": 2.0, "temporal_flickering": 0.9},
                     {"heldout_flow_loss": 1.5, "temporal_flickering": 0.8})
    assert [(r.name, r.delta, r.verdict) for r in rows] == [("heldout_flow_loss", -0.5, "better"),
                                                            ("temporal_flickering", pytest.approx(-0.1), "worse")]
    assert all(spec.direction in ("higher", "lower") for spec in M.METRICS.values())


def test_eval_config_checks():
    with pytest.raises(ValueError, match="i2v_prompts"):
        EvalConfig(i2v_images=["", ""], i2v_prompts=["x"])
    with pytest.raises(ValueError, match="i3d_path"):
        EvalConfig(features="i3d")
    with pytest.raises(ValueError, match="8k\\+1"):
        EvalConfig(num_frames=16)


def test_i3d_loads_torchscript_and_gets_the_fvd_calling_convention(tmp_path):
    """The real loading path with a stand-in TorchScript module of the same interface (no weights here)."""
    from tasks.evaluate.features import I3DFeatures

    class FakeI3D(torch.nn.Module):
        def forward(self, x: torch.Tensor, rescale: bool = True, resize: bool = True,
                    return_features: bool = False) -> torch.Tensor:
            assert not rescale and not resize and return_features
            stats = torch.stack([x.min(), x.max(), torch.tensor(float(x.shape[2])), torch.tensor(float(x.shape[3]))])
            return stats[None].expand(x.shape[0], 4)

    path = tmp_path / "i3d_torchscript.pt"
    torch.jit.save(torch.jit.script(FakeI3D()), str(path))
    feats = I3DFeatures(str(path))
    lo, hi, t, h = feats(np.stack([np.zeros((16, 16, 3), np.uint8), np.full((16, 16, 3), 255, np.uint8)] * 5))
    assert (lo, hi, t, h) == (-1.0, 1.0, 10.0, 224.0)
    assert feats.comparable and feats.identity.startswith("i3d:")
    with pytest.raises(FileNotFoundError, match="i3d_path"):
        I3DFeatures(str(tmp_path / "missing.pt"))


def test_tiny_clip_scores_and_says_it_is_random():
    from tasks.evaluate.features import ClipScorer

    clip = ClipScorer(EvalConfig(clip_frames=2))
    video = moving(5, 40, 56, speed=1.0)
    score = clip.score("a red square", video)
    assert -1.0 <= score <= 1.0 and clip.score("a red square", video) == score
    assert clip.random and not clip.comparable and "tiny-random" in clip.identity


def test_loss_curves_svg_without_matplotlib(tmp_path, monkeypatch):
    import sys

    from tasks.evaluate import report

    curves = {"stage1": [(1, 2.0), (2, 1.5)], "stage2": [(1, 1.4), (2, 1.2)]}
    svg = report.svg_loss_curves(curves)
    assert svg.startswith("<svg") and svg.count("<polyline") == 2 and "stage2" in svg
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # import matplotlib -> ImportError
    assert report.plot_loss_curves(curves, tmp_path) == {"loss_curves": "loss_curves.svg"}
    assert (tmp_path / "loss_curves.svg").read_text() == svg


# ------------------------------------------------------------------------------------- a tiny dataset + models

def _clip_pixels(i: int, frames: int) -> np.ndarray:
    return moving(frames, SIZE, SIZE, speed=0.5 + 0.5 * (i % 3), seed=i)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A LatentDataset (two buckets in the val split), its ClipManifest-style clips/, and step folders: "good" has
    the DiT's init weights (velocity 0), "bad" a random final layer; each stage folder has a metrics.jsonl."""
    from common.latents import LatentWriter
    from models.dit import MUGDiT
    from models.text_encoder import TextEncoder, state_dict_sha256
    from models.vae import VideoVAE
    from tasks.curate.decode import write_clip
    from tasks.evaluate.codecs import to_pixels_CTHW
    from trainer import checkpoint

    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    vae = VideoVAE(TINY_VAE).eval()
    text = TextEncoder.tiny(d_model=64, max_length=16, seed=0)
    pixels = {f"clip{i:02d}": _clip_pixels(i, f) for i, (f, _) in enumerate(CLIPS)}
    with torch.no_grad():
        raw = {c: vae.encode(to_pixels_CTHW(p)[None]).mode()[0] for c, p in pixels.items()}
    flat = torch.cat([z.flatten(1) for z in raw.values()], dim=1)
    mean, std = flat.mean(1), flat.std(1).clamp_min(1e-6)
    captions = [f"clip {i} moving texture" for i in range(len(CLIPS))]
    feats, masks = text.encode(captions)
    writer = LatentWriter(root / "latents")
    for i, ((c, z), (_, split)) in enumerate(zip(raw.items(), CLIPS)):
        writer.add(c, ((z - mean.view(-1, 1, 1, 1)) / std.view(-1, 1, 1, 1)).float(), feats[i], masks[i],
                   split=split, caption=captions[i], score=1.0, bucket=f"{SIZE}x{SIZE}x{CLIPS[i][0]}")
    null, null_mask = text.encode([""])
    writer.write_null_text(null[0], null_mask[0])
    state = {k: v.contiguous() for k, v in vae.state_dict().items()}
    writer.write_vae(state, dataclasses.asdict(TINY_VAE))
    writer.write_text_encoder(text)
    ident = text.identity()
    writer.finish({"vae": {"config": dataclasses.asdict(TINY_VAE),
                           "weights_sha256": state_dict_sha256(state), "trained_steps": 0, "random_init": True},
                   "text_encoder": {"config": ident["config"], "pretrained": "",
                                    "weights_sha256": ident["weights_sha256"]},
                   "latent_mean": mean.tolist(), "latent_std": std.tolist(), "clip_manifest_hash": "test"})
    for c, p in pixels.items():
        write_clip(root / "manifest" / "clips" / f"{c}.mp4", p, 8)

    torch.manual_seed(1)
    good = MUGDiT(TINY_DIT).state_dict()
    bad = {k: v.clone() for k, v in good.items()}
    bad["final_layer.linear.weight"] = torch.randn_like(bad["final_layer.linear.weight"]) * 0.5
    meta = {"stage": "t", "config_hash": "t", "dit": dataclasses.asdict(TINY_DIT)}

    def step_folder(name: str, model_sd, ema_sd) -> Path:
        out = root / name
        folder = checkpoint.save(out, 4, rank=0, model_sd=model_sd, ema_sd=ema_sd, rank_state={"rng": 0},
                                 meta=meta, keep=1, barrier=lambda ok: ok)
        (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 2.0 / s}) + "\n"
                                                   for s in range(1, 5)))
        return folder

    return {"root": root, "latents": root / "latents", "manifest": root / "manifest",
            "good": step_folder("good", bad, good),       # EMA good, raw bad
            "bad": step_folder("bad", bad, bad), "pixels": pixels}


def _cfg(**kw) -> EvalConfig:
    return EvalConfig(**{**FAST, **kw})


def _suite(world, cfg: EvalConfig, clips_dir=None, load_pixels=True):
    from common.latents import LatentReader
    from tasks.evaluate.codecs import Codecs
    from tasks.evaluate.suite import build_suite

    return build_suite(cfg, LatentReader(world["latents"]), Codecs.load(world["latents"]), "vae:x", "clip:x",
                       clips_dir, load_pixels)


def test_suite_uses_only_heldout_clips_and_hashes_what_defines_it(world):
    from common.latents import LatentReader

    reader = LatentReader(world["latents"])
    suite = _suite(world, _cfg(heldout_clips=3))
    assert set(suite.heldout) <= set(reader.clip_ids("val"))
    assert not set(suite.heldout) & set(reader.clip_ids("train"))
    assert len(suite.heldout) == 3 and set(suite.pixels) == set(suite.heldout)

    def hash_of(**kw) -> str:
        return _suite(world, _cfg(**{"heldout_clips": 3, **kw}), load_pixels=False).hash

    assert hash_of() == suite.hash
    assert hash_of(prompts=["a blue square moving"]) != suite.hash
    assert hash_of(seeds=[4]) != suite.hash and hash_of(heldout_clips=1) != suite.hash
    assert hash_of(cfg_scale=3.0) != suite.hash and hash_of(sample_steps=3) != suite.hash
    assert hash_of(evaluate_raw=False) == suite.hash     # how, not what, is evaluated
    keys = [c.key for c in suite.cases]
    assert keys == ["t2v00_s3", "i2v00_s3"]


def test_suite_refuses_a_dataset_without_heldout_clips(tmp_path):
    from common.latents import LatentReader
    from helpers import write_latent_dataset
    from tasks.evaluate.suite import select_heldout

    reader = LatentReader(write_latent_dataset(tmp_path / "l", n_clips=2, n_val=0))
    with pytest.raises(ValueError, match="holdout_fraction"):
        select_heldout(reader, 4)


def test_buckets_decode_at_their_own_length(world):
    """Held-out clips of 17 and 9 frames decode at 17 and 9 frames; I2V from them samples at their length."""
    from common.latents import LatentReader
    from tasks.evaluate.codecs import Codecs
    from tasks.evaluate.evaluate import generate, load_dit

    reader = LatentReader(world["latents"])
    suite = _suite(world, _cfg(num_frames=17, i2v_images=["", "", ""], heldout_clips=3))
    lengths = {c: len(v) for c, v in suite.pixels.items()}
    assert lengths == {c: 8 * (reader.latent_shape(c)[1] - 1) + 1 for c in suite.heldout}
    assert set(lengths.values()) == {17, 9}
    i2v = [c for c in suite.cases if c.task == "i2v"]
    assert {c.num_frames for c in i2v} == {lengths[c.clip_id] for c in i2v} == {17, 9}
    codecs = Codecs.load(world["latents"])
    model = load_dit(TINY_DIT, world["good"], ema=True)
    for case in i2v:
        video = generate(model, codecs, case, _cfg(), suite.cond_images[case.key])
        assert video.shape == (case.num_frames, SIZE, SIZE, 3)
    with_clips = _suite(world, _cfg(num_frames=17, i2v_images=["", "", ""], heldout_clips=3),
                        clips_dir=world["manifest"])
    assert with_clips.pixels_source == "clips" and with_clips.hash != suite.hash
    first = with_clips.heldout[0]
    assert M.psnr(with_clips.pixels[first], world["pixels"][first]) > 25   # the mp4 (yuv420p) of the same frames


def _run(world, tmp: Path, step: str, champion: str | None = None, **kw):
    from tasks.evaluate.evaluate import ChampionFiles, run_evaluation

    champ = None if champion is None else ChampionFiles(version="1", step_dir=world[champion],
                                                        codecs_dir=world["latents"], suite_hash="old")
    stages = [("stage1", world["good"].parent), ("stage2", world["bad"].parent)]
    return run_evaluation(_cfg(**kw), TINY_DIT, FlowConfig(), world["latents"], world[step], tmp, stages=stages,
                          champion=champ, progress=lambda m: None)


def test_a_model_against_itself_has_zero_deltas_and_a_full_report(world, tmp_path):
    out = _run(world, tmp_path, "good", champion="good", evaluate_raw=False)
    assert {r.verdict for r in out.comparison} == {"same"}
    assert all(r.delta == 0.0 for r in out.comparison)
    assert set(out.metrics) == set(M.METRICS)            # every metric measured
    for name in ("frechet_distance", "clip_alignment", "vae_recon_psnr"):
        assert not out.metrics[name].comparable          # VAE features, a random CLIP, re-encoded clips
    doc = json.loads((tmp_path / "metrics.json").read_text())
    assert doc["suite_hash"] == out.suite.hash and doc["champion"]["reevaluated"] is True
    assert {m["name"]: m["direction"] for m in doc["metrics"]}["heldout_flow_loss"] == "lower"
    page = (tmp_path / "report.html").read_text()
    assert "not comparable to published numbers" in page and out.suite.hash in page
    assert "re-evaluated on this suite" in page and "= same" in page
    for case in out.suite.cases:
        sbs = tmp_path / "samples" / "side_by_side" / f"{case.key}.mp4"
        assert sbs.is_file() and (tmp_path / "samples" / "champion" / f"{case.key}.mp4").is_file()
    assert (tmp_path / "loss_curves.png").is_file()


def test_better_and_worse_models_are_ranked_by_direction(world, tmp_path):
    """"good" (EMA = init DiT, velocity 0) has a lower held-out flow loss than "bad" (random final layer) by
    construction; the raw weights of "good" are "bad"'s, so EMA and raw differ."""
    from common.latents import LatentReader
    from tasks.evaluate.evaluate import flow_loss_on, load_dit

    out = _run(world, tmp_path, "good", champion="bad")   # and the raw weights
    row = {r.name: r for r in out.comparison}["heldout_flow_loss"]
    assert row.direction == "lower" and row.delta < 0 and row.verdict == "better"
    assert out.metrics["heldout_flow_loss"].value < out.raw["heldout_flow_loss"].value
    reader = LatentReader(world["latents"])
    ema = load_dit(TINY_DIT, world["good"], ema=True)
    assert out.metrics["heldout_flow_loss"].value == pytest.approx(flow_loss_on(ema, reader, out.suite.heldout, 42))
    assert "✔ better" in (tmp_path / "report.html").read_text() and "↓ lower" in (tmp_path / "report.html").read_text()
    swapped = M.compare({k: m.value for k, m in out.metrics.items()}, out.champion.values())   # bad vs good
    back = {r.name: r for r in swapped}
    assert back["heldout_flow_loss"].verdict == "worse" and back["heldout_flow_loss"].delta > 0


def test_tasks_first_version_becomes_champion_then_candidates_are_compared_with_it(world, tmp_path, monkeypatch):
    """The Flyte task bodies: evaluate (no champion) -> register (v1 = champion, weights only) -> evaluate another
    checkpoint (compared with v1 on the same suite) -> register (v2 = candidate; the champion stays v1)."""
    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file

    from common import tracking
    from common.config import GateConfig, GateMetric, PipelineConfig, RegisterConfig, TrackingConfig, TrainConfig
    from tasks.evaluate.task import evaluate
    from tasks.register.registry import CHECKPOINT_FILES
    from tasks.register.task import register
    from tasks.types import Checkpoint, ClipManifest, FlyteDirectory, LatentDataset

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tc = TrackingConfig(experiment="t", root=str(tmp_path / "runs"))
    config = PipelineConfig(train=TrainConfig(dit=TINY_DIT), register=RegisterConfig(model_name="m", gate=GateConfig(
        metrics=[GateMetric("heldout_flow_loss", must_improve=True)])), tracking=tc,
                            evaluate=_cfg())
    parent = tracking.start_parent_run(tc.root, tc.experiment, "p", {}, {})
    data = LatentDataset(folder=FlyteDirectory(str(world["latents"])), content_hash="d", manifest_hash="m",
                         vae_identity="v", text_encoder_identity="t", num_train=3, num_val=3)
    manifest = ClipManifest(folder=FlyteDirectory(str(world["manifest"])), content_hash="m", source_hashes=["s"],
                            inputs=1, kept=1, rejected=0, failed=0)

    def ckpt(name: str) -> Checkpoint:
        return Checkpoint(folder=FlyteDirectory(str(world[name].parent)), stage=name, step=4, content_hash=name,
                          config_hash="c", data_hash="d", parent_hash="", mlflow_run_id="", final_loss=1.0)

    reports, versions = [], []
    for name, raw in (("good", False), ("bad", True)):
        report = evaluate.task_function(cfg=_cfg(evaluate_raw=raw), dit=TINY_DIT, flow=FlowConfig(), data=data,
                                        checkpoint=ckpt(name), stages=[ckpt("good"), ckpt("bad")],
                                        register=config.register, tracking_cfg=tc, parent_run=parent)
        reports.append(report)
        versions.append(register.task_function(config=config, manifest=manifest, data=data, checkpoint=ckpt(name),
                                               report=report, parent_run=parent))
    first, second = reports
    assert first.champion_version == "" and first.champion_metrics == {} and first.deltas == {}
    assert second.champion_version == versions[0].version and second.suite_hash == first.suite_hash
    assert second.champion_metrics["heldout_flow_loss"] == pytest.approx(first.metrics["heldout_flow_loss"])
    assert second.deltas["heldout_flow_loss"] > 0 and second.directions["heldout_flow_loss"] == "lower"

    client = MlflowClient(tracking_uri=tracking.tracking_uri(tc.root), registry_uri=tracking.tracking_uri(tc.root))
    run = client.get_run(second.mlflow_run_id)
    for key in ("eval.heldout_flow_loss", "eval.raw.heldout_flow_loss", "champion.heldout_flow_loss",
                "delta.heldout_flow_loss"):
        assert key in run.data.metrics, key
    assert run.data.tags["eval.suite_hash"] == second.suite_hash
    v1, v2 = (client.get_model_version("m", v.version) for v in versions)
    files = {a.path for a in client.list_artifacts(v1.run_id, "checkpoint")}
    assert files == {f"checkpoint/{f}" for f in CHECKPOINT_FILES}          # no optim/, no dist/
    assert "first model" in v1.tags["gate.decision"] and v2.tags["gate.decision"].startswith("not promoted")
    assert v1.tags["eval.suite_hash"] == first.suite_hash
    assert json.loads(v1.tags["eval.metrics_json"]) == pytest.approx(first.metrics)
    assert client.get_model_version_by_alias("m", "champion").version == v1.version
    assert client.get_model_version_by_alias("m", "candidate").version == v2.version
    import mlflow

    mlflow.set_tracking_uri(tracking.tracking_uri(tc.root))
    mlflow.set_registry_uri(tracking.tracking_uri(tc.root))
    from tasks.register.registry import load_registered_dit

    loaded = load_registered_dit("models:/m@champion", tmp_path / "registered")
    assert {a.path for a in client.list_artifacts(v1.run_id)} >= {"checkpoint", "codecs", "evaluation"}
    assert not {a.path for a in client.list_artifacts(v1.run_id)} & {"model", "optim", "dist"}   # no pickled model
    assert v1.source == f"runs:/{v1.run_id}/checkpoint"
    ema = load_file(str(world["good"] / "ema.safetensors"))
    assert all(torch.equal(loaded.state_dict()[k], ema[k]) for k in ema)   # the registered model is the EMA


def test_only_the_final_steps_weights_are_fetched_from_remote_storage(world, tmp_path):
    """A remote Checkpoint folder (here a file:// URI) gives evaluation latest + model/ema/meta.json, not optim/."""
    from tasks.evaluate.task import STEP_FILES, final_step_dir
    from tasks.types import Checkpoint, FlyteDirectory

    folder = FlyteDirectory(str(tmp_path / "not-downloaded"))
    folder._remote_source = world["good"].parent.as_uri()
    ckpt = Checkpoint(folder=folder, stage="s", step=4, content_hash="h", config_hash="c", data_hash="d",
                      parent_hash="", mlflow_run_id="", final_loss=1.0)
    step = final_step_dir(ckpt, tmp_path / "dl")
    assert step == tmp_path / "dl" / world["good"].name
    assert sorted(p.name for p in step.iterdir()) == sorted(STEP_FILES)
    local = final_step_dir(replace(ckpt, folder=FlyteDirectory(str(world["good"].parent))), tmp_path / "x")
    assert local == world["good"] and not (tmp_path / "x").exists()   # a local folder is read in place
