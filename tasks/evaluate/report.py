"""The evaluation report: sample videos (champion | candidate side by side), loss curves of every training stage and
the HTML page shown as the Flyte Deck and logged to MLflow.

    files = write_samples(out / "samples", suite, candidate, champion, fps=8)   # mp4 + png strip per case
    curves = read_loss_curves([("stage1", stage1_dir), ...])                    # metrics.jsonl of each stage
    files |= plot_loss_curves(curves, out)        # loss_curves.png (matplotlib), else loss_curves.svg (drawn here)
    html = render_html(outcome, step_dir, out, curves)
"""
from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from tasks.evaluate.metrics import ARROWS, METRICS
from tasks.evaluate.results import EvalOutcome, ModelEval
from tasks.evaluate.suite import Suite

Curves = Dict[str, List[Tuple[int, float]]]
SEPARATOR_PX = 4          # white column between champion and candidate in a side-by-side video
MARKS = {"better": "✔ better", "worse": "✘ worse", "same": "= same", "n/a": "n/a"}
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


def side_by_side(left_THWC: np.ndarray, right_THWC: np.ndarray) -> np.ndarray:
    """Two videos of one length and height concatenated horizontally with a white separator column."""
    if left_THWC.shape[:2] != right_THWC.shape[:2]:
        raise ValueError(f"side_by_side: videos differ in length/height, {left_THWC.shape} vs {right_THWC.shape}")
    t, h = left_THWC.shape[:2]
    sep = np.full((t, h, SEPARATOR_PX, 3), 255, np.uint8)
    return np.concatenate([left_THWC, sep, right_THWC], axis=2)


def strip_png(frames_THWC: np.ndarray, path: Path, n: int = 6) -> None:
    """``n`` evenly spaced frames side by side as one PNG."""
    import cv2

    idx = np.linspace(0, len(frames_THWC) - 1, min(n, len(frames_THWC))).round().astype(int)
    cv2.imwrite(str(path), cv2.cvtColor(np.concatenate([frames_THWC[i] for i in idx], axis=1), cv2.COLOR_RGB2BGR))


def write_samples(samples_dir: Path, suite: Suite, candidate: ModelEval, champion: Optional[ModelEval],
                  fps: int) -> Dict[str, str]:
    """samples/candidate/<case>.mp4 (+ .png), and with a champion samples/champion/<case>.mp4 and
    samples/side_by_side/<case>.mp4 (champion | candidate, same prompt and seed). Returns name -> relative path."""
    from tasks.curate.decode import write_clip

    files: Dict[str, str] = {}
    root = samples_dir.parent
    for case in suite.cases:
        sets = [("candidate", candidate.samples[case.key])]
        if champion is not None:
            sets += [("champion", champion.samples[case.key]),
                     ("side_by_side", side_by_side(champion.samples[case.key], candidate.samples[case.key]))]
        for kind, frames in sets:
            path = samples_dir / kind / f"{case.key}.mp4"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_clip(path, frames, fps)
            strip_png(frames, path.with_suffix(".png"))
            files[f"{kind}/{case.key}"] = str(path.relative_to(root))
    return files


def read_loss_curves(stages: Sequence[Tuple[str, Path]]) -> Curves:
    """Stage name -> [(step, loss)] from each stage folder's metrics.jsonl (a missing file gives [])."""
    curves: Curves = {}
    for name, folder in stages:
        path = Path(folder) / "metrics.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
        curves[name] = [(int(r["step"]), float(r["loss"])) for r in rows if "loss" in r and "step" in r]
    return curves


def _global_steps(curves: Curves) -> Dict[str, List[Tuple[int, float]]]:
    """Each stage's steps shifted by the steps of the stages before it (one x axis for the whole run)."""
    out, offset = {}, 0
    for name, pts in curves.items():
        out[name] = [(offset + s, v) for s, v in pts]
        offset += max((s for s, _ in pts), default=0)
    return out


def svg_loss_curves(curves: Curves, width: int = 640, height: int = 320) -> str:
    """The loss curves as a self-contained SVG (no matplotlib): one polyline per stage on a shared step axis."""
    pts = _global_steps(curves)
    xs = [x for p in pts.values() for x, _ in p]
    ys = [y for p in pts.values() for _, y in p if math.isfinite(y)]
    pad_l, pad_r, pad_t, pad_b = 56, 140, 16, 36
    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' font-family='sans-serif' "
             f"font-size='11'><rect width='100%' height='100%' fill='white'/>"]
    if not xs or not ys:
        parts.append(f"<text x='{pad_l}' y='{height // 2}'>no training metrics</text></svg>")
        return "".join(parts)
    x0, x1 = min(xs), max(max(xs), min(xs) + 1)
    y0, y1 = min(ys), max(max(ys), min(ys) + 1e-9)
    pw, ph = width - pad_l - pad_r, height - pad_t - pad_b

    def sx(x: float) -> float:
        return pad_l + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return pad_t + (1 - (y - y0) / (y1 - y0)) * ph

    parts.append(f"<rect x='{pad_l}' y='{pad_t}' width='{pw}' height='{ph}' fill='none' stroke='#888'/>")
    for frac in (0.0, 0.5, 1.0):
        yv, xv = y0 + frac * (y1 - y0), x0 + frac * (x1 - x0)
        parts.append(f"<text x='{pad_l - 4}' y='{sy(yv) + 4:.1f}' text-anchor='end'>{yv:.3g}</text>")
        parts.append(f"<text x='{sx(xv):.1f}' y='{height - pad_b + 14}' text-anchor='middle'>{xv:.0f}</text>")
    parts.append(f"<text x='{pad_l + pw / 2:.0f}' y='{height - 4}' text-anchor='middle'>step (all stages)</text>")
    for i, (name, p) in enumerate(pts.items()):
        color = COLORS[i % len(COLORS)]
        line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in p if math.isfinite(y))
        if line:
            parts.append(f"<polyline fill='none' stroke='{color}' stroke-width='1.5' points='{line}'/>")
        ly = pad_t + 14 * (i + 1)
        parts.append(f"<line x1='{width - pad_r + 8}' y1='{ly - 4}' x2='{width - pad_r + 24}' y2='{ly - 4}' "
                     f"stroke='{color}' stroke-width='2'/><text x='{width - pad_r + 28}' y='{ly}'>"
                     f"{html.escape(name)}</text>")
    parts.append("</svg>")
    return "".join(parts)


def plot_loss_curves(curves: Curves, out_dir: Path) -> Dict[str, str]:
    """loss_curves.png with matplotlib (Agg) when it is installed, else loss_curves.svg; {} without stages."""
    if not curves:
        return {}
    try:
        import matplotlib
    except ImportError:
        (out_dir / "loss_curves.svg").write_text(svg_loss_curves(curves))
        return {"loss_curves": "loss_curves.svg"}
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    for name, p in _global_steps(curves).items():
        if p:
            ax.plot([x for x, _ in p], [y for _, y in p], label=name, linewidth=1.2)
    ax.set_xlabel("step (all stages)")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "loss_curves.png")
    plt.close(fig)
    return {"loss_curves": "loss_curves.png"}


def _fmt(v: float) -> str:
    return "—" if not math.isfinite(v) else f"{v:.5g}"


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def metric_table(outcome: EvalOutcome) -> str:
    """The main table: one row per metric of the candidate's EMA weights, with champion, delta and verdict, the raw
    weights, the held-out clips' reference figure and comparability to published numbers."""
    champ = outcome.champion
    rows_by_name = {r.name: r for r in outcome.comparison}
    version = outcome.champion_files.version if outcome.champion_files else ""
    head = ["metric", "better", f"champion v{version}" if champ else "champion", "candidate (EMA)", "Δ", "verdict",
            "candidate raw", "held-out clips", "comparable to published", "note"]
    out = ["<table border=1 cellpadding=4 cellspacing=0><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head)
           + "</tr>"]
    for name, m in outcome.metrics.items():
        row = rows_by_name.get(name)
        raw = outcome.raw.get(name)
        cells = [f"<span title='{html.escape(METRICS[name].description)}'>{html.escape(name)}</span>",
                 f"{ARROWS[m.direction]} {m.direction}",
                 _fmt(row.champion) if row else "—", _fmt(m.value), _fmt(row.delta) if row else "—",
                 MARKS[row.verdict] if row else "—", _fmt(raw.value) if raw else "—", _fmt(m.reference),
                 "yes" if m.comparable else "<b>not comparable to published numbers</b>", html.escape(m.note)]
        out.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    out.append("</table>")
    return "".join(out)


def render_html(outcome: EvalOutcome, step_dir: Path, out_dir: Path, curves: Curves) -> str:
    """The whole report as one self-contained HTML page (videos and images inlined)."""
    suite, files = outcome.suite, outcome.files
    champ = outcome.champion_files
    if champ is None:
        title = "no champion registered yet: this candidate is evaluated alone"
    else:
        again = " (re-evaluated on this suite: it was registered on suite " + html.escape(champ.suite_hash) + ")" \
            if champ.suite_hash != suite.hash else " (registered on this same suite)"
        title = f"against the champion, version {html.escape(champ.version)}{again}"
    better = sum(r.verdict == "better" for r in outcome.comparison)
    worse = sum(r.verdict == "worse" for r in outcome.comparison)
    summary = f"<p>candidate better on {better}, worse on {worse} of {len(outcome.comparison)} metrics</p>" \
        if outcome.comparison else ""
    cards = []
    for case in suite.cases:
        key = "side_by_side" if champ is not None and f"side_by_side/{case.key}" in files else "candidate"
        rel = files.get(f"{key}/{case.key}")
        if rel is None:
            continue
        mp4 = out_dir / rel
        label = "champion | candidate" if key == "side_by_side" else "candidate"
        cards.append(f"<div style='margin:8px 0'><p><b>{html.escape(case.key)}</b> ({case.task}, seed {case.seed}, "
                     f"{case.num_frames}x{case.height}x{case.width}) — {html.escape(case.prompt or '(no prompt)')} "
                     f"<i>{label}</i></p><video controls loop src='data:video/mp4;base64,{_b64(mp4)}'></video><br>"
                     f"<img src='data:image/png;base64,{_b64(mp4.with_suffix('.png'))}' height=64></div>")
    curve = files.get("loss_curves", "")
    if curve.endswith(".png"):
        curve_html = f"<img src='data:image/png;base64,{_b64(out_dir / curve)}'>"
    elif curve.endswith(".svg"):
        curve_html = (out_dir / curve).read_text()
    else:
        curve_html = "<p>no training stages given</p>"
    suite_rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(json.dumps(v, default=str))}</td></tr>"
                         for k, v in suite.description.items() if k != "cases")
    return ("<html><head><meta charset='utf-8'><title>Evaluation report</title></head><body>"
            f"<h2>Evaluation of {html.escape(str(step_dir))} (EMA weights)</h2>"
            f"<p>{title}</p><p>suite hash <code>{html.escape(suite.hash)}</code>: two reports compare only when "
            "their suite hashes match</p>"
            f"{summary}{metric_table(outcome)}"
            "<p>Figures marked <b>not comparable to published numbers</b> come from a substitute method, a tiny random "
            "model or our own feature space (docs/evaluation.md).</p>"
            f"<h3>Samples (same prompt and seed)</h3>{''.join(cards)}"
            f"<h3>Training loss, every stage</h3>{curve_html}"
            f"<h3>Suite</h3><table border=1 cellpadding=4 cellspacing=0>{suite_rows}</table>"
            "</body></html>")
