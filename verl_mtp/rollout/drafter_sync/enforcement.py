"""What happens after a verdict (``drafter_sync_check``: auto | raise | warn | off), and the checker
that carries the state between the syncs of one replica.

``enforce_drafter_sync`` keeps no state: it raises, warns and returns the sync's metrics.
``DrafterSyncChecker`` owns what one sync needs from the previous one and posts each sync's metrics
on the channel it is given (``channel.DRAFTER_METRICS``, this process's, by default).
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, Optional

from verl_mtp.config import DRAFTER_SYNC_CHECKS, MTP_KEY_PREFIX
from verl_mtp.errors import MtpConfigError, VerlMtpError, VerlMtpWarning, invalid_value, report_loudly
import verl_mtp.rollout.drafter_sync.channel as metric
from verl_mtp.rollout.drafter_sync.channel import DRAFTER_METRICS, DrafterMetricsChannel
from verl_mtp.rollout.drafter_sync.fingerprint import TensorFingerprint
from verl_mtp.rollout.drafter_sync.recorder import StreamFingerprints
from verl_mtp.rollout.drafter_sync.verdict import SyncVerdict, compare_drafter_sync

MODE_KEY = f"{MTP_KEY_PREFIX}.drafter_sync_check"


class DrafterOutOfSyncError(VerlMtpError, RuntimeError):
    """The drafter's MTP weights differ from the trainer's after a weight sync."""


class DrafterSyncWarning(VerlMtpWarning):
    """drafter_sync_check=warn: the drafter was found out of sync (speculation-off is requested)."""


def check_mode(mode: str) -> None:
    if mode not in DRAFTER_SYNC_CHECKS:
        raise MtpConfigError(invalid_value(MODE_KEY, mode, f"valid choices are {', '.join(DRAFTER_SYNC_CHECKS)}"))


def _request_speculation_off(reason: str) -> str:
    """Ask verl_mtp.rollout.spec_control to turn speculation off for the next step; returns what
    really happens, for the caller's loud message."""
    try:
        from verl_mtp.rollout.spec_control import force_speculation_off, get_controller
    except ImportError as exc:
        return f"speculation could NOT be turned off (verl_mtp.rollout.spec_control is unavailable: {exc})"
    try:
        force_speculation_off(steps=1, reason=reason)
    except Exception as exc:  # noqa: BLE001 - reported by the caller, never swallowed
        return f"speculation could NOT be turned off (force_speculation_off failed: {type(exc).__name__}: {exc})"
    if get_controller().actuator is None:
        # vLLM 0.24 / SGLang 0.5.12 have no runtime switch: say so instead of claiming it is off.
        return ("speculation-off was requested for the next step, but the engine has no runtime switch, so "
                "it keeps drafting with the stale head (outputs stay correct; acceptance and throughput drop)")
    return "speculation is turned OFF for the next step"


def _coverage_metrics(verdict: SyncVerdict) -> dict[str, float]:
    if not verdict.workers_expected:
        return {}
    return {
        metric.METRIC_WORKERS_CHECKED: float(verdict.workers_seen),
        metric.METRIC_WORKERS_EXPECTED: float(verdict.workers_expected),
        metric.METRIC_CHECKED_FRACTION: min(verdict.workers_seen, verdict.workers_expected) / verdict.workers_expected,
    }


def enforce_drafter_sync(verdict: SyncVerdict, mode: str, announce_incomplete: bool = True) -> dict[str, float]:
    """Act on ``verdict`` per ``drafter_sync_check`` and return the sync's metrics.

    A problem found: raise/auto: DrafterOutOfSyncError with the list of problems; warn: a loud
    error on stderr, a DrafterSyncWarning, ``rollout/mtp_drafter_in_sync`` = 0 and speculation off
    for the next step. No problem, every worker checked: ``in_sync`` = 1. No problem, but fewer
    worker reports than workers: ``in_sync`` is not logged (nothing is claimed for unseen
    workers); raise: DrafterOutOfSyncError; auto/warn: a loud warning (when
    ``announce_incomplete``). The worker counts and ``checked_fraction`` are logged whenever the
    expected count is known. off: nothing (no metric).
    """
    check_mode(mode)
    if mode == "off":
        return {}
    metrics = _coverage_metrics(verdict)
    if verdict.in_sync:
        return {**metrics, metric.METRIC_IN_SYNC: 1.0}
    if not verdict.problems:  # the workers seen agree, but not all workers were seen
        message = verdict.incomplete_message()
        if mode == "raise":
            raise DrafterOutOfSyncError(
                message + f"\n(drafter_sync_check=raise requires every worker to be verified; set "
                f"{MODE_KEY}=auto or warn to run with the partial check and a warning)"
            )
        if announce_incomplete:
            report_loudly(f"WARNING: {message}.", DrafterSyncWarning, stacklevel=3)
        return metrics
    if mode in ("auto", "raise"):
        raise DrafterOutOfSyncError(
            verdict.message() + f"\n(set {MODE_KEY}=warn to continue with a loud warning "
            "and a request to turn speculation off for the next step instead)"
        )
    action = _request_speculation_off(f"drafter out of sync after weight sync #{verdict.sync_index}")
    report_loudly(f"ERROR: {verdict.message()}\n[verl-mtp] drafter_sync_check=warn: {action}.", DrafterSyncWarning)
    return {**metrics, metric.METRIC_IN_SYNC: 0.0}


class DrafterSyncChecker:
    """Keeps the state between syncs on the process that drives a replica's weight sync.

    ``stream = checker.begin(weights)`` before handing the stream to the engine,
    ``checker.finish(reports)`` once the engine reports; returns the metrics and posts them on
    ``channel`` (this process's ``DRAFTER_METRICS`` by default).
    """

    def __init__(self, is_mtp: Callable[[str], bool], mode: str, expected_workers: Optional[int], layout: str = "",
                 channel: DrafterMetricsChannel = DRAFTER_METRICS):
        """``expected_workers``: how many engine workers serve the replica (each should report);
        None when unknown (then no sync is reported in sync). ``layout``: how it was formed."""
        check_mode(mode)
        self.is_mtp = is_mtp
        self.mode = mode
        self.expected_workers = expected_workers
        self.layout = layout
        self.channel = channel
        self._announced_coverage: Optional[int] = None
        self.sync_index = 0
        self._stream: Optional[StreamFingerprints] = None
        self._previous: Optional[dict[str, TensorFingerprint]] = None
        self._previous_worker_syncs: dict[str, int] = {}

    def begin(self, weights):
        self.sync_index += 1
        self._stream = StreamFingerprints(self.is_mtp)
        return self._stream.wrap(weights)

    def finish(self, reports: Optional[Iterable[Mapping]]) -> dict[str, float]:
        if self._stream is None:
            raise RuntimeError("DrafterSyncChecker.finish() without begin()")
        reports = [r for r in (reports or []) if r is not None]
        verdict = compare_drafter_sync(
            self._stream.fingerprints,
            reports,
            sync_index=self.sync_index,
            previous_trainer=self._previous,
            previous_sync_index=self._previous_worker_syncs if self.sync_index > 1 else None,
            expected_workers=self.expected_workers,
            layout=self.layout,
        )
        self._previous = dict(self._stream.fingerprints)
        self._previous_worker_syncs = {r.get("worker", "?"): r.get("sync_index", 0) for r in reports}
        self._stream = None
        # an incomplete view is announced once, and again whenever the number of reports changes
        announce = verdict.complete or verdict.workers_seen != self._announced_coverage
        self._announced_coverage = None if verdict.complete else verdict.workers_seen
        self.channel.post({})  # a sync that raises below leaves no earlier sync's metrics behind
        metrics = enforce_drafter_sync(verdict, self.mode, announce_incomplete=announce)
        self.channel.post(metrics)
        return dict(metrics)
