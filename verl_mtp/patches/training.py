"""Training patches on verl's Megatron engine and actor: MTP depths, the MTP forward, the MTP
policy-loss term and OCC's update schedule. The logic lives in verl_mtp.megatron.engine_depths,
verl_mtp.megatron.mtp_forward and verl_mtp.loss."""

from __future__ import annotations

from typing import Any, Callable

from verl_mtp.patches.config import mtp_enabled
from verl_mtp.patches.core import (
    PatchError,
    deferred_patch,
    mark_original,
    parameter_names,
    replace,
    require_attr,
    require_patches,
    wraps_original,
)


def mtp_trained(mtp: Any) -> bool:
    return bool(mtp.enable and mtp.enable_train)


def occ_trained(mtp: Any) -> bool:
    return mtp_trained(mtp) and mtp.mtp_coef_mode == "occ"


# --- 3. mtp_depth_override: the engine honours mtp.mtp_num_layers -------------------------------


def _check_mtp_config_with_depths(original: Callable) -> Callable:
    @wraps_original(original)
    def check_mtp_config(model_config, engine_config):
        from verl_mtp.megatron.engine_depths import override_mtp_depths, requested_mtp_depths

        depths = requested_mtp_depths(model_config)
        original(model_config, engine_config)
        override_mtp_depths(engine_config, depths)

    return check_mtp_config


def _wrap_check_mtp_config(module: Any, restore: list) -> None:
    replace(module, "check_mtp_config", _check_mtp_config_with_depths(require_attr(module, "check_mtp_config")), restore)


DEPTH_OVERRIDE = deferred_patch(
    "mtp_depth_override",
    "check_mtp_config validates the checkpoint's MTP depths and applies mtp.mtp_num_layers",
    {"verl.utils.megatron_utils": _wrap_check_mtp_config},
    needed_when=mtp_enabled,
)


# --- 4. mtp_forward: the Megatron engine runs verl-mtp's MTP forward (both loss types) ----------


def _patch_engine_mtp_installing_forward(original: Callable) -> Callable:
    @wraps_original(original)
    def patch_engine_mtp(module, model_config):
        from verl_mtp.config import as_extended
        from verl_mtp.megatron.mtp_forward import install_mtp_forward

        mtp = as_extended(model_config.mtp)
        require_patches(mtp, "the Megatron engine's initialisation")
        original(module, model_config)
        install_mtp_forward(module, mtp)

    return patch_engine_mtp


def _wrap_megatron_engine(module: Any, restore: list) -> None:
    from verl_mtp.megatron.mtp_forward import logits_processor_with_mtp

    engine_cls = require_attr(module, "MegatronEngineWithLMHead")
    processor = getattr(engine_cls, "_lm_head_logits_processor", None)
    if "temperature" not in parameter_names(processor):
        raise PatchError("MegatronEngineWithLMHead._lm_head_logits_processor(logits, label, temperature, ...) not found")
    replace(module, "patch_engine_mtp", _patch_engine_mtp_installing_forward(require_attr(module, "patch_engine_mtp")), restore)
    replace(engine_cls, "_lm_head_logits_processor", mark_original(logits_processor_with_mtp(processor), processor), restore)


MTP_FORWARD = deferred_patch(
    "mtp_forward",
    "the Megatron engine runs verl-mtp's MTP loss forward (regime-true detach, step weights) and returns "
    "per-depth MTP log-probs (rl) and draft agreement in model_output",
    {"verl.workers.engine.megatron.transformer_impl": _wrap_megatron_engine},
    needed_when=mtp_trained,
)


# --- 5. mtp_policy_loss: the actor loss adds the MTP policy-loss term ----------------------------


def _install_policy_loss(module: Any, restore: list) -> None:
    from verl_mtp.loss import MtpPolicyLoss, installed_policy_loss

    stock = require_attr(module, "ppo_loss")
    if not isinstance(stock, MtpPolicyLoss):
        replace(module, "ppo_loss", installed_policy_loss(stock), restore)


MTP_POLICY_LOSS = deferred_patch(
    "mtp_policy_loss",
    "the actor's ppo_loss (and the distillation loss's) adds the MTP policy-loss term for mtp_loss_type=rl",
    # engine_workers binds `partial(ppo_loss, ...)` in init_model, reading this module global then.
    {"verl.workers.engine_workers": _install_policy_loss, "verl.trainer.distillation.losses": _install_policy_loss},
    needed_when=mtp_trained,
)


# --- 6. occ_update_schedule: OCC's update schedule and its mini-batch pre-pass -------------------
# OCC must know which mini-batch of a step is the on-policy one (the first: no optimizer step since
# the old log-probs), and with occ_scope=mini_batch it fixes lambda from a no-grad pass first.


def _train_mini_batch_in_update_step(original: Callable) -> Callable:
    @wraps_original(original)
    def train_mini_batch(self, data):
        from verl_mtp.loss import actor_update_step

        with actor_update_step(self.loss_fn):
            return original(self, data)

    return train_mini_batch


def _train_batch_with_occ(original: Callable) -> Callable:
    @wraps_original(original)
    def train_batch(self, data, loss_function):
        from verl_mtp.loss import train_batch_with_occ

        return train_batch_with_occ(self, data, loss_function, lambda: original(self, data, loss_function))

    return train_batch


def _wrap_engine_train_batch(module: Any, restore: list) -> None:
    engine_cls = require_attr(module, "BaseEngine")
    original = getattr(engine_cls, "train_batch", None)
    if parameter_names(original) != ["self", "data", "loss_function"]:
        raise PatchError("BaseEngine.train_batch(self, data, loss_function) not found")
    replace(engine_cls, "train_batch", _train_batch_with_occ(original), restore)


def _wrap_worker_train_mini_batch(module: Any, restore: list) -> None:
    worker_cls = require_attr(module, "TrainingWorker")
    original = getattr(worker_cls, "train_mini_batch", None)
    if parameter_names(original) != ["self", "data"]:
        raise PatchError("TrainingWorker.train_mini_batch(self, data) not found")
    replace(worker_cls, "train_mini_batch", _train_mini_batch_in_update_step(original), restore)


OCC_UPDATE_SCHEDULE = deferred_patch(
    "occ_update_schedule",
    "with OCC, verl's mini-batch loop marks each step so the on-policy first mini-batch is known; with "
    "occ_scope=mini_batch the engine's train_batch first runs a no-grad forward of the mini-batch that "
    "fixes lambda from the whole global mini-batch",
    {"verl.workers.engine.base": _wrap_engine_train_batch, "verl.workers.engine_workers": _wrap_worker_train_mini_batch},
    needed_when=occ_trained,
)
