"""The drafter check's metrics and the one channel that carries them to the driver's step metrics.

The check runs in the process that streams weights to a replica (a trainer rank, or verl's
CheckpointEngineWorker); the step metrics are logged by the driver. verl 0.9.1's colocated (naive)
sync drops what the trainer workers return, so the metrics travel in two hops, each explicit here:

1. worker end: the replica leader's ``DrafterSyncChecker`` posts the metrics of its check
   (``post``); the patched ``ActorRolloutRefWorker.update_weights`` hands them out once (``take``),
   so a sync without a check (another rank, an adapter-only sync) returns nothing;
2. driver end: the patched ``CheckpointEngineManager.update_weights`` collects what the workers
   returned (``collect``); the patched step-metrics hook pops them once per step (``pop_step``).

``DRAFTER_METRICS`` is this process's channel; the module functions below are its named entry
points for the patch layer.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

METRIC_IN_SYNC = "rollout/mtp_drafter_in_sync"
# How many engine workers' drafters a sync verified, of how many serve the replica(s): vLLM's
# collective_rpc can return fewer reports than there are workers (data parallelism > 1).
METRIC_WORKERS_CHECKED = "rollout/mtp_drafter_workers_checked"
METRIC_WORKERS_EXPECTED = "rollout/mtp_drafter_workers_expected"
METRIC_CHECKED_FRACTION = "rollout/mtp_drafter_checked_fraction"


class DrafterMetricsChannel:
    """Worker end (``post`` / ``latest`` / ``take``) and driver end (``collect`` / ``pop_step``)."""

    def __init__(self) -> None:
        self._posted: dict[str, float] = {}
        self._collected: dict[str, float] = {}

    # --- worker end ---------------------------------------------------------------------------
    def post(self, metrics: Mapping[str, float]) -> None:
        """The metrics of the latest check in this process (replaces the previous check's)."""
        self._posted = dict(metrics)

    def latest(self) -> dict[str, float]:
        """The latest check's metrics (``{}`` before the first / when off)."""
        return dict(self._posted)

    def take(self) -> dict[str, float]:
        """The latest check's metrics, handed out once."""
        metrics, self._posted = self._posted, {}
        return dict(metrics)

    # --- driver end ---------------------------------------------------------------------------
    def collect(self, results: Iterable[Any]) -> None:
        """Keep the metrics the trainer workers returned from one sync (the replica leaders return
        them; every other rank returns nothing). One replica out of sync makes the step's 0;
        worker counts add up over replicas."""
        for result in results:
            if not isinstance(result, Mapping):
                continue
            if METRIC_IN_SYNC in result:
                value = float(result[METRIC_IN_SYNC])
                self._collected[METRIC_IN_SYNC] = min(value, self._collected.get(METRIC_IN_SYNC, value))
            for key in (METRIC_WORKERS_CHECKED, METRIC_WORKERS_EXPECTED):
                if key in result:
                    self._collected[key] = self._collected.get(key, 0.0) + float(result[key])

    def pop_step(self) -> dict[str, float]:
        """The metrics of the syncs since the last call, for the step's metrics.

        ``in_sync`` = 1 only when every replica's check saw all its workers: a replica that saw
        fewer (it logs no ``in_sync`` itself) keeps the step's from claiming 1; a 0 stays 0."""
        metrics, self._collected = self._collected, {}
        checked, expected = metrics.get(METRIC_WORKERS_CHECKED), metrics.get(METRIC_WORKERS_EXPECTED)
        if checked is not None and expected:
            metrics[METRIC_CHECKED_FRACTION] = min(checked, expected) / expected
            if checked < expected and metrics.get(METRIC_IN_SYNC) == 1.0:
                del metrics[METRIC_IN_SYNC]
        return metrics


DRAFTER_METRICS = DrafterMetricsChannel()


def latest_drafter_sync_metrics() -> dict[str, float]:
    """The metrics of the last check in this process (``{}`` before the first / when off)."""
    return DRAFTER_METRICS.latest()


def take_drafter_sync_metrics() -> dict[str, float]:
    """Worker end: the last check's metrics, handed out once (the trainer worker's update_weights)."""
    return DRAFTER_METRICS.take()


def record_worker_sync_results(results: Iterable[Any]) -> None:
    """Driver end: keep the drafter metrics the trainer workers returned from one sync."""
    DRAFTER_METRICS.collect(results)


def pop_driver_drafter_metrics() -> dict[str, float]:
    """Driver end: the drafter metrics of the syncs since the last call, for the step's metrics."""
    return DRAFTER_METRICS.pop_step()
