"""The champion gate (tasks/register/gate.py): promote only a candidate that beats the champion by the margins and
regresses nothing beyond its tolerance; the first model is champion by default."""
from __future__ import annotations

import pytest

from common.config import GateConfig, GateMetric
from tasks.register.gate import decide

DIRS = {"heldout_flow_loss": "lower", "temporal_flickering": "higher", "frechet_distance": "lower"}
CHAMP = {"heldout_flow_loss": 1.00, "temporal_flickering": 0.90, "frechet_distance": 10.0}
CFG = GateConfig(metrics=[GateMetric("heldout_flow_loss", must_improve=True, margin=0.01),
                          GateMetric("temporal_flickering", tolerance=0.02),
                          GateMetric("frechet_distance", tolerance=0.10)], relative=True)


def test_first_model_is_champion_by_default():
    d = decide({"heldout_flow_loss": 5.0}, {}, DIRS, CFG, has_champion=False)
    assert d.promote and "first model" in d.reasons[0]


@pytest.mark.parametrize("cand, promote, failing", [
    ({"heldout_flow_loss": 0.95, "temporal_flickering": 0.89, "frechet_distance": 10.5}, True, []),
    ({"heldout_flow_loss": 0.995, "temporal_flickering": 0.90, "frechet_distance": 10.0}, False,
     ["heldout_flow_loss"]),                                   # better, but by less than the 1 % margin
    ({"heldout_flow_loss": 1.00, "temporal_flickering": 0.95, "frechet_distance": 9.0}, False,
     ["heldout_flow_loss"]),                                   # equal is not better
    ({"heldout_flow_loss": 0.90, "temporal_flickering": 0.85, "frechet_distance": 10.0}, False,
     ["temporal_flickering"]),                                 # regresses 5.6 % > 2 %
    ({"heldout_flow_loss": 0.90, "temporal_flickering": 0.90, "frechet_distance": 12.0}, False,
     ["frechet_distance"]),                                    # lower is better: 20 % worse > 10 %
    ({"heldout_flow_loss": 0.90, "temporal_flickering": 0.90}, False, ["frechet_distance"]),   # missing evidence
])
def test_gate_rules(cand, promote, failing):
    d = decide(cand, CHAMP, DIRS, CFG)
    assert d.promote is promote, d.reasons
    assert sorted(r.split()[1] for r in d.reasons if r.startswith("fail")) == failing
    assert len(d.reasons) == 3 and d.summary.startswith("promoted" if promote else "not promoted")


def test_absolute_margins_and_config_errors():
    cfg = GateConfig(metrics=[GateMetric("heldout_flow_loss", must_improve=True, margin=0.2)], relative=False)
    assert decide({"heldout_flow_loss": 0.75}, CHAMP, DIRS, cfg).promote
    assert not decide({"heldout_flow_loss": 0.85}, CHAMP, DIRS, cfg).promote
    with pytest.raises(ValueError, match="listed twice"):
        GateConfig(metrics=[GateMetric("a"), GateMetric("a")])
