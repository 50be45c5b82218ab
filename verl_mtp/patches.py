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
import inspect
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


# --- deferred patches: applied when verl imports the module (which imports megatron-core) ------


def _replace(owner: Any, attr: str, new: Any, restore: list) -> None:
    restore.append((owner, attr, getattr(owner, attr)))
    setattr(owner, attr, new)


def deferred_patch(name: str, description: str, targets: dict[str, Callable[[Any, list], None]]) -> Patch:
    """A Patch whose work runs when each module in ``targets`` is imported.

    ``targets[module_name](module, restore)`` does the replacements with ``_replace`` so that
    undo can put every original back; it raises PatchError when the module does not look as
    expected, which is reported like a failure at plugin load.
    """
    def apply_fn() -> dict:
        saved: dict = {"restore": [], "hooks": {}}
        for module_name, step in targets.items():
            hook = functools.partial(_run_deferred, name, step, saved["restore"])
            saved["hooks"][module_name] = hook
            when_imported(module_name, hook)
        return saved

    def undo_fn(saved: dict) -> None:
        for module_name, hook in saved["hooks"].items():
            cancel_when_imported(module_name, hook)
        for owner, attr, original in reversed(saved["restore"]):
            setattr(owner, attr, original)

    return Patch(name=name, description=description, apply_fn=apply_fn, undo_fn=undo_fn)


def _run_deferred(patch_name: str, step: Callable[[Any, list], None], restore: list, module: Any) -> None:
    try:
        step(module, restore)
    except Exception as exc:  # noqa: BLE001 - reported, never swallowed
        from verl_mtp.plugin import report_failure

        report_failure(patch_name, exc)


def _require(module: Any, attr: str) -> Any:
    value = getattr(module, attr, None)
    if value is None:
        raise PatchError(f"{module.__name__}.{attr} is missing")
    return value


# --- patch 3: the engine honours mtp.mtp_num_layers -------------------------------------------


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


def _patch_check_mtp_config(module: Any, restore: list) -> None:
    _replace(module, "check_mtp_config", _depth_override_check_mtp_config(_require(module, "check_mtp_config")), restore)


DEPTH_OVERRIDE = deferred_patch(
    "mtp_depth_override",
    "check_mtp_config validates the checkpoint's MTP depths and applies mtp.mtp_num_layers",
    {"verl.utils.megatron_utils": _patch_check_mtp_config},
)


# --- patch 4: the Megatron engine runs verl-mtp's MTP forward (both loss types) ---------------


def _mtp_forward_patch_engine_mtp(original: Callable) -> Callable:
    @functools.wraps(original)
    def patch_engine_mtp(module, model_config):
        from verl.models.mcore.mtp_patch import _get_patching_model

        from verl_mtp.config import as_extended
        from verl_mtp.megatron.mtp_forward import MtpForwardPlan, install_mtp_postprocess

        original(module, model_config)
        mtp = as_extended(model_config.mtp)
        if not mtp.enable_train:
            return
        for chunk in module if isinstance(module, list) else [module]:
            model = _get_patching_model(chunk)
            if model is None or getattr(model, "mtp", None) is None:
                continue
            depths = model.config.mtp_num_layers
            # ce keeps megatron's convention (the scaling factor split evenly over depths) so
            # beta = 1 reproduces verl's loss exactly.
            scale = model.config.mtp_loss_scaling_factor / depths
            plan = MtpForwardPlan(
                loss_type=mtp.mtp_loss_type,
                # standalone: no MTP gradient into the lm_head either (verl's 0.18 path leaks it)
                detach_output_layer=mtp.detach_encoder,
                ce_depth_scales=tuple(scale * w for w in mtp.step_weights(depths)),
                chunk_tokens=mtp.mtp_logits_chunk_tokens,
            )
            install_mtp_postprocess(model, plan)

    patch_engine_mtp.__verl_mtp_original__ = original
    return patch_engine_mtp


def _patch_megatron_engine(module: Any, restore: list) -> None:
    from verl_mtp.megatron.mtp_forward import logits_processor_with_mtp

    engine_cls = _require(module, "MegatronEngineWithLMHead")
    processor = getattr(engine_cls, "_lm_head_logits_processor", None)
    if processor is None or "temperature" not in inspect.signature(processor).parameters:
        raise PatchError("MegatronEngineWithLMHead._lm_head_logits_processor(logits, label, temperature, ...) not found")
    _replace(module, "patch_engine_mtp", _mtp_forward_patch_engine_mtp(_require(module, "patch_engine_mtp")), restore)
    _replace(engine_cls, "_lm_head_logits_processor", logits_processor_with_mtp(processor), restore)


MTP_FORWARD = deferred_patch(
    "mtp_forward",
    "the Megatron engine runs verl-mtp's MTP loss forward (regime-true detach, step weights) and returns "
    "per-depth MTP log-probs (rl) and draft agreement in model_output",
    {"verl.workers.engine.megatron.transformer_impl": _patch_megatron_engine},
)


# --- patch 5: the actor loss adds the MTP policy-loss term --------------------------------------


def _patch_loss_name(module: Any, restore: list) -> None:
    from verl_mtp.loss import MtpPolicyLoss, installed_policy_loss

    stock = _require(module, "ppo_loss")
    if not isinstance(stock, MtpPolicyLoss):
        _replace(module, "ppo_loss", installed_policy_loss(stock), restore)


MTP_POLICY_LOSS = deferred_patch(
    "mtp_policy_loss",
    "the actor's ppo_loss (and the distillation loss's) adds the MTP policy-loss term for mtp_loss_type=rl",
    # engine_workers binds `partial(ppo_loss, ...)` in init_model, reading this module global then.
    {"verl.workers.engine_workers": _patch_loss_name, "verl.trainer.distillation.losses": _patch_loss_name},
)


# --- patch 6: OCC over the whole mini-batch (occ_scope=mini_batch) ------------------------------


def _occ_prepass_train_batch(original: Callable) -> Callable:
    @functools.wraps(original)
    def train_batch(self, data, loss_function):
        from verl_mtp.loss import occ_prepass_target

        target = occ_prepass_target(loss_function)
        if target is None:
            return original(self, data, loss_function)
        policy_loss, config = target
        policy_loss.run_occ_prepass(self, data, config)  # fixes lambda for this mini-batch
        try:
            return original(self, data, loss_function)
        finally:
            policy_loss.end_occ_mini_batch(config)

    train_batch.__verl_mtp_original__ = original
    return train_batch


def _patch_engine_train_batch(module: Any, restore: list) -> None:
    engine_cls = _require(module, "BaseEngine")
    original = getattr(engine_cls, "train_batch", None)
    if original is None or list(inspect.signature(original).parameters) != ["self", "data", "loss_function"]:
        raise PatchError("BaseEngine.train_batch(self, data, loss_function) not found")
    _replace(engine_cls, "train_batch", _occ_prepass_train_batch(original), restore)


OCC_MINI_BATCH_PREPASS = deferred_patch(
    "occ_mini_batch_prepass",
    "with OCC and occ_scope=mini_batch the engine's train_batch first runs a no-grad forward of the "
    "mini-batch that fixes lambda from the whole global mini-batch",
    {"verl.workers.engine.base": _patch_engine_train_batch},
)


ALL_PATCHES = (
    EXTENDED_MTP_CONFIG,
    DRIVER_VALIDATION,
    DEPTH_OVERRIDE,
    MTP_FORWARD,
    MTP_POLICY_LOSS,
    OCC_MINI_BATCH_PREPASS,
)
