"""The services of a remote run, on this machine: an S3 endpoint and an MLflow tracking server (``make services``).

    python -m common.services start [--folder runs/services] [--s3-port 9000] [--mlflow-port 5000]
    python -m common.services env        # the export lines for a shell: eval "$(python -m common.services env)"
    python -m common.services status
    python -m common.services stop

``start`` runs, in the background (own process group, pid file and log under the folder):
- ``s3``: moto's S3 server (``moto_server``), the endpoint the tests use; it keeps objects in memory, so ``stop``
  empties it. On a cluster this is MinIO (README, "Object storage and services"): same protocol, same client.
- ``mlflow``: ``mlflow server`` with a SQLite backend (``<folder>/mlflow.db``; PostgreSQL on a cluster) and the
  artifacts on the S3 endpoint (``--artifacts-destination s3://mlflow/artifacts``, reached with
  MLFLOW_S3_ENDPOINT_URL), proxied by the server, so clients need no S3 credentials to log artifacts. Its GenAI job
  runner is off (MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false: 7 worker processes this project does not use).
It creates the buckets ``mlflow`` (MLflow's artifacts) and ``vgen`` (run outputs: ``tracking.artifact_uri:
s3://vgen/<run>``), waits until both answer, and prints their URLs and the variables to export. The credentials are
the AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY of the environment, else a local pair (moto accepts any); they are
passed to the servers in their environment only, never written to the state file or a log.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional

FOLDER = "runs/services"
LOCAL_KEY, LOCAL_SECRET = "vgen-local", "vgen-local-secret"
BUCKETS = ("mlflow", "vgen")
STATE = "services.json"   # ports and URLs, no credentials


def _bin(name: str) -> str:
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


def credentials() -> Dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": os.environ.get("AWS_ACCESS_KEY_ID") or LOCAL_KEY,
            "AWS_SECRET_ACCESS_KEY": os.environ.get("AWS_SECRET_ACCESS_KEY") or LOCAL_SECRET}


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pid(folder: Path, name: str) -> Optional[int]:
    p = folder / f"{name}.pid"
    if not p.is_file():
        return None
    try:
        pid = int(p.read_text().strip())
    except ValueError:
        return None
    return pid if _alive(pid) else None


def _wait_http(url: str, timeout_s: float, proc: subprocess.Popen, log: Path, name: str) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with code {proc.returncode} while starting; its log {log} ends:\n"
                               + log.read_text(errors="replace")[-1500:])
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status < 500:
                    return time.monotonic() - t0
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{name} did not answer {url} within {timeout_s:g} s; see {log}")


def launch(folder: Path, name: str, cmd: List[str], env: Dict[str, str], health_url: str,
           timeout_s: float = 90.0) -> float:
    """Start one service in its own process group (pid file ``<name>.pid``, log ``<name>.log``, appended) and wait
    until ``health_url`` answers; returns the seconds it took."""
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / f"{name}.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **env}, start_new_session=True)
    (folder / f"{name}.pid").write_text(f"{proc.pid}\n")
    try:
        return _wait_http(health_url, timeout_s, proc, log, name)
    except BaseException:
        stop_one(folder, name)
        raise


def stop_one(folder: Path, name: str, timeout_s: float = 20.0) -> bool:
    """Stop a service started by ``launch`` (its whole process group); False when it was not running."""
    pid = _pid(folder, name)
    (folder / f"{name}.pid").unlink(missing_ok=True)
    if pid is None:
        return False
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout_s
    while _alive(pid) and time.monotonic() < deadline:
        try:   # reap it when it is our child (tests); otherwise it is reaped by init
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.1)
    if _alive(pid):
        os.killpg(pid, signal.SIGKILL)
    return True


def s3_command(port: int) -> List[str]:
    return [_bin("moto_server"), "-H", "127.0.0.1", "-p", str(port)]


def mlflow_command(folder: Path, port: int) -> List[str]:
    return [_bin("mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{folder.resolve() / 'mlflow.db'}",
            "--artifacts-destination", f"s3://{BUCKETS[0]}/artifacts"]


def mlflow_env(s3_url: str) -> Dict[str, str]:
    return {"MLFLOW_S3_ENDPOINT_URL": s3_url, "AWS_DEFAULT_REGION": "us-east-1",
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **credentials()}


def start(folder: Path, s3_port: int = 9000, mlflow_port: int = 5000) -> Dict[str, str]:
    """Start both services (the ones already running are left as they are); returns the state (URLs)."""
    folder = folder.resolve()
    state_file = folder / STATE
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    s3_url = state.get("s3_url", f"http://127.0.0.1:{s3_port}") if _pid(folder, "s3") else ""
    if not s3_url:
        if not _port_free(s3_port):
            raise OSError(f"port {s3_port} is taken: stop what uses it or choose another (make services "
                          f"S3_PORT=9100, or --s3-port)")
        s3_url = f"http://127.0.0.1:{s3_port}"
        seconds = launch(folder, "s3", s3_command(s3_port), {}, s3_url)
        print(f"s3: moto S3 endpoint at {s3_url} ({seconds:.1f} s; in memory: stop empties it)")
    env_before = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ.update(AWS_ENDPOINT_URL=s3_url, **credentials())
    try:
        from common.storage import s3_client

        client = s3_client()
        for bucket in BUCKETS:
            if not client.bucket_exists(bucket):
                client.make_bucket(bucket)
    finally:
        for k, v in env_before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    mlflow_url = state.get("mlflow_url", f"http://127.0.0.1:{mlflow_port}") if _pid(folder, "mlflow") else ""
    if not mlflow_url:
        if not _port_free(mlflow_port):
            raise OSError(f"port {mlflow_port} is taken: stop what uses it or choose another (make services "
                          f"MLFLOW_PORT=5100, or --mlflow-port)")
        mlflow_url = f"http://127.0.0.1:{mlflow_port}"
        seconds = launch(folder, "mlflow", mlflow_command(folder, mlflow_port), mlflow_env(s3_url),
                         f"{mlflow_url}/health")
        print(f"mlflow: tracking server at {mlflow_url} ({seconds:.1f} s; runs in {folder / 'mlflow.db'}, "
              f"artifacts in s3://{BUCKETS[0]}/artifacts)")
    state = {"s3_url": s3_url, "mlflow_url": mlflow_url, "folder": str(folder)}
    state_file.write_text(json.dumps(state, indent=1) + "\n")
    return state


def env_lines(state: Dict[str, str]) -> List[str]:
    """``export`` lines for a shell; the credentials only when they are the local pair (yours stay yours)."""
    lines = [f"export MLFLOW_TRACKING_URI={state['mlflow_url']}", f"export AWS_ENDPOINT_URL={state['s3_url']}",
             f"export MLFLOW_S3_ENDPOINT_URL={state['s3_url']}"]
    if not os.environ.get("AWS_ACCESS_KEY_ID"):
        lines += [f"export AWS_ACCESS_KEY_ID={LOCAL_KEY}", f"export AWS_SECRET_ACCESS_KEY={LOCAL_SECRET}"]
    return lines


def running_state(folder: Path) -> Optional[Dict[str, str]]:
    state_file = folder.resolve() / STATE
    if not state_file.is_file() or not (_pid(folder.resolve(), "s3") and _pid(folder.resolve(), "mlflow")):
        return None
    return json.loads(state_file.read_text())


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.services", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["start", "stop", "status", "env"])
    parser.add_argument("--folder", default=FOLDER, help=f"pid files, logs, mlflow.db (default {FOLDER})")
    parser.add_argument("--s3-port", type=int, default=9000)
    parser.add_argument("--mlflow-port", type=int, default=5000)
    args = parser.parse_args(argv)
    folder = Path(args.folder)
    if args.command == "start":
        try:
            state = start(folder, args.s3_port, args.mlflow_port)
        except (OSError, RuntimeError, TimeoutError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"\nS3 endpoint: {state['s3_url']}   MLflow: {state['mlflow_url']}   (logs, pids: {folder}/)")
        print("To use them from a shell (make demo SERVICES=1 does this for the demo):")
        print("\n".join(env_lines(state)))
        return 0
    if args.command == "stop":
        for name in ("mlflow", "s3"):
            print(f"{name}: {'stopped' if stop_one(folder.resolve(), name) else 'was not running'}")
        return 0
    running = running_state(folder)
    if args.command == "env":
        if running is None:
            print("echo 'services are not running: run make services first' >&2; false")
            return 1
        print("\n".join(env_lines(running)))
        return 0
    for name in ("s3", "mlflow"):
        pid = _pid(folder.resolve(), name)
        print(f"{name}: {'running, pid ' + str(pid) if pid else 'not running'}")
    return 0 if running else 1


if __name__ == "__main__":
    sys.exit(main())
