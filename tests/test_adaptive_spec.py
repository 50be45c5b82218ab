"""The adaptive speculation policy, the speculation controller and their config keys.

The rollout engine is simulated by scripted throughput / acceptance sequences: a real vLLM or
SGLang engine (and a GPU) cannot run here. ``run`` plays an engine that applies every decision
(an engine with a runtime switch) unless ``actuated=False`` (vLLM 0.24 / SGLang 0.5.12, which
have none: speculation really stays on).
"""

from __future__ import annotations

import logging
import random

import pytest

from verl_mtp.config import ExtendedMtpConfig, MtpConfigError
from verl_mtp.rollout import spec_control
from verl_mtp.rollout.adaptive import (
    KEEP,
    REASON_CODES,
    TURN_OFF,
    TURN_ON,
    AcceptanceCollapseDetector,
    AdaptivePolicyConfig,
    AdaptiveSpeculationPolicy,
    StepObservation,
)
from verl_mtp.rollout.spec_control import SpecStepMonitor, SpeculationController, vllm_batch_size_schedule
from verl_mtp.rollout.spec_metrics import SpecCounts

CFG = AdaptivePolicyConfig(probe_interval=10, probe_steps=1, min_gain=0.05, hysteresis=0.05, min_dwell_steps=3, window=3)


def run(policy, throughput, steps, actuated=True):
    """Play ``steps`` rollout steps; ``throughput(step, speculation_on)`` scripts the engine."""
    decisions, spec_on = [], True
    for step in range(1, steps + 1):
        obs = StepObservation(step=step, speculation_on=spec_on, throughput=throughput(step, spec_on), accept_rate=0.6)
        decision = policy.observe(obs)
        decisions.append(decision)
        spec_on = decision.enabled if actuated else True
    return decisions


def switches(decisions):
    return [d for d in decisions if d.decision != KEEP]


def test_turns_off_when_speculation_loses_and_logs_the_reason(caplog):
    policy = AdaptiveSpeculationPolicy(CFG)
    with caplog.at_level(logging.INFO, logger="verl_mtp.rollout.adaptive"):
        decisions = run(policy, lambda step, on: 80.0 if on else 100.0, 12)
    assert [d.reason for d in decisions[:2]] == ["warmup", "warmup"]
    assert decisions[2].reason == "probe" and decisions[2].enabled is False  # step 4 measures "without"
    off = switches(decisions)
    assert len(off) == 1 and off[0].step == 4 and off[0].decision == TURN_OFF
    assert off[0].reason == "gain_below_off_threshold" and off[0].gain == pytest.approx(-0.2)
    assert all(not d.enabled for d in decisions[3:])
    assert off[0].metrics()["rollout/mtp_spec_decision"] == -1.0
    assert off[0].metrics()["rollout/mtp_spec_reason"] == REASON_CODES["gain_below_off_threshold"]
    logged = [r.getMessage() for r in caplog.records if "turn OFF" in r.getMessage()]
    assert len(logged) == 1 and "reason=gain_below_off_threshold" in logged[0] and "gain=-0.2" in logged[0]


def test_turns_back_on_when_speculation_wins_again():
    policy = AdaptiveSpeculationPolicy(CFG)
    # speculation loses until step 20 (e.g. large batches), then wins (long tail)
    decisions = run(policy, lambda step, on: (80.0 if step < 20 else 150.0) if on else 100.0, 40)
    kinds = [(d.step, d.decision, d.reason) for d in switches(decisions)]
    assert kinds[0] == (4, TURN_OFF, "gain_below_off_threshold")
    assert kinds[1][1] == TURN_ON and kinds[1][2] == "gain_above_on_threshold"
    assert 20 <= kinds[1][0] <= 4 + 2 * CFG.probe_interval + 1  # at the first probe after the change
    assert len(kinds) == 2 and decisions[-1].enabled


def _flapping_engine(step, on):
    # speculation is a wash: its throughput wobbles +-3% around the baseline (gain around 0)
    return 100.0 * (1.0 + random.Random(step).uniform(-0.03, 0.03)) if on else 100.0


def test_no_oscillation_around_the_threshold():
    steady = run(AdaptiveSpeculationPolicy(CFG), _flapping_engine, 80)
    assert len(switches(steady)) <= 1
    # the same engine with neither hysteresis nor dwell flips back and forth (so the test can fail)
    bare = AdaptivePolicyConfig(probe_interval=2, probe_steps=1, min_gain=0.0, hysteresis=0.0, min_dwell_steps=1, window=1)
    assert len(switches(run(AdaptiveSpeculationPolicy(bare), _flapping_engine, 80))) >= 5


def test_reprobes_periodically_while_speculation_wins():
    decisions = run(AdaptiveSpeculationPolicy(CFG), lambda step, on: 120.0 if on else 100.0, 45)
    assert not switches(decisions)
    probe_starts = [d.step for d in decisions if d.probing]
    assert probe_starts == [3, 13, 23, 33, 43]
    assert all(not d.enabled for d in decisions if d.probing)  # the probe step runs without
    kept = [d for d in decisions if d.step > 4 and not d.probing]
    assert {d.reason for d in kept} == {"gain_keeps_mode"} and all(d.gain == pytest.approx(0.2) for d in kept)


def test_min_dwell_delays_a_switch():
    cfg = AdaptivePolicyConfig(probe_interval=2, probe_steps=1, min_gain=0.05, hysteresis=0.05, min_dwell_steps=5, window=3)
    decisions = run(AdaptiveSpeculationPolicy(cfg), lambda step, on: (80.0 if step < 7 else 150.0) if on else 100.0, 20)
    kinds = switches(decisions)
    assert kinds[0].decision == TURN_OFF and kinds[0].step == 6
    assert any(d.reason == "min_dwell" for d in decisions if 6 < d.step < kinds[1].step)
    assert kinds[1].decision == TURN_ON and kinds[1].step - kinds[0].step >= cfg.min_dwell_steps


def test_advisory_engine_never_invents_a_gain():
    decisions = run(AdaptiveSpeculationPolicy(CFG), lambda step, on: 80.0 if on else 100.0, 30, actuated=False)
    assert all(d.gain is None for d in decisions)
    assert not switches(decisions)
    assert "no_baseline" in {d.reason for d in decisions}


def test_steps_without_throughput_hold():
    policy = AdaptiveSpeculationPolicy(CFG)
    d = policy.observe(StepObservation(step=1, speculation_on=True, throughput=None))
    assert d.decision == KEEP and d.reason == "no_throughput" and d.enabled


# --- controller ----------------------------------------------------------------------------------


def test_force_speculation_off_with_a_switch():
    applied = []
    controller = SpeculationController(engine="future", actuator=lambda on: applied.append(on) or True)
    controller.force_speculation_off(2, "drafter out of sync")
    ran = []
    for _ in range(3):
        ran.append(controller.begin_step())
        controller.end_step()
    assert ran == [False, False, True] and applied == [False, False, True]
    assert controller.metrics()["rollout/mtp_spec_actuated"] == 1.0
    controller.set_policy_decision(False, "gain_below_off_threshold")
    assert controller.begin_step() is False and controller.metrics()["rollout/mtp_spec_enabled"] == 0.0


def test_force_speculation_off_is_advisory_without_a_switch(caplog):
    controller = SpeculationController(engine="vllm")
    with caplog.at_level(logging.WARNING, logger="verl_mtp.rollout.spec_control"):
        controller.force_speculation_off(1, "drafter out of sync")
        assert controller.begin_step() is True  # speculation really still runs
        controller.begin_step()
    m = controller.metrics()
    assert m["rollout/mtp_spec_enabled"] == 0.0 and m["rollout/mtp_spec_actuated"] == 0.0 and m["rollout/mtp_spec_forced_off"] == 1.0
    messages = [r.getMessage() for r in caplog.records]
    assert any("drafter out of sync" in t and "advisory" in t for t in messages)
    assert sum("num_speculative_tokens_per_batch_size" in t for t in messages) == 1  # said once
    controller.end_step()
    assert controller.enabled


@pytest.mark.parametrize("steps", [0, -1, 1.5, True, "2"])
def test_force_speculation_off_rejects_bad_steps(steps):
    with pytest.raises(ValueError, match="steps="):
        SpeculationController().force_speculation_off(steps, "x")


def test_module_level_force_reaches_the_process_controller():
    controller = spec_control.get_controller()
    spec_control.force_speculation_off(steps=1, reason="drafter sync check")  # drafter_sync's call
    try:
        assert not controller.enabled and controller.forced_reason == "drafter sync check"
    finally:
        controller.begin_step()
        controller.end_step()
    assert controller.enabled


def test_force_during_a_step_applies_to_the_next_one():
    # verl syncs weights after the step's rollout and before its metrics close the step
    controller = SpeculationController(engine="future", actuator=lambda on: True)
    assert controller.begin_step() is True
    controller.force_speculation_off(1, "drafter out of sync after weight sync #3")
    controller.end_step()  # closes the step that ran before the sync
    assert controller.begin_step() is False
    controller.end_step()
    assert controller.begin_step() is True


def test_vllm_batch_size_schedule_follows_vllms_rules():
    # vLLM 0.24.0 (vllm/v1/spec_decode/dynamic/utils.py): ranges start at 1, ascending, disjoint, k >= 0
    schedule = vllm_batch_size_schedule(3, off_from_batch_size=64)
    assert schedule == [(1, 63, 3), (64, 64, 0)]
    with pytest.raises(ValueError, match="off_from_batch_size"):
        vllm_batch_size_schedule(3, 1)
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        vllm_batch_size_schedule(0, 8)


# --- monitor: metrics -> policy -> controller ----------------------------------------------------


def test_monitor_drives_the_controller_and_reports_decisions():
    mtp = ExtendedMtpConfig(enable=True, enable_rollout=True, adaptive_speculation=True,
                            adaptive_spec_min_dwell_steps=1, adaptive_spec_probe_interval=5)
    speculating = []
    controller = SpeculationController(engine="future", actuator=lambda on: speculating.append(on) or True)
    monitor = SpecStepMonitor(mtp, engine="vllm", controller=controller, read_counters=lambda a: None)
    monitor.register_servers(["r0"])
    metrics = []
    for _ in range(6):
        on = speculating[-1]
        monitor.record_generation(generated_tokens=800 if on else 1000, gen_seconds=10.0, num_requests=64)
        metrics.append(monitor.finish_step([SpecCounts(10, 30, 18)] if on else None))
    assert speculating[:3] == [True, False, False]  # probe at step 1, then off for good
    assert metrics[0]["rollout/mtp_spec_probing"] == 1.0
    assert metrics[1]["rollout/mtp_spec_decision"] == -1.0 and metrics[1]["rollout/mtp_spec_enabled"] == 0.0
    assert metrics[1]["rollout/mtp_spec_gain"] == pytest.approx(-0.2)
    assert metrics[0]["rollout/mtp_gen_throughput"] == 80.0 and metrics[1]["rollout/mtp_gen_throughput"] == 100.0


# --- acceptance collapse --------------------------------------------------------------------------


def test_acceptance_collapse_after_sync(caplog):
    detector = AcceptanceCollapseDetector(fraction=0.5, window=8)
    assert detector.observe(0.1) is False  # no history yet: nothing to compare with
    detector = AcceptanceCollapseDetector(fraction=0.5, window=8)
    flags = [detector.observe(r, step=i) for i, r in enumerate([0.6, 0.62, 0.58, 0.61], 1)]
    with caplog.at_level(logging.WARNING, logger="verl_mtp.rollout.adaptive"):
        flags += [detector.observe(0.2, step=5), detector.observe(0.25, step=6)]
    flags += [detector.observe(0.59, step=7), detector.observe(0.31, step=8, after_sync=False)]
    assert flags == [False] * 4 + [True, True] + [False, False]
    assert any("step 5" in r.getMessage() and "stale" in r.getMessage() for r in caplog.records)


def test_monitor_reports_collapse_metric():
    mtp = ExtendedMtpConfig(enable=True, enable_rollout=True)
    monitor = SpecStepMonitor(mtp, engine="vllm", controller=SpeculationController(), read_counters=lambda a: None)
    rates = [0.7, 0.7, 0.7, 0.1]
    flags = [monitor.finish_step([SpecCounts(10, 100, int(r * 100))])["rollout/mtp_accept_collapse"] for r in rates]
    assert flags == [0.0, 0.0, 0.0, 1.0]


# --- config ---------------------------------------------------------------------------------------


def test_defaults_keep_adaptive_off():
    mtp = ExtendedMtpConfig()
    assert mtp.adaptive_speculation is False and mtp.spec_step_metrics is True


@pytest.mark.parametrize(
    "key, value",
    [
        ("adaptive_speculation", "maybe"),  # "yes" and 1 are booleans (OmegaConf's forms)
        ("spec_step_metrics", 0.5),
        ("adaptive_spec_probe_steps", 0),
        ("adaptive_spec_probe_interval", 1),  # must exceed probe_steps (1)
        ("adaptive_spec_min_dwell_steps", 0),
        ("adaptive_spec_window", 2.5),
        ("adaptive_spec_min_gain", float("nan")),
        ("adaptive_spec_hysteresis", -0.1),
        ("spec_accept_collapse_fraction", 1.0),
        ("spec_accept_collapse_fraction", 0.0),
        ("spec_accept_collapse_window", 1),
    ],
)
def test_bad_values_fail_naming_the_key(key, value):
    with pytest.raises(MtpConfigError, match=rf"actor_rollout_ref\.model\.mtp\.{key}="):
        ExtendedMtpConfig(enable=True, enable_rollout=True, **{key: value})


def test_adaptive_needs_speculative_rollout():
    with pytest.raises(MtpConfigError, match="adaptive_speculation=True.*enable_rollout=True"):
        ExtendedMtpConfig(enable=True, adaptive_speculation=True)
    assert ExtendedMtpConfig(enable=True, enable_rollout=True, adaptive_speculation=True).adaptive_speculation


def test_yaml_lists_the_keys_with_the_dataclass_defaults():
    import importlib.resources

    import yaml

    text = importlib.resources.files("verl_mtp.conf").joinpath("ppo_megatron_mtp.yaml").read_text()
    mtp_yaml = yaml.safe_load(text)["actor_rollout_ref"]["model"]["mtp"]
    defaults = ExtendedMtpConfig()
    keys = ["spec_step_metrics", "adaptive_speculation", "adaptive_spec_probe_interval", "adaptive_spec_probe_steps",
            "adaptive_spec_min_gain", "adaptive_spec_hysteresis", "adaptive_spec_min_dwell_steps",
            "adaptive_spec_window", "spec_accept_collapse_fraction", "spec_accept_collapse_window"]
    assert {k: mtp_yaml[k] for k in keys} == {k: getattr(defaults, k) for k in keys}
