"""The runtime speculation switch, and the per-step loop that feeds metrics to the adaptive policy.

What the installed engines really offer (read from their sources at the versions verl 0.9.1 pins,
vLLM 0.24.0 and SGLang 0.5.12, and rechecked on vLLM 0.33.0 / SGLang 0.5.23):

* vLLM: no runtime switch. ``SpeculativeConfig`` is fixed when the engine is built; there is no
  per-request speculation setting in ``SamplingParams`` and no ``disable_by_batch_size`` in v1.
  What exists is a *start-time* batch-size schedule, ``speculative_config.
  num_speculative_tokens_per_batch_size = [(first_bs, last_bs, k), ...]`` (k >= 0, k = 0 means no
  speculation at that batch size; ranges start at 1), applied by the scheduler every iteration.
  ``vllm_batch_size_schedule`` builds one from what the policy measured.
* SGLang: no runtime on/off. ``/set_internal_state`` may change only
  ``speculative_accept_threshold_single`` / ``_acc`` (and ``pp_max_micro_batch_size``). At start,
  ``speculative_adaptive=True`` (+ ``speculative_adaptive_config`` JSON) lets the engine adapt the
  EAGLE step count to acceptance (EAGLE/EAGLE3 with topk=1 only); it never turns speculation off.
* Rebuilding the engine between steps is not cheap in verl: sleep/wake only releases and restores
  GPU memory of the same engine; a different speculative config needs a new server (weights load,
  CUDA-graph capture, new drafter), i.e. minutes per switch.

So on both engines the controller's decisions are *advisory*: they are logged and exported
(``rollout/mtp_spec_enabled``, ``rollout/mtp_spec_actuated`` = 0) and the observations fed back to
the policy say speculation really stayed on. An engine that gains a switch only needs an
``actuator`` (see ``SpeculationController.actuator``).
"""

from __future__ import annotations

import logging
import threading
import urllib.request
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

from verl_mtp.rollout.adaptive import (
    AcceptanceCollapseDetector,
    AdaptivePolicyConfig,
    AdaptiveSpeculationPolicy,
    StepObservation,
)
from verl_mtp.rollout.spec_metrics import (
    SOURCE_ENGINE_COUNTERS,
    SOURCE_NONE,
    SOURCE_REQUESTS,
    CounterDeltaTracker,
    MissingStatsWarning,
    SpecCounts,
    StepSpecStats,
    aggregate_replicas,
    aggregate_requests,
    vllm_counters_from_prometheus,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineKnob:
    engine: str
    checked_versions: str
    runtime_switch: bool  # can turn speculation off/on between steps without a restart
    start_time_options: str


ENGINE_KNOBS = {
    "vllm": EngineKnob(
        "vllm", "0.24.0 (verl 0.9.1 pin), 0.33.0", False,
        "speculative_config.num_speculative_tokens_per_batch_size=[(first_bs, last_bs, k>=0), ...]",
    ),
    "sglang": EngineKnob(
        "sglang", "0.5.12 (verl 0.9.1 pin), 0.5.23", False,
        "speculative_adaptive=True (+ speculative_adaptive_config JSON), EAGLE/EAGLE3 topk=1; "
        "runtime /set_internal_state: speculative_accept_threshold_single/_acc only",
    ),
}


def vllm_batch_size_schedule(num_speculative_tokens: int, off_from_batch_size: int) -> list[tuple[int, int, int]]:
    """A vLLM ``num_speculative_tokens_per_batch_size`` that speculates below a batch size only.

    vLLM requires ranges that start at 1, do not overlap and carry k >= 0; the last range's k
    also applies above it. The scheduler picks k from the number of requests in each iteration
    (run on vLLM 0.32's CPU engine: batches below the threshold draft, larger ones add no
    drafts). A data-parallel engine (data_parallel_size > 1) drops the rule with a warning and
    drafts the fixed ``num_speculative_tokens`` at every batch size.
    """
    if num_speculative_tokens < 1:
        raise ValueError(f"num_speculative_tokens={num_speculative_tokens} must be >= 1")
    if off_from_batch_size < 2:
        raise ValueError(f"off_from_batch_size={off_from_batch_size} must be >= 2 (batch size 1 keeps speculation)")
    return [(1, off_from_batch_size - 1, num_speculative_tokens), (off_from_batch_size, off_from_batch_size, 0)]


class SpeculationController:
    """Holds whether the next rollout step should speculate, and why.

    Two writers: the adaptive policy (``set_policy_decision``) and safety checks such as the
    drafter-sync check (``force_speculation_off``), which win for the steps they ask for.
    ``actuator(enabled) -> bool`` applies the state to the engine and returns whether it could;
    None (vLLM 0.24, SGLang 0.5.12) means advisory only.
    """

    def __init__(self, engine: Optional[str] = None, actuator: Optional[Callable[[bool], bool]] = None) -> None:
        self.engine = engine
        self.actuator = actuator
        self.policy_enabled = True
        self.policy_reason = "default"
        self.forced_off_steps = 0
        self.forced_reason: Optional[str] = None
        self.actuated = False
        self._began_forced = False  # the running step started under force_speculation_off
        self._lock = threading.Lock()
        self._advisory_logged = False

    @property
    def enabled(self) -> bool:
        """Speculation wanted for the coming step (forced off wins over the policy)."""
        return self.policy_enabled and self.forced_off_steps == 0

    def force_speculation_off(self, steps: int, reason: str) -> None:
        """Ask for no speculation for the next ``steps`` rollout steps (e.g. a stale drafter)."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps={steps!r} must be a positive integer")
        with self._lock:
            self.forced_off_steps = max(self.forced_off_steps, steps)
            self.forced_reason = reason
        logger.warning("verl-mtp: speculation forced off for %d rollout step(s): %s%s", steps, reason,
                       "" if self.actuator else f" (advisory: {self.engine or 'this engine'} has no runtime switch)")

    def set_policy_decision(self, enabled: bool, reason: str) -> None:
        with self._lock:
            self.policy_enabled = bool(enabled)
            self.policy_reason = reason

    def begin_step(self) -> bool:
        """Apply the wanted state before a rollout step; returns whether speculation really runs."""
        wanted = self.enabled
        self._began_forced = self.forced_off_steps > 0
        if self.actuator is not None:
            self.actuated = bool(self.actuator(wanted))
        else:
            self.actuated = False
            if not wanted and not self._advisory_logged:
                self._advisory_logged = True
                knob = ENGINE_KNOBS.get(self.engine or "")
                logger.warning(
                    "verl-mtp: speculation is wanted OFF but %s has no runtime switch (%s); the decision is "
                    "advisory (rollout/mtp_spec_actuated=0). Start-time options: %s",
                    self.engine or "the rollout engine", knob.checked_versions if knob else "unknown engine",
                    knob.start_time_options if knob else "none known",
                )
        return wanted if self.actuated else True

    def end_step(self) -> None:
        # A force that arrived during this step (e.g. at the weight sync after its rollout) is for
        # the coming steps, so only a step that began forced counts against it.
        with self._lock:
            if self._began_forced and self.forced_off_steps > 0:
                self.forced_off_steps -= 1
                if self.forced_off_steps == 0:
                    self.forced_reason = None

    def metrics(self) -> dict[str, float]:
        return {
            "rollout/mtp_spec_enabled": float(self.enabled),  # wanted for the next step
            "rollout/mtp_spec_actuated": float(self.actuated),
            "rollout/mtp_spec_forced_off": float(self.forced_off_steps > 0),
        }


_CONTROLLER = SpeculationController()


def get_controller() -> SpeculationController:
    """The process's controller (the trainer process runs the rollout loop and the sync check)."""
    return _CONTROLLER


def force_speculation_off(steps: int, reason: str) -> None:
    """Module-level entry for other checks (e.g. the drafter-sync check)."""
    _CONTROLLER.force_speculation_off(steps, reason)


# --- reading engine counters ---------------------------------------------------------------------


def scrape_vllm_counters(address: str, timeout: float = 2.0) -> Optional[SpecCounts]:
    """A vLLM server's cumulative spec counters (all its engines summed) from ``/metrics``; None
    when the endpoint is unreachable or has no spec-decode counters."""
    url = address if address.startswith("http") else f"http://{address}"
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/metrics", timeout=timeout) as response:
            text = response.read().decode("utf-8", errors="replace")
    except Exception as exc:  # noqa: BLE001 - a replica without stats is reported, not fatal
        logger.debug("verl-mtp: cannot read %s/metrics: %s", url, exc)
        return None
    engines = vllm_counters_from_prometheus(text)
    if not engines:
        return None
    result = SpecCounts()
    for counts in engines.values():
        result = result + counts
    return result


# --- the per-step loop ---------------------------------------------------------------------------


class SpecStepMonitor:
    """Per trainer process: turns each training step's rollout into metrics and a decision.

    ``record_generation`` stores the step's generated tokens and rollout seconds (from verl's
    throughput metrics call); ``finish_step`` is called with the step's per-request stats (verl's
    ``compute_spec_decode_metrics`` call) and returns the metrics to log.
    """

    def __init__(
        self,
        mtp: Any,
        engine: Optional[str],
        controller: Optional[SpeculationController] = None,
        read_counters: Callable[[str], Optional[SpecCounts]] = scrape_vllm_counters,
    ) -> None:
        self.mtp = mtp
        self.engine = engine
        self.controller = controller or get_controller()
        self.controller.engine = engine
        self.read_counters = read_counters
        self.addresses: list[str] = []
        self.tracker = CounterDeltaTracker()
        self.warnings = MissingStatsWarning()
        self.policy = (
            AdaptiveSpeculationPolicy(AdaptivePolicyConfig.from_mtp(mtp)) if mtp.adaptive_speculation else None
        )
        self.collapse = AcceptanceCollapseDetector(**mtp.section("spec_accept_collapse_"))
        self.step = 0
        self._generation: Optional[tuple[Optional[int], Optional[float], int]] = None
        self._speculation_ran = True
        self.begin_step()

    def register_servers(self, addresses: Sequence[str]) -> None:
        self.addresses = list(addresses)
        self.tracker.update(self._snapshot())  # baseline, so the first step's delta is exact

    def _snapshot(self) -> dict[str, Optional[SpecCounts]]:
        if self.engine != "vllm":  # SGLang's /metrics carries gauges (lifetime ratios), not counters
            return {}
        return {address: self.read_counters(address) for address in self.addresses}

    def record_generation(self, generated_tokens: Optional[int], gen_seconds: Optional[float], num_requests: int) -> None:
        self._generation = (generated_tokens, gen_seconds, num_requests)

    def begin_step(self) -> None:
        self._speculation_ran = self.controller.begin_step()

    def finish_step(self, per_request: Optional[Sequence[Optional[SpecCounts]]]) -> dict[str, float]:
        """The step's metrics; ``per_request``: each request's counts (None: no stats), or None."""
        self.step += 1
        stats = self.measure(per_request)
        metrics = stats.metrics()
        collapsed = self.collapse.observe(stats.accept_rate, after_sync=True, step=self.step)
        metrics["rollout/mtp_accept_collapse"] = float(collapsed)
        if self.policy is not None:
            decision = self.policy.observe(StepObservation(
                step=self.step, speculation_on=self._speculation_ran, throughput=stats.throughput,
                accept_rate=stats.accept_rate, accept_length=stats.accept_length,
                requests_per_replica=stats.requests_per_replica,
            ))
            self.controller.set_policy_decision(decision.enabled, decision.reason)
            metrics.update(decision.metrics())
        self.controller.end_step()
        metrics.update(self.controller.metrics())  # its mtp_spec_enabled includes forced-off steps
        self.begin_step()  # the next step's state, applied before its rollout starts
        return metrics

    def measure(self, per_request: Optional[Sequence[Optional[SpecCounts]]]) -> StepSpecStats:
        generated, seconds, num_requests = self._generation or (None, None, 0)
        self._generation = None
        stats = StepSpecStats(
            counts=None, generated_tokens=generated, gen_seconds=seconds, num_requests=num_requests,
            num_replicas=len(self.addresses),
        )
        deltas = self.tracker.update(self._snapshot())
        counts, reporting, missing, resets = aggregate_replicas(deltas)
        if counts is not None:
            stats.counts, stats.source = counts, SOURCE_ENGINE_COUNTERS
            stats.replicas_reporting, stats.replicas_without_stats, stats.counter_resets = reporting, missing, resets
            if missing:
                stats.notes.append(f"{missing} replica(s) reported no counters")
            return stats
        stats.replicas_without_stats = len(self.addresses)
        if per_request is not None and self.engine != "sglang":
            counts, _ = aggregate_requests(per_request)
            if counts is not None:
                stats.counts, stats.source = counts, SOURCE_REQUESTS
                return stats
        stats.source = SOURCE_NONE
        self.warnings.warn(self._why_no_stats())
        return stats

    def _why_no_stats(self) -> str:
        if self.engine == "vllm":
            return ("vLLM exposes spec-decode counters on /metrics only with actor_rollout_ref.rollout."
                    "disable_log_stats=False; verl 0.9.1 reads per-request stats from "
                    "request_spec_decode_stats, which vLLM (0.24-0.33) does not have")
        if self.engine == "sglang":
            return ("verl 0.9.1's SGLang server reads meta_info keys SGLang 0.5.12 does not emit "
                    "(spec_draft_token_num/spec_accept_token_num) and drops spec_num_correct_drafts")
        return f"rollout engine {self.engine!r} reports no speculative-decoding stats"


_MONITOR: Optional[SpecStepMonitor] = None


def get_monitor() -> Optional[SpecStepMonitor]:
    return _MONITOR


def set_monitor(monitor: Optional[SpecStepMonitor]) -> None:
    global _MONITOR
    _MONITOR = monitor



# --- entry points for the verl patches (verl_mtp.patches, "spec_step_metrics") -------------------


def register_server_manager(manager: Any) -> Optional[SpecStepMonitor]:
    """Called when verl's LLMServerManager has its replicas: create the monitor (when MTP
    speculative rollout and ``spec_step_metrics`` are on) and give it the replicas' addresses."""
    from verl_mtp.config import as_extended

    config = manager.config
    mtp = as_extended(config.actor_rollout_ref.model.get("mtp"))
    if not mtp.logs_spec_step_metrics:
        return None
    monitor = get_monitor()
    if monitor is None:
        monitor = SpecStepMonitor(mtp, engine=str(config.actor_rollout_ref.rollout.name))
        set_monitor(monitor)
    known = set(monitor.addresses)
    monitor.register_servers(monitor.addresses + [a for a in (manager.server_addresses or []) if a not in known])
    return monitor


def generated_tokens_of(batch: Any) -> Optional[int]:
    """Tokens the rollout generated for a verl DataProto (response_mask excludes tool/observation tokens)."""
    tensors = getattr(batch, "batch", None)
    if tensors is None:
        return None
    keys = set(tensors.keys())
    for key in ("response_mask", "response_length"):
        if key in keys:
            return int(tensors[key].sum().item())
    return None


def record_generation(batch: Any, timing_raw: Mapping[str, float]) -> None:
    monitor = get_monitor()
    if monitor is None:
        return
    seconds = timing_raw.get("gen")
    monitor.record_generation(generated_tokens_of(batch), None if seconds is None else float(seconds), len(batch))


def step_metrics_from_verl(drafts: Any, accepts: Any, verifies: Any, keep: Any = None) -> dict[str, float]:
    """The monitor's metrics for this step, from the per-request arrays verl passes to its own
    ``compute_spec_decode_metrics`` (all None when the rollout wrote no spec fields)."""
    monitor = get_monitor()
    if monitor is None:
        return {}
    per_request = None
    if drafts is not None and accepts is not None and verifies is not None:
        rows = zip(list(drafts), list(accepts), list(verifies), list(keep) if keep is not None else [True] * len(drafts))
        per_request = [
            SpecCounts(num_drafts=int(v or 0), num_draft_tokens=int(d or 0), num_accepted_tokens=int(a or 0))
            for d, a, v, k in rows if k
        ]
    return monitor.finish_step(per_request)
