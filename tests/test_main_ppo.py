"""Stock `python -m verl.trainer.main_ppo` with the plugin installed (stops before any training).

Hydra's `--cfg job` prints the composed config and exits, which shows what the real entry point
accepts. A bad MTP value must stop the driver in verl's own validate_config, before Ray starts.
"""

import os
import subprocess
import sys
import tempfile

import pytest


def main_ppo(*args, timeout=300):
    # Run in a scratch directory: Hydra writes outputs/<date>/ into the working directory.
    with tempfile.TemporaryDirectory() as cwd:
        return subprocess.run(
            [sys.executable, "-m", "verl.trainer.main_ppo", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=cwd,
            env={**os.environ, "HYDRA_FULL_ERROR": "1"},
        )


def test_stock_main_ppo_accepts_plus_keys():
    proc = main_ppo(
        "--config-name=ppo_megatron_trainer",
        "+actor_rollout_ref.model.mtp.mtp_loss_type=rl",
        "+actor_rollout_ref.model.mtp.mtp_coef_mode=occ",
        "--cfg", "job",
    )
    assert proc.returncode == 0, proc.stderr
    assert "mtp_loss_type: rl" in proc.stdout and "mtp_coef_mode: occ" in proc.stdout


def test_wrapper_config_through_main_ppo_needs_no_plus():
    proc = main_ppo(
        "--config-path=pkg://verl_mtp.conf",
        "--config-name=ppo_megatron_mtp",
        "actor_rollout_ref.model.mtp.mtp_training_mode=joint",
        "actor_rollout_ref.model.mtp.occ_scale=0.5",
        "--cfg", "job",
    )
    assert proc.returncode == 0, proc.stderr
    assert "mtp_training_mode: joint" in proc.stdout and "occ_scale: 0.5" in proc.stdout
    assert "strategy: megatron" in proc.stdout


@pytest.mark.parametrize(
    "override, message",
    [
        ("+actor_rollout_ref.model.mtp.mtp_loss_type=rll", "mtp_loss_type='rll' is invalid: valid choices are ce, rl"),
        ("+actor_rollout_ref.model.mtp.mtp_coef_mode=occ", "mtp_coef_mode='occ' is invalid: OCC calibrates the RL policy loss"),
    ],
)
def test_bad_value_stops_the_driver_before_ray(override, message):
    proc = main_ppo("--config-name=ppo_megatron_trainer", override)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "ray init kwargs" not in proc.stdout  # main_ppo prints this right before ray.init()
