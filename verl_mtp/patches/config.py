"""Config patches: verl builds verl-mtp's MTP config, and its driver validates the whole run."""

from __future__ import annotations

from typing import Any, Callable

from verl_mtp.patches.core import MappingItems, PatchError, deferred_patch, replace, require_attr, wraps_original


def mtp_enabled(mtp: Any) -> bool:
    return bool(mtp.enable)


# --- 1. extended_mtp_config: verl builds ExtendedMtpConfig wherever it builds an MtpConfig ------


def _retype_mtp_field(owner: type, new_type: type, restore: list) -> None:
    """Point ``owner.mtp`` at ``new_type`` for OmegaConf.structured (reads annotations + fields)."""
    dc_field = owner.__dataclass_fields__.get("mtp")
    if dc_field is None:
        raise PatchError(f"{owner.__module__}.{owner.__qualname__} has no dataclass field 'mtp'")
    replace(dc_field, "type", new_type, restore)
    replace(dc_field, "default_factory", new_type, restore)
    replace(MappingItems(owner.__annotations__), "mtp", new_type, restore)


def _use_extended_mtp_config(config_module: Any, restore: list) -> None:
    import verl.workers.config as config_pkg
    import verl.workers.config.model as model_mod
    import verl.workers.config.rollout as rollout_mod

    extended = require_attr(config_module, "ExtendedMtpConfig")
    if not issubclass(extended, model_mod.MtpConfig):
        raise PatchError("verl.workers.config.model.MtpConfig is not the class verl-mtp extends")
    owners = [model_mod.HFModelConfig, rollout_mod.RolloutConfig]
    for owner in owners:  # check both before changing either
        if owner.__dataclass_fields__.get("mtp") is None:
            raise PatchError(f"{owner.__module__}.{owner.__qualname__} has no dataclass field 'mtp'")
    for owner in owners:
        _retype_mtp_field(owner, extended, restore)
    # Hydra's `_target_: verl.workers.config.MtpConfig` and `from ... import MtpConfig` in modules
    # imported later both resolve through these module attributes.
    for module in (config_pkg, model_mod, rollout_mod):
        replace(module, "MtpConfig", extended, restore)


EXTENDED_MTP_CONFIG = deferred_patch(
    "extended_mtp_config",
    "actor_rollout_ref.model.mtp accepts verl-mtp's keys on the _target_ and structured paths",
    # verl_mtp.config imported first runs `import verl` (which loads the plugin) before it defines
    # ExtendedMtpConfig: the step then waits for that import to finish.
    {"verl_mtp.config": _use_extended_mtp_config},
    import_targets=True,
    needed_when=mtp_enabled,
)


# --- 2. driver_mtp_validation: the driver validates the MTP config before Ray starts -----------


def _validate_config_with_mtp(original: Callable) -> Callable:
    @wraps_original(original)
    def validate_config(config, *args, **kwargs):
        from verl_mtp.run_checks import validate_mtp_run_config

        validate_mtp_run_config(config)
        return original(config, *args, **kwargs)

    return validate_config


def _wrap_validate_config(config_mod: Any, restore: list) -> None:
    import verl.utils as utils_pkg

    original = getattr(config_mod, "validate_config", None)
    if not callable(original):
        raise PatchError("verl.utils.config.validate_config is missing")
    wrapped = _validate_config_with_mtp(original)
    # main_ppo does `from verl.utils.config import validate_config` at its own import, which
    # happens after `import verl` has loaded the plugin, so it picks up the wrapper.
    for module in (config_mod, utils_pkg):
        if getattr(module, "validate_config", None) is original:
            replace(module, "validate_config", wrapped, restore)


DRIVER_VALIDATION = deferred_patch(
    "driver_mtp_validation",
    "verl.utils.config.validate_config also validates the MTP config (in the driver, before Ray)",
    {"verl.utils.config": _wrap_validate_config},
    import_targets=True,
)
