"""Every change verl-mtp makes to verl, in one place.

Each patch is a ``Patch``: a name, the host versions it was written against, an ``apply`` that
checks the target still looks as expected before touching it, and an ``undo`` that restores the
original objects (tests use it). ``verl_mtp.plugin`` applies them; nothing else patches verl.

Patches on modules that import heavy dependencies (megatron-core) are deferred with
``when_imported`` so ``import verl`` stays cheap in processes that never build a model.
"""

from __future__ import annotations

import functools
import importlib.abc
import os
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from packaging.version import Version

# verl versions each patch was written and tested against. Others are refused (loudly) unless
# VERL_MTP_ALLOW_UNTESTED_VERL=1, because the patched internals are not a public API.
TESTED_VERL = ("0.9.1",)
ALLOW_UNTESTED_ENV = "VERL_MTP_ALLOW_UNTESTED_VERL"


class PatchError(RuntimeError):
    """A patch could not be applied; the message says what was expected and what was found."""


class PatchDeferred(Exception):
    """Not an error: the patch needs a verl_mtp module that is still being imported; that
    module applies the patch when it finishes (see the end of verl_mtp/config.py)."""


def installed_versions() -> dict[str, str]:
    """Versions of the packages the patches depend on, for error reports."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for dist in ("verl-mtp", "verl", "megatron-core", "mbridge", "torch", "transformers"):
        try:
            found[dist] = version(dist)
        except PackageNotFoundError:
            found[dist] = "not installed"
    return found


def check_verl_version() -> str:
    import verl

    found = str(getattr(verl, "__version__", "unknown"))
    if found in TESTED_VERL or os.environ.get(ALLOW_UNTESTED_ENV) == "1":
        return found
    raise PatchError(
        f"verl {found} is not a version verl-mtp was tested with (tested: {', '.join(TESTED_VERL)}); "
        f"install a tested verl or set {ALLOW_UNTESTED_ENV}=1 to try anyway"
    )


@dataclass
class Patch:
    name: str
    description: str
    apply_fn: Callable[[], dict]
    undo_fn: Callable[[dict], None]
    _saved: dict | None = field(default=None, repr=False)
    _applying: bool = field(default=False, repr=False)

    @property
    def applied(self) -> bool:
        return self._saved is not None

    def apply(self) -> None:
        # Re-entrant calls happen: applying the config patch imports verl_mtp.config, whose last
        # lines re-run apply_patches() for the import-before-verl case.
        if self.applied or self._applying:
            return
        self._applying = True
        try:
            check_verl_version()
            self._saved = self.apply_fn()
        finally:
            self._applying = False

    def undo(self) -> None:
        if self.applied:
            self.undo_fn(self._saved)
            self._saved = None


# --- deferred patches: run a function right after a module is first imported -----------------

_post_import_hooks: dict[str, list[Callable[[Any], None]]] = {}
_hook_lock = threading.Lock()


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Wraps the loader of watched modules so hooks run once the module body has executed."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _post_import_hooks:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        original_exec = loader.exec_module

        def exec_module(module):
            original_exec(module)
            _run_hooks(fullname, module)

        loader.exec_module = exec_module  # loader objects are per-spec, so this is local
        return spec


_finder = _PostImportFinder()


def _run_hooks(name: str, module: Any) -> None:
    with _hook_lock:
        hooks = _post_import_hooks.pop(name, [])
    for hook in hooks:
        hook(module)


def when_imported(module_name: str, hook: Callable[[Any], None]) -> None:
    """Call ``hook(module)`` now if the module is imported, else right after its first import."""
    if module_name in sys.modules:
        hook(sys.modules[module_name])
        return
    with _hook_lock:
        _post_import_hooks.setdefault(module_name, []).append(hook)
        if _finder not in sys.meta_path:
            sys.meta_path.insert(0, _finder)


def cancel_when_imported(module_name: str, hook: Callable[[Any], None]) -> None:
    with _hook_lock:
        hooks = _post_import_hooks.get(module_name, [])
        if hook in hooks:
            hooks.remove(hook)
        if not hooks:
            _post_import_hooks.pop(module_name, None)


# --- patch 1: verl builds ExtendedMtpConfig wherever it builds an MtpConfig --------------------


def _retype_dataclass_field(owner: type, name: str, new_type: type) -> tuple:
    """Point ``owner.name`` at ``new_type`` for OmegaConf.structured (reads annotations + fields)."""
    dc_field = owner.__dataclass_fields__.get(name)
    if dc_field is None:
        raise PatchError(f"{owner.__module__}.{owner.__qualname__} has no dataclass field {name!r}")
    saved = (owner, name, dc_field.type, dc_field.default_factory, owner.__annotations__.get(name))
    dc_field.type = new_type
    dc_field.default_factory = new_type
    owner.__annotations__[name] = new_type
    return saved


def _apply_extended_mtp_config() -> dict:
    # `import verl_mtp.config` before verl runs `import verl`, which loads this plugin while
    # verl_mtp.config is half-initialised; the class does not exist yet.
    partial = sys.modules.get("verl_mtp.config")
    if partial is not None and not hasattr(partial, "ExtendedMtpConfig"):
        raise PatchDeferred("verl_mtp.config is being imported")

    import verl.workers.config as config_pkg
    import verl.workers.config.model as model_mod
    import verl.workers.config.rollout as rollout_mod

    from verl_mtp.config import ExtendedMtpConfig

    original = model_mod.MtpConfig
    if not issubclass(ExtendedMtpConfig, original):
        raise PatchError("verl.workers.config.model.MtpConfig is not the class verl-mtp extends")
    owners = [model_mod.HFModelConfig, rollout_mod.RolloutConfig]
    for owner in owners:
        if owner.__dataclass_fields__.get("mtp") is None:
            raise PatchError(f"{owner.__module__}.{owner.__qualname__} has no dataclass field 'mtp'")
    retyped = [_retype_dataclass_field(owner, "mtp", ExtendedMtpConfig) for owner in owners]
    # Hydra's `_target_: verl.workers.config.MtpConfig` and `from ... import MtpConfig` in modules
    # imported later both resolve through these module attributes.
    modules = [config_pkg, model_mod, rollout_mod]
    for module in modules:
        module.MtpConfig = ExtendedMtpConfig
    return {"original": original, "modules": modules, "retyped": retyped}


def _undo_extended_mtp_config(saved: dict) -> None:
    for module in saved["modules"]:
        module.MtpConfig = saved["original"]
    for owner, name, old_type, old_factory, old_annotation in saved["retyped"]:
        dc_field = owner.__dataclass_fields__[name]
        dc_field.type = old_type
        dc_field.default_factory = old_factory
        owner.__annotations__[name] = old_annotation


EXTENDED_MTP_CONFIG = Patch(
    name="extended_mtp_config",
    description="actor_rollout_ref.model.mtp accepts verl-mtp's keys on the _target_ and structured paths",
    apply_fn=_apply_extended_mtp_config,
    undo_fn=_undo_extended_mtp_config,
)


# --- patch 2: the driver validates the MTP config before Ray starts ----------------------------


def _mtp_aware_validate_config(original: Callable) -> Callable:
    @functools.wraps(original)
    def validate_config(config, *args, **kwargs):
        from verl_mtp.config import validate_mtp_run_config

        validate_mtp_run_config(config)
        return original(config, *args, **kwargs)

    validate_config.__verl_mtp_original__ = original
    return validate_config


def _apply_driver_validation() -> dict:
    import verl.utils as utils_pkg
    import verl.utils.config as config_mod

    original = getattr(config_mod, "validate_config", None)
    if not callable(original):
        raise PatchError("verl.utils.config.validate_config is missing")
    wrapped = _mtp_aware_validate_config(original)
    # main_ppo does `from verl.utils.config import validate_config` at its own import, which
    # happens after `import verl` has loaded this plugin, so it picks up the wrapper.
    modules = [m for m in (config_mod, utils_pkg) if getattr(m, "validate_config", None) is original]
    for module in modules:
        module.validate_config = wrapped
    return {"original": original, "modules": modules}


def _undo_driver_validation(saved: dict) -> None:
    for module in saved["modules"]:
        module.validate_config = saved["original"]


DRIVER_VALIDATION = Patch(
    name="driver_mtp_validation",
    description="verl.utils.config.validate_config also validates the MTP config (in the driver, before Ray)",
    apply_fn=_apply_driver_validation,
    undo_fn=_undo_driver_validation,
)


# --- patch 3: the engine honours mtp.mtp_num_layers (deferred: imports megatron-core) ----------


def _depth_override_check_mtp_config(original: Callable) -> Callable:
    @functools.wraps(original)
    def check_mtp_config(model_config, engine_config):
        from verl_mtp.config import as_extended, detect_mtp_depths, resolve_mtp_depths

        mtp = as_extended(model_config.mtp)
        # Resolve before verl zeroes the HF depth count (it does so when MTP is disabled).
        depths = resolve_mtp_depths(mtp, detect_mtp_depths(model_config.hf_config)) if mtp.enable else 0
        original(model_config, engine_config)
        if mtp.enable and mtp.mtp_num_layers is not None:
            engine_config.override_transformer_config["mtp_num_layers"] = depths

    check_mtp_config.__verl_mtp_original__ = original
    return check_mtp_config


def _patch_megatron_utils(module: Any, saved: dict) -> None:
    original = getattr(module, "check_mtp_config", None)
    if not callable(original):
        raise PatchError("verl.utils.megatron_utils.check_mtp_config is missing")
    module.check_mtp_config = _depth_override_check_mtp_config(original)
    saved["module"], saved["original"] = module, original


def _apply_depth_override() -> dict:
    saved: dict = {}
    saved["hook"] = functools.partial(_run_deferred, DEPTH_OVERRIDE, _patch_megatron_utils, saved)
    when_imported("verl.utils.megatron_utils", saved["hook"])
    return saved


def _undo_depth_override(saved: dict) -> None:
    cancel_when_imported("verl.utils.megatron_utils", saved["hook"])
    if "module" in saved:
        saved["module"].check_mtp_config = saved["original"]


DEPTH_OVERRIDE = Patch(
    name="mtp_depth_override",
    description="check_mtp_config validates the checkpoint's MTP depths and applies mtp.mtp_num_layers",
    apply_fn=_apply_depth_override,
    undo_fn=_undo_depth_override,
)


def _run_deferred(patch: Patch, fn: Callable[[Any, dict], None], saved: dict, module: Any) -> None:
    """Run a deferred patch step; a failure is reported as loudly as one at plugin load."""
    try:
        fn(module, saved)
    except Exception as exc:  # noqa: BLE001 - reported, never swallowed
        from verl_mtp.plugin import report_failure

        report_failure(patch.name, exc)


ALL_PATCHES = (EXTENDED_MTP_CONFIG, DRIVER_VALIDATION, DEPTH_OVERRIDE)
