"""Checkpoint patch: Megatron checkpoints carry and check the MTP tensors (verl_mtp.ckpt.mtp_manifest).

verl's trainer.checkpoint_callback_class runs on the driver after the save, so it can neither
stop an incomplete save from being marked complete nor check a load; these wrap the manager.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

from verl_mtp.patches.config import mtp_enabled
from verl_mtp.patches.core import check_params, deferred_patch, replace, require_attr, wraps_original

# --- 7. mtp_checkpoint: MTP-aware Megatron checkpoints (manifest on save, checks on load) -------


def _save_preparing_manifest(original: Callable) -> Callable:
    @wraps_original(original)
    def save_checkpoint(self, local_path, hdfs_path=None, global_step=0, max_ckpt_to_keep=None):
        from verl_mtp.ckpt.mtp_manifest import prepare_mtp_save

        prepare_mtp_save(self, local_path, global_step)
        return original(self, local_path, hdfs_path=hdfs_path, global_step=global_step, max_ckpt_to_keep=max_ckpt_to_keep)

    return save_checkpoint


def _finalize_committing_manifest(original: Callable) -> Callable:
    @wraps_original(original)
    def _finalize_save(self, **kwargs):
        from verl_mtp.ckpt.mtp_manifest import commit_mtp_manifest

        commit_mtp_manifest(self, kwargs["local_path"])  # before verl's ckpt_contents.json marks it complete
        return original(self, **kwargs)

    return _finalize_save


def _load_checking_mtp(original: Callable) -> Callable:
    @wraps_original(original)
    def load_checkpoint(self, local_path, hdfs_path=None, del_local_after_load=False):
        from verl_mtp.ckpt.mtp_manifest import check_mtp_resume, finish_mtp_resume, fresh_head_load

        plan = check_mtp_resume(self, local_path)
        with fresh_head_load(self) if plan.fresh_head else contextlib.nullcontext():
            result = original(self, local_path, hdfs_path=hdfs_path, del_local_after_load=del_local_after_load)
        finish_mtp_resume(self, plan)
        return result

    return load_checkpoint


def _wrap_checkpoint_manager(module: Any, restore: list) -> None:
    manager = require_attr(module, "MegatronCheckpointManager")
    save = check_params(manager, "save_checkpoint", ["local_path", "hdfs_path", "global_step", "max_ckpt_to_keep"])
    load = check_params(manager, "load_checkpoint", ["local_path", "hdfs_path", "del_local_after_load"])
    finalize = check_params(manager, "_finalize_save", ["local_path"], keyword_only=True)
    # what verl_mtp.ckpt.mtp_manifest reads from the manager
    for attr in ("_build_model_sharded_state_dict", "_build_sharded_state_dict_metadata", "should_save_dist_ckpt_model"):
        require_attr(manager, attr)
    replace(manager, "save_checkpoint", _save_preparing_manifest(save), restore)
    replace(manager, "_finalize_save", _finalize_committing_manifest(finalize), restore)
    replace(manager, "load_checkpoint", _load_checking_mtp(load), restore)


def _engine_attaches_mtp_config(original: Callable) -> Callable:
    @wraps_original(original)
    def method(self, *args, **kwargs):
        from verl_mtp.ckpt.mtp_manifest import MTP_CONFIG_ATTR

        manager = getattr(self, "checkpoint_mananager", None)  # sic: verl's attribute name
        if manager is not None:
            setattr(manager, MTP_CONFIG_ATTR, self.model_config.mtp)
        return original(self, *args, **kwargs)

    return method


def _wrap_engine_checkpoint(module: Any, restore: list) -> None:
    engine_cls = require_attr(module, "MegatronEngine")
    for name in ("save_checkpoint", "load_checkpoint"):
        replace(engine_cls, name, _engine_attaches_mtp_config(check_params(engine_cls, name, ["local_path"])), restore)


MTP_CHECKPOINT = deferred_patch(
    "mtp_checkpoint",
    "Megatron checkpoints carry mtp_manifest.json (MTP tensors, regime, OCC state) and refuse to claim a "
    "save complete, or to load, when MTP tensors are missing or mis-shaped",
    {
        "verl.utils.checkpoint.megatron_checkpoint_manager": _wrap_checkpoint_manager,
        "verl.workers.engine.megatron.transformer_impl": _wrap_engine_checkpoint,
    },
    needed_when=mtp_enabled,
)
