"""Per-step metrics to an MLflow tracking server without ever holding up training.

``MetricsLog`` (trainer/metrics.py) hands each step's metrics to a ``MetricsSender``: ``put`` only appends to a
bounded in-memory buffer; a background thread sends it in batches (``log_batch``, at most 1000 metrics a call).
``put_tags`` queues run tags the same way (the trainer's ``attention_backend``); they go with the next batch.
When the server is unreachable the thread keeps the metrics and tries again with backoff (1 s, doubling, at most
30 s apart), so training goes on at full speed and the curves are complete once the server is back. When the
buffer is full the oldest metrics are dropped and counted. ``close`` (end of the stage) waits at most
``flush_timeout_s`` for the rest and then prints one line: how many metrics were sent late, or how many were lost
(metrics.jsonl beside the checkpoints always has every step).

    sender = MetricsSender("http://mlflow:5000", run_id)
    sender.put([Metric("loss", 0.7, timestamp_ms, step)])
    sender.put_tags({"attention_backend": "self=flash_attn cross=flash_attn_varlen"})
    sender.close()

Knobs (environment): ``VGEN_MLFLOW_BUFFER`` (metrics kept while the server is away, default 200000, about 40 MB),
``VGEN_MLFLOW_FLUSH_TIMEOUT_S`` (default 60); the MLflow client's own ``MLFLOW_HTTP_REQUEST_TIMEOUT`` and
``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` bound each attempt. An error the server answers with a 4xx status (a deleted
run, an invalid metric) is not retried: that batch is dropped and counted.
"""
from __future__ import annotations

import collections
import os
import sys
import threading
import time
from typing import Any, Deque, Dict, List, Optional

BUFFER_ENV, FLUSH_ENV = "VGEN_MLFLOW_BUFFER", "VGEN_MLFLOW_FLUSH_TIMEOUT_S"
BATCH = 1000   # MLflow's log_batch limit on metrics per call
TAG_BATCH = 100   # and on tags per call


def _env_number(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    try:
        return float(raw) if raw else default
    except ValueError:
        raise ValueError(f"{name} must be a number, got '{raw}'") from None


def _permanent(exc: BaseException) -> bool:
    """An answer from the server that a retry cannot change (4xx); anything else (no connection, a timeout, a 5xx)
    is worth retrying."""
    from mlflow.exceptions import RestException

    if isinstance(exc, RestException):
        try:
            return 400 <= int(exc.get_http_status_code()) < 500
        except (TypeError, ValueError):
            return False
    return False


class MetricsSender:
    """Sends metrics of one run from a background thread; see the module docstring."""

    def __init__(self, tracking_uri: str, run_id: str, max_buffered: Optional[int] = None,
                 flush_timeout_s: Optional[float] = None, first_retry_s: float = 1.0, max_retry_s: float = 30.0):
        from mlflow.tracking import MlflowClient

        self.uri, self.run_id = tracking_uri, run_id
        self.client = MlflowClient(tracking_uri)
        self.max_buffered = int(max_buffered if max_buffered is not None else _env_number(BUFFER_ENV, 200_000))
        self.flush_timeout_s = flush_timeout_s if flush_timeout_s is not None else _env_number(FLUSH_ENV, 60.0)
        self.first_retry_s, self.max_retry_s = first_retry_s, max_retry_s
        self.buffer: Deque[Any] = collections.deque()
        self.tags: List[Any] = []   # mlflow.entities.RunTag, sent with the next batch (few: never dropped for room)
        self.cond = threading.Condition()
        self.closing = self.in_flight = False
        self.sent = self.dropped = self.rejected = self.rejected_tags = self.late = 0
        self.down_since: Optional[float] = None   # monotonic time of the first failed attempt of an outage
        self.last_error = ""
        self.thread = threading.Thread(target=self._run, name="mlflow-metrics", daemon=True)
        self.thread.start()

    def put(self, metrics: List[Any]) -> None:
        """Queue ``metrics`` (mlflow.entities.Metric); never blocks on the network."""
        with self.cond:
            self.buffer.extend(metrics)
            overflow = len(self.buffer) - self.max_buffered
            for _ in range(max(0, overflow)):
                self.buffer.popleft()
            if overflow > 0:
                self.dropped += overflow
            self.cond.notify()

    def put_tags(self, tags: Dict[str, str]) -> None:
        """Queue run tags (a tag set again replaces the earlier value); never blocks on the network."""
        from mlflow.entities import RunTag

        with self.cond:
            self.tags.extend(RunTag(k, str(v)) for k, v in tags.items())
            self.cond.notify()

    def flush(self, timeout_s: float) -> bool:
        """Wait until every queued metric was sent (True) or ``timeout_s`` passed (False)."""
        deadline = time.monotonic() + timeout_s
        with self.cond:
            self.cond.notify_all()   # a sender waiting out its backoff tries again now
            while self.buffer or self.tags or self.in_flight:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(min(left, 0.1))
        return True

    def _run(self) -> None:
        delay = self.first_retry_s
        while True:
            with self.cond:
                while not self.buffer and not self.tags and not self.closing:
                    self.cond.wait()
                if not self.buffer and not self.tags:   # closing and nothing left
                    return
                batch = [self.buffer[i] for i in range(min(BATCH, len(self.buffer)))]
                tags = self.tags[:TAG_BATCH]
                self.in_flight = True
            try:
                self.client.log_batch(self.run_id, metrics=batch, tags=tags)
            except Exception as exc:   # noqa: BLE001 - classified below; training must not die of tracking
                with self.cond:
                    self.in_flight = False
                    self.last_error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                    if _permanent(exc):
                        self._pop(len(batch))
                        del self.tags[:len(tags)]
                        self.rejected += len(batch)
                        self.rejected_tags += len(tags)
                        print(f"warning: MLflow refused {len(batch)} metrics and {len(tags)} tags of run {self.run_id} "
                              f"({self.last_error}); the metrics are only in metrics.jsonl", file=sys.stderr,
                              flush=True)
                        continue
                    if self.down_since is None:
                        self.down_since = time.monotonic()
                        print(f"warning: MLflow at {self.uri} unreachable ({self.last_error}); training continues, "
                              f"metrics are kept (up to {self.max_buffered}) and sent when it is back",
                              file=sys.stderr, flush=True)
                    if self.closing:
                        return
                    self.cond.wait(delay)   # close() wakes it for a last try
                delay = min(delay * 2, self.max_retry_s)
                continue
            with self.cond:
                self.in_flight = False
                self._pop(len(batch))
                del self.tags[:len(tags)]
                self.sent += len(batch)
                if self.down_since is not None:
                    self.late += len(batch)
                    if not self.buffer:
                        print(f"MLflow at {self.uri} reachable again after {time.monotonic() - self.down_since:.0f} "
                              f"s: {self.late} buffered metrics sent", file=sys.stderr, flush=True)
                        self.down_since, self.late = None, 0
                self.cond.notify_all()
            delay = self.first_retry_s

    def _pop(self, n: int) -> None:
        for _ in range(min(n, len(self.buffer))):
            self.buffer.popleft()

    def close(self, timeout_s: Optional[float] = None) -> int:
        """Send what is left, waiting at most ``timeout_s`` (default ``flush_timeout_s``); returns how many metrics
        never reached MLflow (dropped from a full buffer, refused, or still queued), after one warning line (tags
        not set: a line of their own, not counted)."""
        timeout = self.flush_timeout_s if timeout_s is None else timeout_s
        self.flush(timeout)
        with self.cond:
            self.closing = True
            self.cond.notify_all()
        self.thread.join(timeout=1.0)
        with self.cond:
            left = len(self.buffer)
            lost = left + self.dropped + self.rejected
            tags_lost = len(self.tags) + self.rejected_tags
        if tags_lost:
            print(f"warning: MLflow at {self.uri}: {tags_lost} tags of run {self.run_id} were not set (the trainer's "
                  "startup line has them)", file=sys.stderr, flush=True)
        if lost:
            why = f"last error: {self.last_error}" if self.last_error else "buffer full"
            print(f"warning: MLflow at {self.uri}: {lost} metrics of run {self.run_id} were not logged ({left} still "
                  f"queued after {timeout:g} s, {self.dropped} dropped from the full buffer of {self.max_buffered}, "
                  f"{self.rejected} refused; {why}); metrics.jsonl has every step", file=sys.stderr, flush=True)
        return lost
