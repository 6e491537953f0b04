"""Multi-node training without a cluster: a DP=2 stage with ``nnodes: 2`` runs as two torchrun agents on this
machine, one worker each, through the platform's own launch path (run_stage -> ``trainer.component.stage_app`` with
its multi-node rendezvous endpoint ``${TORCHX_RANK0_HOST:=localhost}:<free port>`` -> TorchX local_cwd, one replica
per node -> torchrun ``--nnodes 2 --nproc_per_node 1`` with c10d, which gives the agents node ranks 0 and 1).

Checked: its per-step losses and grad norms, and its final model and EMA weights, are bitwise equal to the same
stage on one node with two processes (measured: bitwise, 5 of 5 steps; both runs use one thread per worker). The
only difference between the two is where torchrun draws the node boundary, so the test isolates the multi-node
rendezvous; what stays unexercised is a network between the nodes (both agents talk over localhost).
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from helpers import LAUNCH, TINY_DIT, assert_equal_step_folders, run_stage_job, stage_config, stage_metrics
from helpers import write_latent_dataset as _latents
from models.config import DiTConfig
from trainer.job import StageJob
from trainer.launch import run_stage

STEPS = 5


@pytest.mark.timeout(120)
def test_two_nodes_match_one_node_bitwise(tmp_path: Path) -> None:
    latents = _latents(tmp_path / "latents", n_clips=4)
    one, _ = run_stage_job(tmp_path, "one", stage_config(name="one", steps=STEPS, checkpoint_interval=STEPS), latents)

    stage = stage_config(name="two", steps=STEPS, checkpoint_interval=STEPS, nnodes=2)
    assert (stage.nnodes, stage.nproc_per_node, stage.data_parallel) == (2, 1, 2)
    job = StageJob(stage=stage, dit=DiTConfig(**TINY_DIT), latents_dir=str(latents), output_dir=str(tmp_path / "two"),
                   config_hash="two")
    lines: list[str] = []
    # one CPU per node: one thread per worker, as in the single-node run (cpu 2 shared by 2 workers)
    run_stage(job, job.write(tmp_path / "two.job.json"), dataclasses.replace(LAUNCH, cpu=1),
              log_dir=tmp_path / "two-logs", progress=lines.append)
    assert "(2x1 processes, tp=1 cp=1 dp=2" in lines[0], lines[0]
    assert any(line.startswith("stage=two world=2 ") for line in lines), lines[:3]

    # two replicas (nodes) of the role; rank 0's step lines come from exactly one of them, so the two workers sat on
    # different agents: with one process per node, global rank = node rank, assigned by the c10d rendezvous
    app_id = re.search(r"local_cwd://torchx/(\S+)", lines[0]).group(1)   # type: ignore[union-attr]
    logs = sorted((tmp_path / "two-logs" / "torchx" / app_id / "train").glob("*/combined.log"))
    assert [p.parent.name for p in logs] == ["0", "1"]
    steps_per_node = [sum(line.startswith("step=") for line in p.read_text().splitlines()) for p in logs]
    assert sorted(steps_per_node) == [0, STEPS], steps_per_node

    a, b = stage_metrics(one), stage_metrics(tmp_path / "two")
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))
    assert [(r["loss"], r["grad_norm"]) for r in b] == [(r["loss"], r["grad_norm"]) for r in a]
    assert_equal_step_folders(one / f"step_{STEPS:08d}", tmp_path / "two" / f"step_{STEPS:08d}")


def test_rendezvous_ports_are_drawn_below_the_ephemeral_range() -> None:
    """free_port: a port free now, below the kernel's ephemeral range (where bind-to-0 ports and outgoing connections
    come from, so two launchers on a host do not get the same one); a taken port is skipped."""
    import random
    import socket

    from trainer.launch import PORT_FLOOR, free_port

    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    first = free_port(random.Random(7))
    assert PORT_FLOOR <= first < low
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", first))
        taken.listen()
        second = free_port(random.Random(7))   # the same draws: the first is taken now
    assert PORT_FLOOR <= second < low and second != first
