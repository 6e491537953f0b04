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
    ({"heldout_flow_loss": 0.90, "temporal_flickering": 0.90}, True, []),   # a tolerance-only metric missing: skip
    ({"temporal_flickering": 0.90, "frechet_distance": 9.0}, False, ["heldout_flow_loss"]),   # must-improve missing
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


def test_promote_by_hand_rollback_and_history(tmp_path, monkeypatch, capsys):
    """python -m tasks.register.promote: by hand, back, and the history, through a real MLflow registry."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from tasks.register import promote

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    mlflow.set_tracking_uri(uri)
    client.create_registered_model("m")
    exp = client.create_experiment("e")
    for _ in range(3):
        with mlflow.start_run(experiment_id=exp) as run:
            client.create_model_version("m", source=f"runs:/{run.info.run_id}/x", run_id=run.info.run_id)
    assert promote.main(["m", "--show"]) == 0 and "m@champion: none" in capsys.readouterr().out
    assert promote.promote(client, "m", "1", "first model: champion by default") is None
    assert promote.promote(client, "m", "2", "gate: promoted") == "1"
    assert promote.main(["m", "3"]) == 0 and "(was 2)" in capsys.readouterr().out
    assert promote.history(client, "m") == ["3", "2", "1"]
    assert client.get_model_version("m", "3").tags["gate.decision"] == "promoted by hand"
    assert promote.main(["m", "--rollback"]) == 0 and "-> version 2" in capsys.readouterr().out
    assert promote.rollback(client, "m") == "1"
    assert promote.main(["m", "--rollback"]) == 2 and "was the first champion" in capsys.readouterr().err
    assert promote.main(["m", "9"]) == 2
