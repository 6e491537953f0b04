"""Run one stage through TorchX and watch it: the bridge between the Flyte task and the torchrun workers.

``run_stage`` builds the ``trainer.component.stage_app`` AppDef for the stage's layout, submits it with TorchX's
programmatic runner (``local_cwd`` on this machine, ``kubernetes`` = Volcano on a cluster), polls its status, streams
the new lines of every replica's combined log to ``progress`` while it runs (the loss of every step), stops it after
``launch.timeout_s`` and raises ``RuntimeError`` with the last 40 log lines if it does not succeed. The "launched"
and "finished" lines name the stage's parallel layout (``layout_summary``: ``tp=2 cp=1 dp=4 sp=off pp=1``).

For local_cwd, logs are at ``log_dir/torchx/<app_id>/train/<replica>/{stdout,stderr,combined}.log`` (the runner has
to be this process: ``torchx status`` from another one cannot see a local app). On kubernetes the runner reads pod
logs through the API instead, and job_path / output_dir must be on a volume every pod mounts.

On kubernetes the request is built as TorchX documents for scheduler features its AppDef does not express:
``runner.dryrun`` renders the Volcano Job (``app_to_resource``: one pod per replica, the shared volume of
``train.launch.volume_claim`` from the role's ``specs.VolumeMount``), ``kubernetes_request`` then adds to every pod's
container the credentials of ``train.launch.secret_env`` as ``secretKeyRef`` variables (TorchX's env takes plain
values only) and the MLflow endpoint (``MLFLOW_TRACKING_URI``, never with a user:password in it), puts the GPU type
``train.launch.accelerator`` in every pod's nodeSelector (under ``train.launch.accelerator_label``), and
``runner.schedule`` submits it. No secret value is in the job file, the config or the Volcano job.

``dryrun_kubernetes`` renders that same Volcano Job offline (no cluster, no image build) for review and tests.
"""
from __future__ import annotations

import os
import random
import re
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

from common.config import LaunchConfig
from trainer.component import ROLE, stage_app
from trainer.job import StageJob, check_no_credentials

_REPO_ROOT = Path(__file__).resolve().parents[1]
_TAIL = 40
_KEEP = 2000          # lines of history kept to pick the workers' last output from
_LAUNCHER_FAILED = "failed (exitcode"   # torchrun's line before its own traceback and failure summary


# Rendezvous ports are drawn at random below the kernel's ephemeral range: a port the kernel hands out (bind to 0)
# can be handed out again at once to another launcher on this host, whose torchrun then hosts its store there and
# ours connects to it (a CI run saw "Connection reset by peer" and a 60 s rendezvous timeout), and outgoing
# connections take ports from the ephemeral range while a chosen port waits for torchrun to bind it.
PORT_FLOOR = 10000
PORT_TRIES = 64


def free_port(rng: random.Random | None = None) -> int:
    """A TCP port free on this host now, at random in [PORT_FLOOR, the ephemeral range's start); the kernel's choice
    when that range is empty or no port in 64 tries is free."""
    rng = rng or random.Random()
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768   # Linux's default ephemeral range starts here
    for _ in range(PORT_TRIES if low > PORT_FLOOR else 0):
        port = rng.randrange(PORT_FLOOR, low)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def app_name(stage_name: str) -> str:
    """A Kubernetes-safe application name for a stage (``stage1_dp2`` -> ``train-stage1-dp2``)."""
    return ("train-" + re.sub(r"[^a-z0-9]+", "-", stage_name.lower()).strip("-"))[:52].rstrip("-")


def layout_summary(stage) -> str:
    """The parallel layout of a stage for the progress lines: ``tp=2 cp=1 dp=4 sp=on pp=1`` (sp: sequence
    parallelism, only in effect with tp > 1; pp: pipeline stages), plus ``micro_batches=M`` when M > 1 (gradient
    accumulation / pipeline micro-batches)."""
    sp = bool(getattr(stage, "sequence_parallel", False)) and stage.tensor_parallel > 1
    m = getattr(stage, "micro_batches", 1)
    return (f"tp={stage.tensor_parallel} cp={getattr(stage, 'context_parallel', 1)} dp={stage.data_parallel} "
            f"sp={'on' if sp else 'off'} pp={getattr(stage, 'pipeline_parallel', 1)}"
            + (f" micro_batches={m}" if m > 1 else ""))


def _app(job: StageJob, job_path: Path, launch: LaunchConfig, nnodes: int, nproc_per_node: int):
    if launch.scheduler == "local_cwd":   # this venv's interpreter; the repo on PYTHONPATH whatever the cwd is
        pythonpath = os.pathsep.join(filter(None, [str(_REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
        return stage_app(str(job_path), nnodes=nnodes, nproc_per_node=nproc_per_node, python=sys.executable,
                         image=str(_REPO_ROOT), rdzv_port=free_port(), cpu=launch.cpu, gpu=launch.gpu,
                         memMB=launch.memory_mb, env={"PYTHONPATH": pythonpath}, name=app_name(job.stage.name))
    return _k8s_app(str(job_path), launch, nnodes, nproc_per_node, app_name(job.stage.name), job.mlflow_tracking_uri)


def _k8s_app(job_path: str, launch: LaunchConfig, nnodes: int, nproc_per_node: int, name: str, mlflow_uri: str):
    if not launch.image:
        raise ValueError("train.launch.image is empty: the Flyte pipeline fills in the CUDA image of "
                         "containers/images.py (python -c 'from containers.images import image_for; "
                         "print(image_for(\"cuda\"))'); outside it, give that name in train.launch.image")
    check_no_credentials(mlflow_uri, "the MLflow tracking URI")
    env = {"MLFLOW_TRACKING_URI": mlflow_uri} if mlflow_uri else {}
    if launch.s3_endpoint_url:   # MinIO: boto3 (AWS_ENDPOINT_URL) and MLflow's artifact client read these
        env.update(AWS_ENDPOINT_URL=launch.s3_endpoint_url, MLFLOW_S3_ENDPOINT_URL=launch.s3_endpoint_url)
    return stage_app(job_path, nnodes=nnodes, nproc_per_node=nproc_per_node, image=launch.image, cpu=launch.cpu,
                     gpu=launch.gpu, memMB=launch.memory_mb, name=name, env=env, volume_claim=launch.volume_claim,
                     mount_path=launch.mount_path)


def kubernetes_request(runner, app, launch: LaunchConfig):
    """TorchX's dry run of ``app`` on the kubernetes scheduler, with every pod's container given the
    ``train.launch.secret_env`` variables as ``secretKeyRef``s and every pod the nodeSelector
    ``{train.launch.accelerator_label: train.launch.accelerator}`` when an accelerator is set; ``runner.schedule``
    submits the result."""
    from kubernetes.client.models import V1EnvVar, V1EnvVarSource, V1SecretKeySelector

    info = runner.dryrun(app, "kubernetes", cfg=_cfg(launch, Path(".")), workspace=None)
    for task in info.request.resource["spec"]["tasks"]:
        if launch.accelerator:   # TorchX's AppDef selects nodes by instance type only, not by GPU type
            pod = task["template"].spec
            pod.node_selector = {**(pod.node_selector or {}), launch.accelerator_label: launch.accelerator}
        for container in task["template"].spec.containers:
            taken = {e.name for e in container.env or []}
            clash = taken & {s.env for s in launch.secret_env}
            if clash:
                raise ValueError(f"train.launch.secret_env sets {sorted(clash)}, which the launcher already sets "
                                 "as plain values: remove them from secret_env")
            container.env = list(container.env or []) + [
                V1EnvVar(name=s.env, value_from=V1EnvVarSource(
                    secret_key_ref=V1SecretKeySelector(name=s.secret, key=s.key, optional=False)))
                for s in launch.secret_env]
    return info


def _cfg(launch: LaunchConfig, log_dir: Path) -> Dict[str, str]:
    if launch.scheduler == "local_cwd":
        return {"log_dir": str(log_dir)}
    return {"queue": launch.queue, "namespace": launch.namespace}


class _LogTail:
    """Reads only the lines appended since the last call to each replica's combined.log (local_cwd)."""

    def __init__(self, app_dir: Path):
        self.app_dir = app_dir
        self.offsets: Dict[Path, int] = {}
        self.partial: Dict[Path, str] = {}
        self.history: List[str] = []

    def new_lines(self) -> List[str]:
        lines = []
        for path in sorted(self.app_dir.glob(f"{ROLE}/*/combined.log")):
            with open(path, "rb") as f:
                f.seek(self.offsets.get(path, 0))
                chunk = f.read()
            self.offsets[path] = self.offsets.get(path, 0) + len(chunk)
            text = self.partial.pop(path, "") + chunk.decode("utf-8", errors="replace")
            *complete, rest = text.split("\n")
            if rest:
                self.partial[path] = rest
            lines += complete
        self.history = (self.history + lines)[-_KEEP:]
        return lines

    def flush(self) -> List[str]:
        lines = self.new_lines() + [self.partial.pop(p) for p in list(self.partial)]
        self.history = (self.history + lines)[-_KEEP:]
        return lines

    def last_lines(self) -> str:
        """The workers' last 40 lines: up to torchrun's failure line, whose own traceback would hide them."""
        hist = self.history
        cut = next((i for i, line in enumerate(hist) if _LAUNCHER_FAILED in line), None)
        return "\n".join(hist[-_TAIL:] if cut is None else hist[max(0, cut - _TAIL + 1):cut + 1])


def run_stage(job: StageJob, job_path: Path, launch: LaunchConfig, log_dir: Path,
              progress: Callable[[str], None] = print, poll_s: float = 0.5) -> None:
    """Launch the stage on ``launch.scheduler`` and block until it succeeds (or raise RuntimeError)."""
    from torchx.runner import get_runner
    from torchx.specs import AppState, parse_app_handle

    from trainer.profiling import PROFILE_ENV, parse_steps

    parse_steps(os.environ.get(PROFILE_ENV, ""))   # a malformed profile window fails here, not after the model is built
    stage = job.stage
    job_path, log_dir = Path(job_path).resolve(), Path(log_dir).resolve()
    if not job_path.is_file():
        raise FileNotFoundError(f"job file not found: {job_path} (write it with StageJob.write first)")
    app = _app(job, job_path, launch, stage.nnodes, stage.nproc_per_node)
    log_dir.mkdir(parents=True, exist_ok=True)
    with get_runner() as runner:
        if launch.scheduler == "kubernetes":
            handle = runner.schedule(kubernetes_request(runner, app, launch))
        else:
            handle = runner.run(app, scheduler=launch.scheduler, cfg=_cfg(launch, log_dir))
        progress(f"launched {handle} ({stage.nnodes}x{stage.nproc_per_node} processes, {layout_summary(stage)})")
        app_id = parse_app_handle(handle).app_id
        tail = _LogTail(log_dir / "torchx" / app_id) if launch.scheduler == "local_cwd" else None
        deadline = time.monotonic() + launch.timeout_s
        while True:
            status = runner.status(handle)
            for line in tail.new_lines() if tail else []:
                progress(line)
            if status is not None and status.is_terminal():
                break
            if time.monotonic() > deadline:
                last = _last_lines(runner, handle, tail)   # before the shutdown noise of the cancel
                runner.cancel(handle)
                raise RuntimeError(f"stage '{stage.name}' exceeded train.launch.timeout_s={launch.timeout_s}s and "
                                   f"was stopped ({handle}); last log lines:\n{last}")
            time.sleep(poll_s)
        for line in tail.flush() if tail else []:
            progress(line)
        state = status.state if status is not None else AppState.UNKNOWN
        if state != AppState.SUCCEEDED:
            raise RuntimeError(f"stage '{stage.name}' ended {state.name} ({handle}); last log lines:\n"
                               + _last_lines(runner, handle, tail))
        progress(f"stage '{stage.name}' finished ({handle}; {layout_summary(stage)})")


def _last_lines(runner, handle: str, tail: _LogTail | None) -> str:
    if tail is not None:
        tail.flush()
        return tail.last_lines()
    try:
        return "\n".join(list(runner.log_lines(handle, ROLE, k=0))[-_TAIL:])
    except Exception as e:   # the cluster may already have removed the pods
        return f"(could not read the logs: {e})"


def dryrun_kubernetes(job_path: str | Path, launch: LaunchConfig, nnodes: int, nproc_per_node: int,
                      mlflow_tracking_uri: str = "") -> Dict[str, Any]:
    """The Volcano ``batch.volcano.sh/v1alpha1`` Job that ``run_stage`` would submit, as a plain dict (no cluster)."""
    from torchx.runner import get_runner
    from torchx.schedulers.kubernetes_scheduler import sanitize_for_serialization

    app = _k8s_app(str(job_path), launch, nnodes, nproc_per_node, "train-stage", mlflow_tracking_uri)
    with get_runner() as runner:
        info = kubernetes_request(runner, app, launch)
    out = sanitize_for_serialization(info.request.resource)
    assert isinstance(out, dict)
    return out
