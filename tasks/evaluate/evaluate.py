"""Evaluate a checkpoint's EMA weights on the fixed suite, beside its raw weights and against the champion.

No Flyte or MLflow here: ``tasks/evaluate/task.py`` finds the champion in the registry, downloads its files and
calls ``run_evaluation``; docs/evaluation.md describes every metric.

    outcome = run_evaluation(cfg, dit_cfg, latents_dir, step_dir, out_dir,
                             stages=[("stage1", stage1_dir), ...],            # metrics.jsonl -> loss curves
                             champion=ChampionFiles(version="3", step_dir=..., codecs_dir=...))   # or None
    outcome.metrics            # {name: Metric} of the candidate's EMA weights (the main table)
    outcome.raw                # {name: Metric} of its raw weights (evaluate_raw)
    outcome.champion           # the champion's ModelEval on the same suite and seeds, or None
    out_dir: metrics.json, report.html, loss_curves.png|svg, samples/{candidate,champion,side_by_side}/<case>.mp4

Every model is run on the same ``Suite`` (tasks/evaluate/suite.py): the same cases, seeds and noise, the same
held-out clips and conditioning images, the same feature extractor and CLIP. Each model decodes with its own codecs
(a registered version carries its VAE and text encoder); the held-out flow loss needs the suite's latent space and
is NaN (n/a) for a model trained on another one.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from common.config import DiTConfig, EvalConfig, FlowConfig
from models.dit import MUGDiT
from tasks.evaluate.codecs import Codecs
from tasks.evaluate.metrics import (
    Metric,
    compare,
    dynamic_degree,
    frechet_distance,
    make_metric,
    motion_smoothness,
    psnr,
    ssim,
    temporal_flickering,
    video_psnr_ssim,
)
from tasks.evaluate.results import ChampionFiles, EvalOutcome, ModelEval, finite, json_safe
from tasks.evaluate.suite import EVAL_TIMESTEPS, SampleCase, Suite, build_suite, clip_captions

Progress = Callable[[str], None]


def load_dit(dit_cfg: DiTConfig, step_dir: Path, ema: bool = False) -> MUGDiT:
    """The DiT of a checkpoint step folder: ``ema.safetensors`` (ema=True) or ``model.safetensors``, checksum
    verified against meta.json, loaded strictly; eval mode."""
    from trainer.checkpoint import load_weights

    model = MUGDiT(dit_cfg)
    missing, unexpected = model.load_state_dict(load_weights(step_dir, ema=ema), strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {step_dir} does not match the DiT config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return model.eval()


def dit_config_of(step_dir: Path) -> DiTConfig:
    """The DiT config a step folder was trained with (meta.json "dit")."""
    from trainer.checkpoint import read_meta

    return DiTConfig(**read_meta(step_dir)["dit"])


@torch.no_grad()
def flow_loss_on(model: torch.nn.Module, reader: Any, clip_ids: Sequence[str], seed: int) -> float:
    """Mean rectified-flow loss over ``clip_ids`` x ``EVAL_TIMESTEPS``; clip k's noise is drawn from seed + k, so
    every model sees identical inputs. Each clip keeps its own latent shape (bucket)."""
    from models import rectified_flow as rf

    losses = []
    for k, cid in enumerate(clip_ids):
        latent, text, mask = reader.load(cid)
        x0 = latent[None].float()
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed + k))
        for t_val in EVAL_TIMESTEPS:
            t = torch.tensor([t_val])
            v = model(rf.interpolate(x0, noise, t), t, text[None].float(), mask[None].bool())
            losses.append(float(rf.flow_loss(v, x0, noise).mean()))
    return float(np.mean(losses)) if losses else math.nan


@torch.no_grad()
def generate(model: MUGDiT, codecs: Codecs, case: SampleCase, cfg: EvalConfig,
             cond_image: Optional[np.ndarray] = None) -> np.ndarray:
    """One sample of ``case``: Euler + CFG from noise drawn with the case's seed (the negative prompt is ""), I2V
    with the conditioning image encoded by the model's own VAE as latent frame 0 (``euler_sample(cond_latent=)``),
    decoded at the case's own length -> uint8 [num_frames, H, W, 3]."""
    from models import rectified_flow as rf

    down = codecs.spatial_downsample
    c = model.cfg.in_channels
    t_lat = (case.num_frames - 1) // 8 + 1
    noise = torch.randn((1, c, t_lat, case.height // down, case.width // down),
                        generator=torch.Generator().manual_seed(case.seed))
    text, mask = codecs.encode_text([case.prompt])
    cond = None
    if case.task == "i2v":
        if cond_image is None:
            raise ValueError(f"{case.key}: an i2v case needs its conditioning image")
        cond = codecs.encode_video(cond_image[None])[None, :, :1]            # (1, C, 1, h, w)
    z = rf.euler_sample(model, noise, text, mask, codecs.null_text[None], codecs.null_mask[None],
                        steps=cfg.sample_steps, cfg_scale=cfg.cfg_scale, height_px=case.height, width_px=case.width,
                        cond_latent=cond)
    return codecs.decode(z[0], case.num_frames)


class Toolkit:
    """What every model is measured with, built once per suite: the video feature extractor, CLIP, the held-out
    clips' features and the reference figures of the held-out clips."""

    def __init__(self, cfg: EvalConfig, features: Any, clip: Any) -> None:
        self.cfg, self.features, self.clip = cfg, features, clip
        self.real_features: Optional[np.ndarray] = None
        self.reference: Dict[str, float] = {}
        self._recon: Dict[str, Tuple[float, float]] = {}   # VAE identity -> (PSNR, SSIM): models sharing a VAE

    def reconstruction(self, suite: Suite, codecs: Codecs) -> Tuple[float, float]:
        """Mean (PSNR, SSIM) of the held-out clips vs their reconstruction by ``codecs``' VAE (once per VAE)."""
        if codecs.vae_identity not in self._recon:
            recon = [video_psnr_ssim(suite.pixels[c], codecs.decode(codecs.encode_video(suite.pixels[c]),
                                                                     len(suite.pixels[c]))) for c in suite.heldout]
            self._recon[codecs.vae_identity] = (float(np.mean([r[0] for r in recon])),
                                                float(np.mean([r[1] for r in recon])))
        return self._recon[codecs.vae_identity]

    def prepare(self, suite: Suite, captions: Dict[str, str]) -> None:
        videos = [suite.pixels[c] for c in suite.heldout]
        self.real_features = np.stack([self.features(v) for v in videos])
        self.reference = {
            "temporal_flickering": float(np.mean([temporal_flickering(v) for v in videos])),
            "motion_smoothness": float(np.mean([motion_smoothness(v) for v in videos])),
            "dynamic_degree": dynamic_degree(videos, self.cfg.fps),
        }
        scored = [(captions[c], suite.pixels[c]) for c in suite.heldout if captions.get(c)]
        if scored:
            self.reference["clip_alignment"] = float(np.mean([self.clip.score(p, v) for p, v in scored]))


def evaluate_model(label: str, model: MUGDiT, codecs: Codecs, suite: Suite, tools: Toolkit,
                   reader: Any, cfg: EvalConfig, progress: Progress = print) -> ModelEval:
    """Every metric of ``METRICS`` for one model on ``suite`` (docs/evaluation.md)."""
    metrics: Dict[str, Metric] = {}
    ref = tools.reference

    # 1. held-out flow loss (latent space: only for a model trained on the suite's latents)
    if codecs.latent_space == suite.description["latent_space"]:
        loss = flow_loss_on(model, reader, suite.heldout, cfg.seed)
        metrics["heldout_flow_loss"] = make_metric("heldout_flow_loss", loss)
    else:
        metrics["heldout_flow_loss"] = make_metric("heldout_flow_loss", math.nan,
                                                   note="n/a: the model works in another latent space (VAE/text)")
    progress(f"{label}: held-out flow loss {metrics['heldout_flow_loss'].value:.4f} on {len(suite.heldout)} clips")

    # 2. samples, same cases and seeds for every model
    samples: Dict[str, np.ndarray] = {}
    for i, case in enumerate(suite.cases):
        samples[case.key] = generate(model, codecs, case, cfg, suite.cond_images.get(case.key))
        progress(f"{label}: sample {i + 1}/{len(suite.cases)} {case.key} {samples[case.key].shape[:3]}")
    videos = list(samples.values())

    # 3. temporal quality and motion (weight-free)
    metrics["temporal_flickering"] = make_metric(
        "temporal_flickering", float(np.mean([temporal_flickering(v) for v in videos])),
        reference=ref.get("temporal_flickering", math.nan))
    metrics["motion_smoothness"] = make_metric(
        "motion_smoothness", float(np.mean([motion_smoothness(v) for v in videos])),
        reference=ref.get("motion_smoothness", math.nan))
    metrics["dynamic_degree"] = make_metric("dynamic_degree", dynamic_degree(videos, cfg.fps),
                                            reference=ref.get("dynamic_degree", math.nan))

    # 4. I2V first-frame fidelity
    i2v = [(samples[c.key][0], suite.cond_images[c.key]) for c in suite.cases if c.task == "i2v"]
    if i2v:
        metrics["i2v_first_frame_psnr"] = make_metric("i2v_first_frame_psnr",
                                                      float(np.mean([psnr(a, b) for a, b in i2v])))
        metrics["i2v_first_frame_ssim"] = make_metric("i2v_first_frame_ssim",
                                                      float(np.mean([ssim(a, b) for a, b in i2v])))

    # 5. VAE reconstruction of the held-out clips with the model's own VAE
    recon_psnr, recon_ssim = tools.reconstruction(suite, codecs)
    note = "vs the held-out clips' pixels (the ClipManifest's mp4s)" if suite.pixels_source == "clips" else \
        "vs the held-out latents decoded by the dataset's VAE (no clip pixels found): a re-encoding figure"
    metrics["vae_recon_psnr"] = make_metric("vae_recon_psnr", recon_psnr, comparable=suite.pixels_source == "clips",
                                            note=note)
    metrics["vae_recon_ssim"] = make_metric("vae_recon_ssim", recon_ssim, comparable=suite.pixels_source == "clips",
                                            note=note)

    # 6. Fréchet distance, held-out clips vs samples, in the suite's feature space
    assert tools.real_features is not None, "Toolkit.prepare(suite) first"
    gen_features = np.stack([tools.features(v) for v in videos])
    fd_note = "" if tools.features.comparable else \
        "feature space: our VAE encoder (set evaluate.features 'i3d' for FVD); few samples"
    metrics["frechet_distance"] = make_metric(
        "frechet_distance", frechet_distance(tools.real_features, gen_features, cfg.fd_eps),
        comparable=tools.features.comparable, note=fd_note)

    # 7. CLIP text-video alignment (cases with a prompt)
    scored = [(c.prompt, samples[c.key]) for c in suite.cases if c.prompt]
    if scored:
        clip_note = "" if tools.clip.comparable else "tiny random CLIP: the value is noise (set clip_pretrained)"
        metrics["clip_alignment"] = make_metric(
            "clip_alignment", float(np.mean([tools.clip.score(p, v) for p, v in scored])),
            comparable=tools.clip.comparable, note=clip_note,
            reference=ref.get("clip_alignment", math.nan))
    progress(f"{label}: " + ", ".join(f"{k}={m.value:.4g}" for k, m in metrics.items()))
    return ModelEval(label, metrics, samples)


def run_evaluation(cfg: EvalConfig, dit_cfg: DiTConfig, flow: FlowConfig, latents_dir: Path, step_dir: Path,
                   out_dir: Path, stages: Sequence[Tuple[str, Path]] = (), champion: Optional[ChampionFiles] = None,
                   clips_dir: Optional[Path] = None, progress: Progress = print) -> EvalOutcome:
    """Evaluate ``step_dir``'s EMA weights (and raw weights) on the suite of ``cfg`` over ``latents_dir``, the
    champion on the same suite when given, and write metrics.json, report.html, samples and loss curves to
    ``out_dir``. ``flow`` is accepted for the record (sampling follows MUG-V's shift, models/rectified_flow.py)."""
    from common.latents import LatentReader
    from tasks.evaluate import report
    from tasks.evaluate.features import ClipScorer, video_features

    out_dir.mkdir(parents=True, exist_ok=True)
    reader = LatentReader(latents_dir)
    codecs = Codecs.load(latents_dir)
    tools = Toolkit(cfg, video_features(cfg, codecs.vae, codecs.vae_identity[:16]), ClipScorer(cfg))
    suite = build_suite(cfg, reader, codecs, tools.features.identity, tools.clip.identity, clips_dir)
    captions = clip_captions(reader)
    tools.prepare(suite, captions)
    progress(f"suite {suite.hash}: {len(suite.cases)} samples, held-out {suite.heldout} ({suite.pixels_source})")

    # candidate: EMA weights (the main table), raw weights beside them
    candidate = evaluate_model("candidate", load_dit(dit_cfg, step_dir, ema=True), codecs, suite, tools, reader,
                               cfg, progress)
    raw = evaluate_model("candidate_raw", load_dit(dit_cfg, step_dir, ema=False), codecs, suite, tools, reader,
                         cfg, progress) if cfg.evaluate_raw else None

    # champion: its EMA weights and its own codecs, on the same suite and seeds
    champ = None
    if champion is not None:
        champ_codecs = codecs if _same_codecs(champion.codecs_dir, codecs) else Codecs.load(champion.codecs_dir)
        model = load_dit(dit_config_of(champion.step_dir), champion.step_dir, ema=True)
        champ = evaluate_model("champion", model, champ_codecs, suite, tools, reader, cfg, progress)
        if champion.suite_hash and champion.suite_hash != suite.hash:
            progress(f"champion v{champion.version} was registered on suite {champion.suite_hash}; re-evaluated on "
                     f"the current suite {suite.hash}")
    comparison = compare(champ.values(), candidate.values()) if champ else []

    outcome = EvalOutcome(suite=suite, metrics=candidate.metrics, raw=raw.metrics if raw else {}, champion=champ,
                          champion_files=champion, comparison=comparison)
    outcome.files.update(report.write_samples(out_dir / "samples", suite, candidate, champ, cfg.fps))
    curves = report.read_loss_curves(stages)
    outcome.files.update(report.plot_loss_curves(curves, out_dir))
    write_metrics_json(outcome, step_dir, out_dir / "metrics.json")
    (out_dir / "report.html").write_text(report.render_html(outcome, step_dir, out_dir, curves))
    outcome.files.update({"metrics": "metrics.json", "report": "report.html"})
    return outcome


def _same_codecs(codecs_dir: Path, codecs: Codecs) -> bool:
    """Whether a champion's codecs folder is the suite's (same meta.json VAE/text identity and statistics): then
    the loaded codecs are reused."""
    meta_path = Path(codecs_dir) / "meta.json"
    if not meta_path.is_file():
        return False
    meta = json.loads(meta_path.read_text())
    return (str(meta["vae"].get("weights_sha256", "")) == codecs.vae_identity
            and str(meta["text_encoder"].get("weights_sha256", meta["text_encoder"].get("pretrained", "")))
            == codecs.text_identity
            and [float(v) for v in meta["latent_mean"]] == codecs.mean.tolist()
            and [float(v) for v in meta["latent_std"]] == codecs.std.tolist())


def write_metrics_json(outcome: EvalOutcome, step_dir: Path, path: Path) -> None:
    """metrics.json (docs/evaluation.md): the suite and its hash, every metric with direction and comparability for
    the EMA weights, the raw weights, the champion and the comparison."""
    champ = outcome.champion_files
    doc = {
        "suite_hash": outcome.suite.hash,
        "suite": outcome.suite.description,
        "checkpoint": str(step_dir),
        "weights": "ema",
        "metrics": [m.to_dict() for m in outcome.metrics.values()],
        "values": finite(outcome.metrics),
        "raw": finite(outcome.raw),
        "champion": None if champ is None or outcome.champion is None else {
            "version": champ.version, "registered_suite_hash": champ.suite_hash,
            "reevaluated": champ.suite_hash != outcome.suite.hash, "values": finite(outcome.champion.metrics),
            "registered_values": champ.metrics},
        "comparison": [asdict(r) for r in outcome.comparison],
    }
    path.write_text(json.dumps(json_safe(doc), indent=1, sort_keys=True))
