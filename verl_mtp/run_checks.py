"""Whole-run checks of an MTP config against the rest of the run config (driver side, before Ray).

These need keys outside ``actor_rollout_ref.model.mtp`` (the strategy, the checkpoint's depths,
the rollout engine, distillation, the update schedule, the parallel layout), so they run in
``validate_mtp_run_config`` (the driver, through the plugin, and ``verl-mtp explain``), not in the
config class. Each raises MtpConfigError naming the keys, their values and what to change.
"""

from __future__ import annotations

from typing import Any, Optional

from verl_mtp.config import (
    MTP_KEY_PREFIX,
    SUPPORTED_STRATEGIES,
    ExtendedMtpConfig,
    MtpConfigError,
    as_extended,
    detect_mtp_depths,
    read_local_hf_config,
    resolve_mtp_depths,
    select,
)
from verl_mtp.errors import report_loudly
from verl_mtp.rollout.drafter_sync import (
    METRIC_CHECKED_FRACTION,
    METRIC_IN_SYNC,
    VLLM_DP_REPORTS_NOTE,
    DrafterSyncWarning,
)
from verl_mtp.rollout.spec_args import carry_into_engine_kwargs, plan_speculative_rollout

ACTOR = "actor_rollout_ref.actor"
ROLLOUT = "actor_rollout_ref.rollout"


def validate_mtp_run_config(config: Any) -> ExtendedMtpConfig:
    """Validate the MTP part of a full verl run config; return the resolved MTP config.

    Raises MtpConfigError naming the key, the bad value and the valid choices.
    """
    mtp = as_extended(select(config, "actor_rollout_ref.model.mtp"))
    if not mtp.enable:
        return mtp
    strategy = select(config, f"{ACTOR}.strategy")
    if strategy not in SUPPORTED_STRATEGIES:
        raise MtpConfigError(
            f"{MTP_KEY_PREFIX}.enable=True needs the Megatron engine, but {ACTOR}.strategy="
            f"{strategy!r}; valid choices are {', '.join(SUPPORTED_STRATEGIES)} "
            f"(use verl's ppo_megatron_trainer config or model_engine=megatron)"
        )
    if mtp.speculative_rollout:
        # The engine's speculative arguments for the model family and engine version.
        plan_speculative_rollout(config, mtp)
        carry_into_engine_kwargs(config, mtp)  # mtp.draft_sample_method -> where verl's merge reads it
        check_drafter_sync_run_config(config, mtp)
    resolve_run_depths(config, mtp)
    check_distillation(config, mtp)
    check_run(config, mtp)  # the update schedule and parallel layout OCC needs
    return mtp


# --- the checkpoint's MTP depths -----------------------------------------------------------------


def resolve_run_depths(config: Any, mtp: ExtendedMtpConfig) -> tuple[Optional[int], str]:
    """MTP depths a run will use and where that number comes from.

    Reads the checkpoint's ``config.json`` when the model path is local; otherwise the workers
    check it when they load the model (``check_mtp_config``), and the depth stays unknown here.
    """
    if not mtp.enable:
        return None, "MTP disabled"
    model_path = select(config, "actor_rollout_ref.model.hf_config_path") or select(
        config, "actor_rollout_ref.model.path"
    )
    hf_config = read_local_hf_config(model_path) if model_path else None
    if hf_config is None:
        return mtp.mtp_num_layers, f"not checked here: {model_path} has no local config.json (the workers check it)"
    found = detect_mtp_depths(hf_config)
    depths = resolve_mtp_depths(mtp, found)
    source = f"{model_path}/config.json declares {found}"
    if mtp.mtp_num_layers is not None:
        source += f"; mtp_num_layers={mtp.mtp_num_layers} overrides"
    return depths, source


# --- distillation ----------------------------------------------------------------------------------


def check_distillation(config: Any, mtp: ExtendedMtpConfig) -> None:
    # verl's distillation loss calls ppo_loss (which carries the MTP term) only when task rewards
    # are used, and its top-k path runs the loss function as a logits processor in the forward.
    if not mtp.uses_rl_loss or not select(config, "distillation.enabled", False):
        return
    if not select(config, "distillation.distillation_loss.use_task_rewards", True):
        raise MtpConfigError(
            f"{MTP_KEY_PREFIX}.mtp_loss_type='rl' is invalid with distillation.enabled=True and "
            f"distillation.distillation_loss.use_task_rewards=False: verl's distillation loss then drops the "
            f"policy loss, and the MTP policy-loss term with it; valid choices are mtp_loss_type=ce, or "
            f"use_task_rewards=True"
        )
    if mtp.needs_occ_prepass:
        raise MtpConfigError(
            f"{MTP_KEY_PREFIX}.occ_scope='mini_batch' is not supported with distillation.enabled=True (the "
            f"pre-pass cannot stand in for the distillation loss's top-k logits processor); valid choices "
            f"here are occ_scope=micro_batch, or mtp_coef_mode=fixed"
        )


# --- the drafter check: where it cannot be done --------------------------------------------------


def _drafter_unverifiable_reason(engine: Any, backend: Any) -> Optional[str]:
    if engine != "vllm":
        return (
            f"the drafter sync check is implemented for vLLM only; {ROLLOUT}.name={engine!r} "
            f"has no verl-mtp engine-side recorder yet"
        )
    if backend == "delta_sharded":
        return (
            "checkpoint_engine.backend='delta_sharded' sends sparse deltas, not whole tensors, so the drafter's "
            "MTP tensors cannot be fingerprinted"
        )
    return None


def check_drafter_sync_run_config(config: Any, mtp: ExtendedMtpConfig) -> None:
    """Fail early when ``drafter_sync_check=raise`` asks for a check this rollout path cannot do;
    warn loudly for ``auto``/``warn``. ``config`` is the whole run config."""
    if not mtp.checks_drafter_sync:
        return
    key = f"{MTP_KEY_PREFIX}.drafter_sync_check"
    mode = mtp.drafter_sync_check
    engine = select(config, f"{ROLLOUT}.name")
    backend = select(config, f"{ROLLOUT}.checkpoint_engine.backend", "naive")
    data_parallel = select(config, f"{ROLLOUT}.data_parallel_size", 1)
    reason = _drafter_unverifiable_reason(engine, backend)
    if reason is None and int(data_parallel) > 1:
        # Partly checkable: the verdict covers engine 0's workers only, and says so every sync.
        partial = (
            f"{ROLLOUT}.data_parallel_size={data_parallel}: {VLLM_DP_REPORTS_NOTE} "
            f"(its DPLBAsyncMPClient), so only 1 of the {data_parallel} engines' drafters can be checked"
        )
        if mode == "raise":
            raise MtpConfigError(
                f"{key}='raise' is invalid here: {partial}; valid choices are {key}=auto or warn (check engine "
                f"0's workers, never log {METRIC_IN_SYNC}=1 for the others, warn) or off, or data_parallel_size=1"
            )
        report_loudly(
            f"WARNING: the MTP drafter will be verified on data-parallel engine 0 only: {partial}. "
            f"{METRIC_IN_SYNC} is not logged as 1; {METRIC_CHECKED_FRACTION} shows the share checked.",
            DrafterSyncWarning,
        )
        return
    if reason is None:
        return
    if mode == "raise":
        raise MtpConfigError(
            f"{key}='raise' is invalid here: {reason}; valid choices are "
            f"{key}=auto or warn (run unverified, with a warning) or off"
        )
    report_loudly(f"WARNING: the MTP drafter will NOT be verified after weight syncs: {reason}.", DrafterSyncWarning)


# --- OCC: the update schedule and the parallel layout ------------------------------------------------


def mini_batches_per_step(config: Any) -> tuple[int, str]:
    """How many actor updates (mini-batches, over all epochs) one training step makes, and why.

    verl splits the step's batch (``data.train_batch_size`` prompts, each with ``rollout.n``
    responses) into mini-batches of ``ppo_mini_batch_size`` prompts, and repeats that
    ``ppo_epochs`` times.
    """
    train_batch = int(select(config, "data.train_batch_size", 0) or 0)
    mini_batch = int(select(config, f"{ACTOR}.ppo_mini_batch_size", 0) or 0)
    epochs = int(select(config, f"{ACTOR}.ppo_epochs", 1) or 1)
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
    if not mtp.uses_occ:
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
    if not mtp.uses_occ:
        return
    key = f"{ACTOR}.megatron.dynamic_context_parallel"
    if bool(select(config, key, False)):
        raise MtpConfigError(
            f"{MTP_KEY_PREFIX}.mtp_coef_mode='occ' is not supported with {key}=True: OCC's sums would not span "
            f"the ranks that share a sequence, so ranks would use different lambdas; valid choices: "
            f"{key}=False (static context parallelism is supported), or mtp_coef_mode=fixed"
        )


def check_decoupled_recompute(config: Any, mtp: ExtendedMtpConfig) -> None:
    """The decoupled split needs recomputed modules without parameters (engine init checks it too)."""
    if not mtp.is_decoupled:
        return
    from verl_mtp.megatron.decoupled import recompute_leak

    key = f"{ACTOR}.megatron.override_transformer_config"
    leak = recompute_leak(select(config, f"{key}.recompute_granularity", None), select(config, f"{key}.recompute_modules", None))
    if leak:
        raise MtpConfigError(f"{MTP_KEY_PREFIX}.mtp_training_mode='decoupled' does not fit {key}: {leak}")


def check_run(config: Any, mtp: ExtendedMtpConfig) -> None:
    check_occ_schedule(config, mtp)
    check_occ_parallel_layout(config, mtp)
    check_decoupled_recompute(config, mtp)
