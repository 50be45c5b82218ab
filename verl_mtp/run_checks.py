"""Whole-run checks of an MTP config against the rest of the run config (driver side, before Ray).

These need keys outside ``actor_rollout_ref.model.mtp`` (the update schedule, the parallel
layout), so they run in ``validate_mtp_run_config`` and ``verl-mtp explain``, not in the config
class. Each raises MtpConfigError naming the keys, their values and what to change.
"""

from __future__ import annotations

from typing import Any

from verl_mtp.config import MTP_KEY_PREFIX, ExtendedMtpConfig, MtpConfigError, _select

ACTOR = "actor_rollout_ref.actor"


def mini_batches_per_step(config: Any) -> tuple[int, str]:
    """How many actor updates (mini-batches, over all epochs) one training step makes, and why.

    verl splits the step's batch (``data.train_batch_size`` prompts, each with ``rollout.n``
    responses) into mini-batches of ``ppo_mini_batch_size`` prompts, and repeats that
    ``ppo_epochs`` times.
    """
    train_batch = int(_select(config, "data.train_batch_size", 0) or 0)
    mini_batch = int(_select(config, f"{ACTOR}.ppo_mini_batch_size", 0) or 0)
    epochs = int(_select(config, f"{ACTOR}.ppo_epochs", 1) or 1)
    per_epoch = max(train_batch // mini_batch, 1) if mini_batch > 0 and train_batch > 0 else 1
    why = (f"data.train_batch_size={train_batch}, {ACTOR}.ppo_mini_batch_size={mini_batch}, "
           f"{ACTOR}.ppo_epochs={epochs}")
    return per_epoch * epochs, why


def check_occ_schedule(config: Any, mtp: ExtendedMtpConfig) -> None:
    """OCC needs off-policy mini-batches: with one update per step it has no signal at all.

    The first mini-batch of a step is on-policy (pi_theta == pi_old), where OCC's numerator is
    zero and lambda comes from ``occ_on_policy_coef``. With a single mini-batch per step that is
    every update, so OCC would never measure anything and the run would silently train as
    ``detach`` (previous/zero) or as fixed lambda. The config asks for a calibration that cannot
    happen, so this is an error, not a warning.
    """
    if not (mtp.enable_train and mtp.mtp_loss_type == "rl" and mtp.mtp_coef_mode == "occ"):
        return
    updates, why = mini_batches_per_step(config)
    if updates > 1:
        return
    stays = {"previous": "0 (nothing is ever measured off-policy)", "zero": "0",
             "fixed": f"mtp_loss_scaling_factor={mtp.mtp_loss_scaling_factor}"}[mtp.occ_on_policy_coef]
    raise MtpConfigError(
        f"{MTP_KEY_PREFIX}.mtp_coef_mode='occ' has no signal with one actor update per step ({why}): "
        f"every update is on-policy (pi_theta == pi_old), where OCC's numerator is zero, so lambda would "
        f"stay at occ_on_policy_coef={mtp.occ_on_policy_coef!r} -> {stays} for the whole run. Valid choices: "
        f"lower {ACTOR}.ppo_mini_batch_size so that data.train_batch_size holds at least two mini-batches, "
        f"set {ACTOR}.ppo_epochs>=2, or use mtp_coef_mode=fixed"
    )


def check_occ_parallel_layout(config: Any, mtp: ExtendedMtpConfig) -> None:
    """OCC's sums must cover every rank whose gradients are summed.

    With dynamic context parallelism verl regroups ranks per micro-batch and the loss sees a
    data-parallel group that no longer spans the ranks sharing a sequence, so each rank would
    compute its own lambda while their gradients are added: refused.
    """
    if not (mtp.enable_train and mtp.mtp_loss_type == "rl" and mtp.mtp_coef_mode == "occ"):
        return
    key = f"{ACTOR}.megatron.dynamic_context_parallel"
    if bool(_select(config, key, False)):
        raise MtpConfigError(
            f"{MTP_KEY_PREFIX}.mtp_coef_mode='occ' is not supported with {key}=True: OCC's sums would not span "
            f"the ranks that share a sequence, so ranks would use different lambdas; valid choices: "
            f"{key}=False (static context parallelism is supported), or mtp_coef_mode=fixed"
        )


def check_run(config: Any, mtp: ExtendedMtpConfig) -> None:
    check_occ_schedule(config, mtp)
    check_occ_parallel_layout(config, mtp)
