"""Whole-run rules for OCC, checked on configs composed by Hydra exactly as ``main_ppo`` composes them."""

import os
import subprocess
import sys

import pytest

from verl_mtp.config import MtpConfigError
from verl_mtp.run_checks import validate_mtp_run_config
from verl_mtp.tools.explain import compose_run_config

OCC = [
    "actor_rollout_ref.model.mtp.mtp_training_mode=joint",
    "actor_rollout_ref.model.mtp.mtp_loss_type=rl",
    "actor_rollout_ref.model.mtp.mtp_coef_mode=occ",
]


def validate(*overrides):
    return validate_mtp_run_config(compose_run_config([*OCC, *overrides]))


@pytest.mark.parametrize("rule", ["previous", "zero", "fixed"])
def test_one_mini_batch_per_step_is_refused_for_occ(rule):
    with pytest.raises(MtpConfigError) as info:
        validate("data.train_batch_size=32", "actor_rollout_ref.actor.ppo_mini_batch_size=32",
                 f"actor_rollout_ref.model.mtp.occ_on_policy_coef={rule}")
    message = str(info.value)
    assert "mtp_coef_mode='occ' has no signal with one actor update per step" in message
    assert "data.train_batch_size=32, actor_rollout_ref.actor.ppo_mini_batch_size=32" in message
    assert f"occ_on_policy_coef={rule!r}" in message
    assert "ppo_epochs>=2" in message and "mtp_coef_mode=fixed" in message


@pytest.mark.parametrize("overrides", [
    ("data.train_batch_size=32", "actor_rollout_ref.actor.ppo_mini_batch_size=16"),  # two mini-batches
    ("data.train_batch_size=32", "actor_rollout_ref.actor.ppo_mini_batch_size=32", "actor_rollout_ref.actor.ppo_epochs=2"),
])
def test_more_than_one_update_per_step_is_accepted(overrides):
    assert validate(*overrides).mtp_coef_mode == "occ"


def test_fixed_lambda_with_one_mini_batch_is_fine():
    config = compose_run_config([
        "actor_rollout_ref.model.mtp.mtp_training_mode=joint", "actor_rollout_ref.model.mtp.mtp_loss_type=rl",
        "data.train_batch_size=32", "actor_rollout_ref.actor.ppo_mini_batch_size=32",
    ])
    assert validate_mtp_run_config(config).mtp_coef_mode == "fixed"


def test_dynamic_context_parallel_is_refused_for_occ():
    with pytest.raises(MtpConfigError, match="dynamic_context_parallel=True"):
        validate("actor_rollout_ref.actor.megatron.dynamic_context_parallel=True")


def test_explain_reports_the_schedule_error_with_exit_2():
    verl_mtp = os.path.join(os.path.dirname(sys.executable), "verl-mtp")
    proc = subprocess.run(
        [verl_mtp, "explain", *OCC, "data.train_batch_size=8", "actor_rollout_ref.actor.ppo_mini_batch_size=8"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "has no signal with one actor update per step" in proc.stderr + proc.stdout


def test_decoupled_refuses_recomputed_modules_with_parameters_at_config_time():
    decoupled = "actor_rollout_ref.model.mtp.mtp_training_mode=decoupled"
    key = "actor_rollout_ref.actor.megatron.override_transformer_config"
    with pytest.raises(MtpConfigError, match=r"mtp_training_mode='decoupled' does not fit .*recompute_modules=\['core_attn', 'mlp'\]"):
        validate(decoupled, f"{key}.recompute_granularity=selective", f"+{key}.recompute_modules=[core_attn,mlp]")
    # full recompute (the recipes' setting) and parameter-free selective recompute are fine
    assert validate(decoupled, f"{key}.recompute_granularity=full", f"{key}.recompute_method=uniform").is_decoupled
    assert validate(decoupled, f"{key}.recompute_granularity=selective", f"+{key}.recompute_modules=[core_attn,moe_act]").is_decoupled
    # joint has no split to break
    assert validate(f"{key}.recompute_granularity=selective", f"+{key}.recompute_modules=[mlp]").mtp_training_mode == "joint"
