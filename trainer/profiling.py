"""A few training steps under ``torch.profiler`` on every rank: where a step's time goes, without changing the run.

    VGEN_PROFILE_STEPS=6:2 python -m trainer.train --job job.json     # steps 6 and 7, numbered as in metrics.jsonl

writes, in the stage's output folder::

    profile/rank00000.trace.json   # the timeline (CPU ops, and CUDA kernels on a GPU): open in ui.perfetto.dev
    profile/rank00000.txt          # the ops by self time (self device time on CUDA), TABLE_ROWS rows

and rank 0 prints the top PRINT_ROWS rows. Each step of the window is a ``vgen step N`` range in the timeline. The
CPU side is the training thread's: the micro-batches built by the prefetch thread and the checkpoint writer's thread
are not recorded (on a GPU their copies and kernels appear without a CPU caller).

The local launcher (TorchX ``local_cwd``: ``make demo``, a local ``pyflyte run``) hands its caller's environment to
every rank, so ``VGEN_PROFILE_STEPS=6:2 pyflyte run ...`` profiles each stage of a local pipeline that actually trains
(a cached stage, or one already complete in its output folder, runs no step: it says so and records nothing); a
Kubernetes launch does not pass it (its pods get only the component's environment). It is an environment variable,
not a stage field, on purpose: looking at a run must not change its configuration hash. ``trainer.launch.run_stage``
checks its form before launching.

The window's steps are slower than the others (the profiler records every op), and they are logged as usual: leave
them out when reading step times (with several ranks, also the step after, which absorbs the others' file writing). A
window that the stage does not reach (a resumed stage past it, or a stage with fewer steps) is announced and records
nothing. A stage that fails inside the window (an exception) writes what was recorded up to then (``close``); one
that is killed writes nothing.

    from trainer.profiling import StepProfiler
    prof = StepProfiler.from_env(out_dir, rank, device, first_step=start + 1, last_step=stage.steps)
    for step in range(start + 1, stage.steps + 1):
        prof.begin(step)
        ...                                   # the step, its metrics and its checkpoint
        prof.end(step)
    prof.close()                              # also on failure: stops a window still open
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch

PROFILE_ENV = "VGEN_PROFILE_STEPS"   # "START:COUNT": COUNT steps from step START (1-based, as in metrics.jsonl)
TABLE_ROWS = 40    # rows of each rank's text table: enough to reach past the GEMMs and attention to the small ops
PRINT_ROWS = 12    # rows rank 0 prints in the stage's log
MAX_STEPS = 10     # the profiler keeps every event of the window in host memory: a few steps say where the time goes


def parse_steps(spec: str) -> Optional[range]:
    """The steps ``VGEN_PROFILE_STEPS`` names: "" -> None (no profiling); "6:2" -> range(6, 8). Raises ValueError
    with the expected form for anything else."""
    spec = spec.strip()
    if not spec:
        return None
    start, sep, count = spec.partition(":")
    try:
        first, n = int(start), int(count)
    except ValueError:
        first, n = 0, 0
    if not sep or first < 1 or not 1 <= n <= MAX_STEPS:
        raise ValueError(f"{PROFILE_ENV}={spec!r}: expected START:COUNT with START >= 1 (a step number as in "
                         f"metrics.jsonl) and 1 <= COUNT <= {MAX_STEPS} (the profiler holds every event in memory), "
                         f"e.g. {PROFILE_ENV}=6:2 for steps 6 and 7")
    return range(first, first + n)


class StepProfiler:
    """Profiles the steps of ``steps`` (module docstring); every method is a no-op when ``steps`` is None."""

    def __init__(self, steps: Optional[range], out_dir: Path, rank: int, device: torch.device) -> None:
        self.steps, self.out_dir, self.rank, self.device = steps, Path(out_dir), rank, device
        self._prof: Any = None    # the torch.profiler.profile while the window records
        self._range: Any = None   # the open step's record_function

    @classmethod
    def from_env(cls, out_dir: Path, rank: int, device: torch.device, first_step: int,
                 last_step: int) -> "StepProfiler":
        """From ``$VGEN_PROFILE_STEPS``, for a stage that runs steps first_step..last_step (1-based, inclusive)."""
        steps = parse_steps(os.environ.get(PROFILE_ENV, ""))
        if steps is not None and first_step > last_step:
            if rank == 0:
                print(f"profile: {PROFILE_ENV} is set, but this stage is already complete at step {last_step} in its "
                      "output folder and makes no step: nothing is profiled (train a new stage, or clear that "
                      "folder)", flush=True)
            steps = None
        elif steps is not None and (steps.start < first_step or steps.stop - 1 > last_step):
            if rank == 0:
                print(f"profile: {PROFILE_ENV} names steps {steps.start}-{steps.stop - 1}, but this run makes steps "
                      f"{first_step}-{last_step}: nothing is profiled (choose steps inside that range)", flush=True)
            steps = None
        return cls(steps, out_dir, rank, device)

    def begin(self, step: int) -> None:
        """Before step ``step``: starts recording at the window's first step, and opens the step's ``vgen step N``
        range in the timeline for every step of the window."""
        if self.steps is None or step not in self.steps:
            return
        from torch.profiler import ProfilerActivity, profile, record_function

        if step == self.steps.start:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self._prof = profile(activities=activities)
            self._prof.__enter__()
        if self._prof is not None:
            self._range = record_function(f"vgen step {step}")
            self._range.__enter__()

    def end(self, step: int) -> None:
        """After step ``step`` (its metrics and checkpoint included): at the window's last step, stops recording and
        writes this rank's trace and table."""
        self._close_range()
        if self._prof is not None and self.steps is not None and step == self.steps.stop - 1:
            self._write(partial=False)

    def close(self) -> None:
        """After the stage's last step, or on its failure: a window still open is stopped and what it recorded is
        written (a failed step's partial trace helps find why); a second failure here is reported, not raised."""
        if self._prof is None:
            return
        try:
            self._write(partial=True)
        except Exception as e:  # noqa: BLE001 - the stage's own error, if any, is the one to raise
            print(f"profile: rank {self.rank} could not write its partial window: {type(e).__name__}: {e}",
                  flush=True)

    def _close_range(self) -> None:
        if self._range is not None:
            self._range.__exit__(None, None, None)
            self._range = None

    def _write(self, partial: bool) -> None:
        self._close_range()   # a failed step's range, when close() writes
        prof, self._prof = self._prof, None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        prof.__exit__(None, None, None)
        folder = self.out_dir / "profile"
        folder.mkdir(parents=True, exist_ok=True)
        trace = folder / f"rank{self.rank:05d}.trace.json"
        prof.export_chrome_trace(str(trace))
        sort = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        averages = prof.key_averages()
        (folder / f"rank{self.rank:05d}.txt").write_text(averages.table(sort_by=sort, row_limit=TABLE_ROWS) + "\n")
        if self.rank == 0:
            assert self.steps is not None
            cut = " (partial: the stage stopped inside the window)" if partial else ""
            print(f"profile: steps {self.steps.start}-{self.steps.stop - 1}{cut} on every rank -> {folder} (trace: "
                  f"open {trace.name} in ui.perfetto.dev); rank 0 by {sort}:\n"
                  f"{averages.table(sort_by=sort, row_limit=PRINT_ROWS)}", flush=True)
