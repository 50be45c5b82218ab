"""Adaptive speculation: keep speculative decoding on only while it pays off.

Speculation helps small batches and long tails and can lose throughput at large batch or on
slow GPUs (verl's guide measured -50% on H20), and acceptance drifts as RL changes the policy. The
policy below measures instead of guessing:

* It compares rollout throughput (generated tokens per second) of recent steps that ran with
  speculation against recent steps without (medians of the last ``window`` samples of each mode).
  The mode it is not in is measured by probes: as soon as the minimum dwell allows, then every
  ``probe_interval`` steps, it asks for ``probe_steps`` steps in the other mode, whose samples
  replace that mode's older ones.
* gain = median(with) / median(without) - 1. While on, it turns off when gain < min_gain -
  hysteresis; while off, it turns on when gain >= min_gain. Gains in between keep the current mode
  (no flapping around one threshold), and no switch happens within ``min_dwell_steps`` of the last.
* Every step yields a ``Decision`` (metrics + one log line with the reason).

The policy only decides. ``verl_mtp.rollout.spec_control`` applies the decision where the engine
has a knob and otherwise reports it as advisory; the observations it feeds back say what the
engine really ran, so an engine that cannot turn speculation off never produces "without"
samples and the policy says ``no_baseline`` instead of inventing a gain.

``AcceptanceCollapseDetector`` watches the stale-drafter symptom: acceptance right after a weight
sync falling below a fraction of its recent median.
"""

from __future__ import annotations

import logging
import statistics
from collections import deque
from dataclasses import dataclass
from typing import Any, Optional

logger = logging.getLogger(__name__)

KEEP, TURN_ON, TURN_OFF = 0, 1, -1

# Reason codes are logged as numbers (metrics must be numeric); the log line carries the name.
REASONS = (
    "warmup",  # 0: not enough steps in this mode yet to judge or probe
    "no_baseline",  # 1: no throughput samples of the other mode (e.g. the engine cannot switch)
    "probe",  # 2: this step runs in the other mode to measure it
    "gain_below_off_threshold",  # 3: speculation loses: turn off
    "gain_above_on_threshold",  # 4: speculation wins: turn on
    "gain_in_hysteresis_band",  # 5: between the thresholds: keep the mode
    "gain_keeps_mode",  # 6: the gain confirms the current mode
    "min_dwell",  # 7: a switch is due but the last one is too recent
    "no_throughput",  # 8: this step had no throughput measurement
)
REASON_CODES = {name: code for code, name in enumerate(REASONS)}


@dataclass(frozen=True)
class AdaptivePolicyConfig:
    probe_interval: int = 10
    probe_steps: int = 1
    min_gain: float = 0.05
    hysteresis: float = 0.05
    min_dwell_steps: int = 3
    window: int = 5

    @classmethod
    def from_mtp(cls, mtp: Any) -> "AdaptivePolicyConfig":
        """From the ``mtp.adaptive_spec_*`` fields."""
        return cls(**mtp.section("adaptive_spec_"))

    @property
    def off_threshold(self) -> float:
        return self.min_gain - self.hysteresis


@dataclass(frozen=True)
class StepObservation:
    """What one rollout step measured. ``speculation_on``: what the engine really ran."""

    step: int
    speculation_on: bool
    throughput: Optional[float] = None
    accept_rate: Optional[float] = None
    accept_length: Optional[float] = None
    requests_per_replica: Optional[float] = None


@dataclass(frozen=True)
class Decision:
    """The mode the policy wants for the next step and why."""

    step: int
    enabled: bool  # speculation wanted for the next step (probes included)
    mode_on: bool  # the chosen mode, probes excluded
    decision: int  # KEEP / TURN_ON / TURN_OFF of the chosen mode
    reason: str
    gain: Optional[float]
    throughput_on: Optional[float]
    throughput_off: Optional[float]
    probing: bool

    def metrics(self) -> dict[str, float]:
        m = {
            "rollout/mtp_spec_enabled": float(self.enabled),
            "rollout/mtp_spec_mode_on": float(self.mode_on),
            "rollout/mtp_spec_decision": float(self.decision),
            "rollout/mtp_spec_reason": float(REASON_CODES[self.reason]),
            "rollout/mtp_spec_probing": float(self.probing),
        }
        if self.gain is not None:
            m["rollout/mtp_spec_gain"] = self.gain
        if self.throughput_on is not None:
            m["rollout/mtp_spec_throughput_on"] = self.throughput_on
        if self.throughput_off is not None:
            m["rollout/mtp_spec_throughput_off"] = self.throughput_off
        return m

    def log_line(self, obs: Optional[StepObservation] = None) -> str:
        action = {KEEP: "keep", TURN_ON: "turn ON", TURN_OFF: "turn OFF"}[self.decision]
        mode = "on" if self.mode_on else "off"
        text = (
            f"verl-mtp adaptive speculation after step {self.step}: {action} (mode {mode}, next step "
            f"{'with' if self.enabled else 'without'} speculation{', probe' if self.probing else ''}); "
            f"reason={self.reason}; gain={_fmt(self.gain)}, tokens/s with={_fmt(self.throughput_on)} "
            f"without={_fmt(self.throughput_off)}"
        )
        if obs is not None:
            text += (
                f"; this step: speculation={'on' if obs.speculation_on else 'off'}, tokens/s={_fmt(obs.throughput)}, "
                f"accept_rate={_fmt(obs.accept_rate)}, requests/replica={_fmt(obs.requests_per_replica)}"
            )
        return text


def _fmt(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.4g}"


class AdaptiveSpeculationPolicy:
    """Decides, after each rollout step, whether the next one speculates (see module doc)."""

    def __init__(self, config: AdaptivePolicyConfig, start_on: bool = True) -> None:
        self.config = config
        self.mode_on = start_on
        self.steps_in_mode = 0
        self.steps_since_probe = 0
        self.probe_left = 0
        self.probes_started = 0
        self._on: deque[float] = deque(maxlen=config.window)
        self._off: deque[float] = deque(maxlen=config.window)

    def _median(self, on: bool) -> Optional[float]:
        samples = self._on if on else self._off
        return statistics.median(samples) if samples else None

    def gain(self) -> Optional[float]:
        with_spec, without = self._median(True), self._median(False)
        if with_spec is None or without is None or without <= 0:
            return None
        return with_spec / without - 1.0

    def observe(self, obs: StepObservation) -> Decision:
        if obs.throughput is not None and obs.throughput > 0:
            (self._on if obs.speculation_on else self._off).append(float(obs.throughput))
        self.steps_in_mode += 1
        self.steps_since_probe += 1

        if self.probe_left > 0:
            self.probe_left -= 1
            if self.probe_left > 0:
                return self._decide(obs, KEEP, "probe", probing=True)

        gain = self.gain()
        cfg = self.config
        if gain is None:
            other_measured = bool(self._off if self.mode_on else self._on)
            if not other_measured and self.steps_in_mode >= cfg.min_dwell_steps and self._probe_due():
                return self._start_probe(obs)
            reason = "no_throughput" if obs.throughput is None else (
                "warmup" if self.steps_in_mode < cfg.min_dwell_steps else "no_baseline"
            )
            return self._decide(obs, KEEP, reason)

        if self.mode_on and gain < cfg.off_threshold:
            return self._switch(obs, on=False, reason="gain_below_off_threshold")
        if not self.mode_on and gain >= cfg.min_gain:
            return self._switch(obs, on=True, reason="gain_above_on_threshold")
        if self._probe_due():
            return self._start_probe(obs)
        in_band = cfg.off_threshold <= gain < cfg.min_gain
        return self._decide(obs, KEEP, "gain_in_hysteresis_band" if in_band else "gain_keeps_mode")

    def _probe_due(self) -> bool:
        # The first baseline is measured as soon as dwell allows; later ones every probe_interval.
        return self.probes_started == 0 or self.steps_since_probe >= self.config.probe_interval

    def _start_probe(self, obs: StepObservation) -> Decision:
        # A probe re-measures the other mode from scratch: its older samples predate the policy's
        # latest updates (response lengths, acceptance) and would outvote the fresh ones.
        (self._off if self.mode_on else self._on).clear()
        self.probe_left = self.config.probe_steps
        self.probes_started += 1
        self.steps_since_probe = 0
        return self._decide(obs, KEEP, "probe", probing=True)

    def _switch(self, obs: StepObservation, on: bool, reason: str) -> Decision:
        if self.steps_in_mode < self.config.min_dwell_steps:
            return self._decide(obs, KEEP, "min_dwell")
        self.mode_on = on
        self.steps_in_mode = 0
        self.steps_since_probe = 0
        return self._decide(obs, TURN_ON if on else TURN_OFF, reason)

    def _decide(self, obs: StepObservation, decision: int, reason: str, probing: bool = False) -> Decision:
        result = Decision(
            step=obs.step,
            enabled=(not self.mode_on) if probing else self.mode_on,
            mode_on=self.mode_on,
            decision=decision,
            reason=reason,
            gain=self.gain(),
            throughput_on=self._median(True),
            throughput_off=self._median(False),
            probing=probing,
        )
        level = logging.WARNING if decision != KEEP else logging.INFO
        logger.log(level, result.log_line(obs))
        return result


class AcceptanceCollapseDetector:
    """Flags acceptance right after a weight sync below ``fraction`` x its recent median.

    In verl every training step ends with a weight sync, so each step's rollout is "right after a
    sync". Collapsed values are kept out of the history so a drafter that stays stale keeps being
    flagged instead of becoming the new normal.
    """

    def __init__(self, fraction: float = 0.5, window: int = 8, min_history: int = 3) -> None:
        self.fraction = fraction
        self.min_history = min_history
        self._history: deque[float] = deque(maxlen=window)

    def observe(self, accept_rate: Optional[float], after_sync: bool = True, step: Optional[int] = None) -> bool:
        if accept_rate is None:
            return False
        collapsed = False
        if after_sync and len(self._history) >= self.min_history:
            median = statistics.median(self._history)
            collapsed = median > 0 and accept_rate < self.fraction * median
            if collapsed:
                logger.warning(
                    "verl-mtp: speculative acceptance collapsed right after a weight sync%s: accept_rate=%.4g < "
                    "%.3g x recent median %.4g. The drafter (MTP head) in the rollout engine is probably stale "
                    "(not updated with the target, or lost across sleep/wake); rollout/mtp_accept_collapse=1",
                    "" if step is None else f" (step {step})", accept_rate, self.fraction, median,
                )
        if not collapsed:
            self._history.append(accept_rate)
        return collapsed
