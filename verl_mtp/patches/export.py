"""Export patch: mbridge gets verl-mtp's MTP-complete bridges (verl_mtp.models.bridges) and builds
models on megatron-core 0.18 (verl_mtp.models.mbridge_compat); every HF export is checked to carry
every MTP tensor (verl_mtp.models.export_check)."""

from __future__ import annotations

from typing import Any, Callable

from verl_mtp.patches.config import mtp_enabled
from verl_mtp.patches.core import MappingItems, PatchError, check_params, deferred_patch, replace, require_attr, wraps_original

# --- 10. mtp_complete_export: MTP-complete bridges and HF exports (vanilla mbridge / Megatron-Bridge)


def _register_mtp_bridges(module: Any, restore: list) -> None:
    from mbridge.core import bridge as mbridge_core

    from verl_mtp.models.bridges import REGISTERED_MODEL_TYPES, bridge_classes

    registry = getattr(mbridge_core, "_MODEL_REGISTRY", None)
    if not isinstance(registry, dict) or not callable(getattr(mbridge_core, "register_model", None)):
        raise PatchError("mbridge.core.bridge._MODEL_REGISTRY / register_model not found")
    # swapped in place: mbridge.core.auto_bridge holds a reference to the same dict
    entries = MappingItems(registry)
    for model_type, key in REGISTERED_MODEL_TYPES.items():
        if registry.get(model_type) is not bridge_classes()[key]:
            replace(entries, model_type, bridge_classes()[key], restore)


def _mbridge_model_type_for_megatron(module: Any, restore: list) -> None:
    from verl_mtp.models.mbridge_compat import model_type_for_mbridge

    if getattr(module, "ModelType", None) is None or not callable(getattr(module, "get_model", None)):
        raise PatchError("mbridge.core.util.ModelType / get_model not found")
    compat = model_type_for_mbridge()
    if compat is not None:  # megatron-core 0.18+: the member mbridge compares with is gone
        replace(module, "ModelType", compat, restore)


def _checked_per_tensor_param(original: Callable) -> Callable:
    @wraps_original(original)
    def get_per_tensor_param(self, *args, **kwargs):
        from verl_mtp.models.export_check import checked_export

        per_tensor_param, peft_config = original(self, *args, **kwargs)
        # LoRA adapter streams and QAT-quantised streams carry other tensors than the HF model.
        if getattr(self, "peft_cls", None) is None and not getattr(self, "_qat_enabled", False):
            per_tensor_param = checked_export(
                per_tensor_param, self.module, self.bridge, self.model_config.hf_config,
                where="weight sync to the rollout engine",
            )
        return per_tensor_param, peft_config

    return get_per_tensor_param


def _check_engine_weight_export(module: Any, restore: list) -> None:
    engine_cls = require_attr(module, "MegatronEngine")
    original = check_params(engine_cls, "get_per_tensor_param", ["base_sync_done"])
    replace(engine_cls, "get_per_tensor_param", _checked_per_tensor_param(original), restore)


def _checked_hf_save(original: Callable) -> Callable:
    @wraps_original(original)
    def _save_model_as_hf_via_bridge(self, hf_ckpt_path, *args, **kwargs):
        from verl_mtp.models.export_check import finish_hf_save

        result = original(self, hf_ckpt_path, *args, **kwargs)
        if getattr(self, "peft_cls", None) is None:
            # every rank calls this method: rank 0 fixes config.json's depths and checks the files,
            # every rank raises on a failed check
            finish_hf_save(hf_ckpt_path, self.model, self.bridge, self.hf_config)
        return result

    return _save_model_as_hf_via_bridge


def _check_manager_hf_save(module: Any, restore: list) -> None:
    manager = require_attr(module, "MegatronCheckpointManager")
    original = check_params(manager, "_save_model_as_hf_via_bridge", ["hf_ckpt_path"])
    replace(manager, "_save_model_as_hf_via_bridge", _checked_hf_save(original), restore)


MTP_COMPLETE_EXPORT = deferred_patch(
    "mtp_complete_export",
    "mbridge gets verl-mtp's MTP-complete bridges (MiMo half swap, DeepSeek-V3 any depth, GLM-4.5 MTP block) "
    "and builds models on megatron-core 0.18 (ModelType.encoder_and_decoder is gone there); "
    "every HF export (rollout weight sync, model/huggingface) is checked to carry every MTP tensor, and "
    "config.json declares the model's MTP depths",
    {
        "mbridge": _register_mtp_bridges,
        "mbridge.core.util": _mbridge_model_type_for_megatron,
        "verl.workers.engine.megatron.transformer_impl": _check_engine_weight_export,
        "verl.utils.checkpoint.megatron_checkpoint_manager": _check_manager_hf_save,
    },
    needed_when=mtp_enabled,
)
