"""The champion gate: does a candidate beat the current champion on the same evaluation suite?

    decision = decide(report.metrics, report.champion_metrics, report.directions, cfg.register.gate,
                      has_champion=bool(report.champion_version))
    decision.promote, decision.reasons        # True/False, and one readable line per rule

Rules (``GateConfig``, docs/evaluation.md "The gate"): every metric listed with ``must_improve`` must be better than
the champion's by at least its ``margin``; no listed metric may be worse than the champion's by more than its
``tolerance``. Better and worse follow the metric's declared direction (higher or lower is better). Margins and
tolerances are absolute, or fractions of the champion's value when ``relative``. The first model (no champion) is
promoted by default. A must-improve metric that either side lacks fails (nothing is promoted on missing evidence);
a tolerance-only metric that is not measured on both sides is skipped and says so (the held-out flow loss of a
champion whose latent space differs, e.g. after new clips changed the dataset's normalisation, is not comparable).
No Flyte or MLflow here: ``tasks/register/task.py`` applies the decision.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List

from common.config import GateConfig


@dataclass
class GateDecision:
    promote: bool
    reasons: List[str] = field(default_factory=list)   # one line per rule, "ok: ..." or "fail: ..."

    @property
    def summary(self) -> str:
        failed = [r for r in self.reasons if r.startswith("fail")]
        return ("promoted: " if self.promote else "not promoted: ") + ("; ".join(failed) if failed else
                                                                        "; ".join(self.reasons))


def decide(candidate: Dict[str, float], champion: Dict[str, float], directions: Dict[str, str], cfg: GateConfig,
           has_champion: bool = True) -> GateDecision:
    """Apply the gate's rules to the candidate's and the champion's metrics (the same suite and seeds)."""
    if not has_champion:
        return GateDecision(True, ["ok: first model of this name: champion by default"])
    reasons: List[str] = []
    promote = True
    for rule in cfg.metrics:
        name = rule.name
        if name not in candidate or name not in champion or name not in directions:
            if rule.must_improve:   # nothing is promoted on missing evidence
                reasons.append(f"fail: {name} is missing from the candidate's or the champion's report")
                promote = False
            else:                   # not comparable (e.g. a flow loss in another latent space): cannot regress
                reasons.append(f"skip: {name} is not measured on both (not comparable here)")
            continue
        cand, champ = float(candidate[name]), float(champion[name])
        if not (math.isfinite(cand) and math.isfinite(champ)):
            reasons.append(f"fail: {name} is not finite (candidate {cand}, champion {champ})")
            promote = False
            continue
        sign = 1.0 if directions[name] == "higher" else -1.0
        gain = sign * (cand - champ)                        # > 0: the candidate is better
        scale = abs(champ) if cfg.relative else 1.0
        margin, tolerance = rule.margin * scale, rule.tolerance * scale
        unit = f" ({'relative' if cfg.relative else 'absolute'})"
        if rule.must_improve and (gain <= 0 or gain < margin):   # strictly better, by at least the margin
            reasons.append(f"fail: {name} {cand:.6g} vs champion {champ:.6g}: must improve by >= {rule.margin:g}"
                           f"{unit}, {directions[name]} is better")
            promote = False
        elif gain < -tolerance:
            reasons.append(f"fail: {name} {cand:.6g} vs champion {champ:.6g}: regresses by {-gain:.3g} > "
                           f"tolerance {tolerance:.3g}")
            promote = False
        else:
            reasons.append(f"ok: {name} {cand:.6g} vs champion {champ:.6g}")
    return GateDecision(promote, reasons)
