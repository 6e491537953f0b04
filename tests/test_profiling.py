"""trainer.profiling: the VGEN_PROFILE_STEPS window, its errors, and what a profiled window writes (CPU, in process).
The same through the real launch path, on both ranks of a DP=2 stage: tests/test_trainer_dist.py."""
from __future__ import annotations

import json

import pytest
import torch

from trainer.profiling import MAX_STEPS, PROFILE_ENV, StepProfiler, parse_steps


@pytest.mark.parametrize("spec, steps", [("", None), ("  ", None), ("6:2", range(6, 8)), ("1:1", range(1, 2))])
def test_parse_steps(spec, steps):
    assert parse_steps(spec) == steps


@pytest.mark.parametrize("spec", ["6", "6:", ":2", "0:2", "6:0", "a:b", "6:2:1", "-1:3", f"1:{MAX_STEPS + 1}"])
def test_parse_steps_refuses_with_the_expected_form(spec):
    with pytest.raises(ValueError, match=r"expected START:COUNT .* e\.g\. VGEN_PROFILE_STEPS=6:2"):
        parse_steps(spec)


def test_run_stage_checks_the_window_before_launching(tmp_path, monkeypatch):
    from common.config import LaunchConfig, StageConfig
    from models.config import DiTConfig
    from trainer.job import StageJob
    from trainer.launch import run_stage

    job = StageJob(stage=StageConfig(name="s"), dit=DiTConfig(), latents_dir=str(tmp_path), output_dir=str(tmp_path))
    monkeypatch.setenv(PROFILE_ENV, "6")
    with pytest.raises(ValueError, match="expected START:COUNT"):   # not the missing job file's error
        run_stage(job, tmp_path / "missing.json", LaunchConfig(), tmp_path / "logs")


def _steps(prof: StepProfiler, first: int, last: int) -> None:
    a = torch.randn(64, 64)
    for step in range(first, last + 1):
        prof.begin(step)
        (a @ a).relu_().sum()
        prof.end(step)


def test_window_writes_trace_and_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(PROFILE_ENV, "3:2")
    prof = StepProfiler.from_env(tmp_path, 0, torch.device("cpu"), first_step=1, last_step=5)
    _steps(prof, 1, 5)
    trace = json.loads((tmp_path / "profile" / "rank00000.trace.json").read_text())
    names = [e.get("name") for e in trace["traceEvents"]]
    assert names.count("aten::mm") == 2 and names.count("aten::relu_") == 2   # steps 3 and 4, no others
    assert {n for n in names if n and n.startswith("vgen step")} == {"vgen step 3", "vgen step 4"}
    table = (tmp_path / "profile" / "rank00000.txt").read_text()
    assert "Self CPU" in table and "aten::mm" in table
    out = capsys.readouterr().out
    assert out.startswith("profile: steps 3-4 on every rank ->") and "aten::mm" in out


def test_other_ranks_write_without_printing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(PROFILE_ENV, "1:1")
    _steps(StepProfiler.from_env(tmp_path, 3, torch.device("cpu"), first_step=1, last_step=2), 1, 2)
    assert (tmp_path / "profile" / "rank00003.trace.json").is_file()
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("spec, first, last", [("5:2", 5, 6), ("1:10", 1, 10)])
def test_window_at_the_run_s_first_and_last_steps(tmp_path, monkeypatch, spec, first, last):
    monkeypatch.setenv(PROFILE_ENV, spec)
    _steps(StepProfiler.from_env(tmp_path, 0, torch.device("cpu"), first_step=first, last_step=last), first, last)
    names = [e.get("name") for e in json.loads((tmp_path / "profile" / "rank00000.trace.json").read_text())
             ["traceEvents"]]
    assert names.count("aten::mm") == last - first + 1


def test_a_failure_inside_the_window_writes_what_was_recorded(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(PROFILE_ENV, "2:3")
    prof = StepProfiler.from_env(tmp_path, 0, torch.device("cpu"), first_step=1, last_step=5)
    with pytest.raises(RuntimeError, match="step 3 failed"):
        try:
            _steps(prof, 1, 2)                      # steps 1 and 2; the window is open
            prof.begin(3)
            raise RuntimeError("step 3 failed")
        finally:
            prof.close()                            # as trainer.train's finally does
    names = [e.get("name") for e in json.loads((tmp_path / "profile" / "rank00000.trace.json").read_text())
             ["traceEvents"]]
    assert names.count("aten::mm") == 1 and "vgen step 3" in names
    assert "(partial: the stage stopped inside the window)" in capsys.readouterr().out
    assert not torch.autograd.profiler._is_profiler_enabled


def test_a_complete_stage_says_it_makes_no_step(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(PROFILE_ENV, "5:2")
    prof = StepProfiler.from_env(tmp_path, 0, torch.device("cpu"), first_step=31, last_step=30)
    assert prof.steps is None
    assert "already complete at step 30" in capsys.readouterr().out


@pytest.mark.parametrize("spec, first, last", [("2:2", 5, 10), ("9:3", 1, 10)])
def test_window_outside_the_run_is_announced_and_records_nothing(tmp_path, monkeypatch, capsys, spec, first, last):
    monkeypatch.setenv(PROFILE_ENV, spec)
    prof = StepProfiler.from_env(tmp_path, 0, torch.device("cpu"), first_step=first, last_step=last)
    _steps(prof, first, last)
    assert not (tmp_path / "profile").exists()
    assert f"but this run makes steps {first}-{last}: nothing is profiled" in capsys.readouterr().out


def test_no_variable_no_profile(tmp_path, monkeypatch):
    monkeypatch.delenv(PROFILE_ENV, raising=False)
    prof = StepProfiler.from_env(tmp_path, 0, torch.device("cpu"), first_step=1, last_step=3)
    _steps(prof, 1, 3)
    assert prof.steps is None and not (tmp_path / "profile").exists()
