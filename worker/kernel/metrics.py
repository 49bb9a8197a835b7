"""Prometheus metrics of the worker (served on ``UNKEY_PROMETHEUS_PORT`` when > 0).

Flow runs execute in child processes of the worker, so the worker enables prometheus-client's
multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` under the state directory) before anything
imports this module; counters from every child are then summed on ``/metrics``.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

__all__ = [
    "CRON_LAST_SUCCESS",
    "LOCK_WAIT_SECONDS",
    "RUNS_COMPLETED",
    "RUNS_FAILED",
    "RUNS_RESUMED",
    "RUNS_STARTED",
    "STEP_RETRIES",
]

RUNS_STARTED = Counter("ctrl_flow_runs_started_total", "Flow runs started", ["flow"])
RUNS_COMPLETED = Counter("ctrl_flow_runs_completed_total", "Flow runs completed", ["flow"])
RUNS_FAILED = Counter("ctrl_flow_runs_failed_total", "Flow runs failed", ["flow", "kind"])
RUNS_RESUMED = Counter(
    "ctrl_flow_runs_resumed_total", "Crashed flow runs rescheduled by the reconciler", ["flow"]
)
STEP_RETRIES = Counter("ctrl_step_retries_total", "Step attempts retried", ["step"])
LOCK_WAIT_SECONDS = Histogram(
    "ctrl_key_lock_wait_seconds",
    "Time spent waiting for a per-key lock",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
# Successful cron calls (a timestamp only grows: the max over every process, dead ones too).
CRON_LAST_SUCCESS = Gauge(
    "ctrl_cron_last_success_timestamp_seconds",
    "When a run of the cron last completed (unix seconds)",
    ["flow"],
    multiprocess_mode="max",
)
