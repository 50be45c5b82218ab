"""Every change verl-mtp makes to verl, in one place.

Each patch is a ``Patch``: a name, the host versions it was written against, an ``apply`` that
checks the target still looks as expected before touching it, and an ``undo`` that restores the
original objects (tests use it). ``verl_mtp.plugin`` applies them; nothing else patches verl.

Patches on modules that import heavy dependencies (megatron-core) are deferred with
``when_imported`` so ``import verl`` stays cheap in processes that never build a model.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import inspect
import os
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from verl_mtp.version import installed_versions  # noqa: F401 - re-exported for plugin


# verl versions each patch was written and tested against. Others are refused (loudly) unless
# VERL_MTP_ALLOW_UNTESTED_VERL=1, because the patched internals are not a public API.
TESTED_VERL = ("0.9.1",)
ALLOW_UNTESTED_ENV = "VERL_MTP_ALLOW_UNTESTED_VERL"


class PatchError(RuntimeError):
    """A patch could not be applied; the message says what was expected and what was found."""


class PatchDeferred(Exception):
    """Not an error: the patch needs a verl_mtp module that is still being imported; that
    module applies the patch when it finishes (see the end of verl_mtp/config.py)."""


def check_verl_version() -> str:
    import verl

    found = str(getattr(verl, "__version__", "unknown"))
    if found in TESTED_VERL or os.environ.get(ALLOW_UNTESTED_ENV) == "1":
        return found
    raise PatchError(
        f"verl {found} is not a version verl-mtp was tested with (tested: {', '.join(TESTED_VERL)}); "
        f"install a tested verl or set {ALLOW_UNTESTED_ENV}=1 to try anyway"
    )


# megatron-core lines whose MTP internals verl-mtp's forward, loss and checkpoint code were built
# and tested against (0.16: legacy MTP API; 0.17+: process_mtp_loss).
SUPPORTED_MEGATRON_CORE = ">=0.16.0,<0.19"


def check_megatron_core_version() -> str:
    """The installed megatron-core version; PatchError when it is missing or outside the tested range."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    try:
        found = version("megatron-core")
    except PackageNotFoundError:
        raise PatchError("megatron-core is not installed; verl-mtp's MTP training needs megatron-core "
                         f"{SUPPORTED_MEGATRON_CORE}") from None
    if Version(found) not in SpecifierSet(SUPPORTED_MEGATRON_CORE):
        raise PatchError(
            f"megatron-core {found} is not a version verl-mtp supports ({SUPPORTED_MEGATRON_CORE}): its MTP "
            f"internals differ; install megatron-core{SUPPORTED_MEGATRON_CORE}"
        )
    return found


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

    def unfinished_targets(self) -> list[str]:
        """Target modules already imported in this process whose deferred step did not succeed."""
        if not self.applied:
            return []
        done = self._saved.get("done", set())
        return [m for m in self._saved.get("targets", ()) if m in sys.modules and m not in done]

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


_ABSENT = object()  # restore marker: the attribute did not exist before the patch


def _add(owner: Any, attr: str, new: Any, restore: list) -> None:
    """Add a new attribute (undo deletes it); refuses to shadow an existing one."""
    if hasattr(owner, attr):
        raise PatchError(f"{getattr(owner, '__qualname__', owner)}.{attr} already exists")
    restore.append((owner, attr, _ABSENT))
    setattr(owner, attr, new)


def deferred_patch(name: str, description: str, targets: dict[str, Callable[[Any, list], None]]) -> Patch:
    """A Patch whose work runs when each module in ``targets`` is imported.

    ``targets[module_name](module, restore)`` does the replacements with ``_replace`` so that
    undo can put every original back; it raises PatchError when the module does not look as
    expected, which is reported like a failure at plugin load.
    """
    def apply_fn() -> dict:
        # "done": the target modules whose step succeeded (read by plugin.require_patches).
        saved: dict = {"restore": [], "hooks": {}, "targets": tuple(targets), "done": set()}
        for module_name, step in targets.items():
            hook = functools.partial(_run_deferred, name, step, saved, module_name)
            saved["hooks"][module_name] = hook
            when_imported(module_name, hook)
        return saved

    def undo_fn(saved: dict) -> None:
        for module_name, hook in saved["hooks"].items():
            cancel_when_imported(module_name, hook)
        for owner, attr, original in reversed(saved["restore"]):
            if original is _ABSENT:
                delattr(owner, attr)
            else:
                setattr(owner, attr, original)

    return Patch(name=name, description=description, apply_fn=apply_fn, undo_fn=undo_fn)


def _run_deferred(patch_name: str, step: Callable[[Any, list], None], saved: dict, module_name: str, module: Any) -> None:
    try:
        step(module, saved["restore"])
        saved["done"].add(module_name)
    except Exception as exc:  # noqa: BLE001 - reported now, fatal for a run that needs it
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

        from verl_mtp.plugin import require_patches

        mtp = as_extended(model_config.mtp)
        require_patches(mtp, "the Megatron engine's initialisation")
        original(module, model_config)
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


# --- patch 6: OCC's update schedule and its mini-batch pre-pass ---------------------------------
# OCC must know which mini-batch of a step is the on-policy one (the first: no optimizer step since
# the old log-probs), and with occ_scope=mini_batch it fixes lambda from a no-grad pass first.


def _occ_train_mini_batch(original: Callable) -> Callable:
    @functools.wraps(original)
    def train_mini_batch(self, data):
        from verl_mtp.loss import actor_update_step

        with actor_update_step(self.loss_fn):
            return original(self, data)

    train_mini_batch.__verl_mtp_original__ = original
    return train_mini_batch


def _occ_train_batch(original: Callable) -> Callable:
    @functools.wraps(original)
    def train_batch(self, data, loss_function):
        from verl_mtp.loss import train_batch_with_occ

        return train_batch_with_occ(self, data, loss_function, lambda: original(self, data, loss_function))

    train_batch.__verl_mtp_original__ = original
    return train_batch


def _patch_engine_train_batch(module: Any, restore: list) -> None:
    engine_cls = _require(module, "BaseEngine")
    original = getattr(engine_cls, "train_batch", None)
    if original is None or list(inspect.signature(original).parameters) != ["self", "data", "loss_function"]:
        raise PatchError("BaseEngine.train_batch(self, data, loss_function) not found")
    _replace(engine_cls, "train_batch", _occ_train_batch(original), restore)


def _patch_worker_train_mini_batch(module: Any, restore: list) -> None:
    worker_cls = _require(module, "TrainingWorker")
    original = getattr(worker_cls, "train_mini_batch", None)
    if original is None or list(inspect.signature(original).parameters) != ["self", "data"]:
        raise PatchError("TrainingWorker.train_mini_batch(self, data) not found")
    _replace(worker_cls, "train_mini_batch", _occ_train_mini_batch(original), restore)


OCC_UPDATE_SCHEDULE = deferred_patch(
    "occ_update_schedule",
    "with OCC, verl's mini-batch loop marks each step so the on-policy first mini-batch is known; with "
    "occ_scope=mini_batch the engine's train_batch first runs a no-grad forward of the mini-batch that "
    "fixes lambda from the whole global mini-batch",
    {"verl.workers.engine.base": _patch_engine_train_batch, "verl.workers.engine_workers": _patch_worker_train_mini_batch},
)


# --- patch 7: MTP-aware Megatron checkpoints (manifest on save, checks on load) ---------------
# verl's trainer.checkpoint_callback_class runs on the driver after the save, so it can neither
# stop an incomplete save from being marked complete nor check a load; these wrap the manager.


def _check_params(owner: type, method: str, expected: list[str], keyword_only: bool = False) -> Callable:
    function = getattr(owner, method, None)
    if function is None:
        raise PatchError(f"{owner.__module__}.{owner.__qualname__}.{method} is missing")
    params = inspect.signature(function).parameters
    names = [n for n, p in params.items() if (p.kind == p.KEYWORD_ONLY) == keyword_only and n != "self"]
    if names[: len(expected)] != expected:
        raise PatchError(f"{owner.__qualname__}.{method}({', '.join(params)}) is not the expected ({', '.join(expected)}, ...)")
    return function


def _mtp_manager_save(original: Callable) -> Callable:
    @functools.wraps(original)
    def save_checkpoint(self, local_path, hdfs_path=None, global_step=0, max_ckpt_to_keep=None):
        from verl_mtp.ckpt.mtp_manifest import prepare_mtp_save

        prepare_mtp_save(self, local_path, global_step)
        return original(self, local_path, hdfs_path=hdfs_path, global_step=global_step, max_ckpt_to_keep=max_ckpt_to_keep)

    save_checkpoint.__verl_mtp_original__ = original
    return save_checkpoint


def _mtp_manager_finalize(original: Callable) -> Callable:
    @functools.wraps(original)
    def _finalize_save(self, **kwargs):
        from verl_mtp.ckpt.mtp_manifest import commit_mtp_manifest

        commit_mtp_manifest(self, kwargs["local_path"])  # before verl's ckpt_contents.json marks it complete
        return original(self, **kwargs)

    _finalize_save.__verl_mtp_original__ = original
    return _finalize_save


def _mtp_manager_load(original: Callable) -> Callable:
    @functools.wraps(original)
    def load_checkpoint(self, local_path, hdfs_path=None, del_local_after_load=False):
        from verl_mtp.ckpt.mtp_manifest import check_mtp_resume, finish_mtp_resume, fresh_head_load

        plan = check_mtp_resume(self, local_path)
        with fresh_head_load(self) if plan.fresh_head else contextlib.nullcontext():
            result = original(self, local_path, hdfs_path=hdfs_path, del_local_after_load=del_local_after_load)
        finish_mtp_resume(self, plan)
        return result

    load_checkpoint.__verl_mtp_original__ = original
    return load_checkpoint


def _patch_checkpoint_manager(module: Any, restore: list) -> None:
    manager = _require(module, "MegatronCheckpointManager")
    save = _check_params(manager, "save_checkpoint", ["local_path", "hdfs_path", "global_step", "max_ckpt_to_keep"])
    load = _check_params(manager, "load_checkpoint", ["local_path", "hdfs_path", "del_local_after_load"])
    finalize = _check_params(manager, "_finalize_save", ["local_path"], keyword_only=True)
    for attr in ("_build_model_sharded_state_dict", "_build_sharded_state_dict_metadata", "should_save_dist_ckpt_model"):
        _require(manager, attr)
    _replace(manager, "save_checkpoint", _mtp_manager_save(save), restore)
    _replace(manager, "_finalize_save", _mtp_manager_finalize(finalize), restore)
    _replace(manager, "load_checkpoint", _mtp_manager_load(load), restore)


def _engine_attaches_mtp_config(original: Callable) -> Callable:
    @functools.wraps(original)
    def method(self, *args, **kwargs):
        from verl_mtp.ckpt.mtp_manifest import MTP_CONFIG_ATTR

        manager = getattr(self, "checkpoint_mananager", None)  # sic: verl's attribute name
        if manager is not None:
            setattr(manager, MTP_CONFIG_ATTR, self.model_config.mtp)
        return original(self, *args, **kwargs)

    method.__verl_mtp_original__ = original
    return method


def _patch_engine_checkpoint(module: Any, restore: list) -> None:
    engine_cls = _require(module, "MegatronEngine")
    for name in ("save_checkpoint", "load_checkpoint"):
        _replace(engine_cls, name, _engine_attaches_mtp_config(_check_params(engine_cls, name, ["local_path"])), restore)


MTP_CHECKPOINT = deferred_patch(
    "mtp_checkpoint",
    "Megatron checkpoints carry mtp_manifest.json (MTP tensors, regime, OCC state) and refuse to claim a "
    "save complete, or to load, when MTP tensors are missing or mis-shaped",
    {
        "verl.utils.checkpoint.megatron_checkpoint_manager": _patch_checkpoint_manager,
        "verl.workers.engine.megatron.transformer_impl": _patch_engine_checkpoint,
    },
)


# --- patch: the MTP drafter is verified after every weight sync (vLLM) ---------------------------


def _drafter_checked_update_weights(original: Callable) -> Callable:
    @functools.wraps(original)
    async def update_weights(self, weights, global_steps=None, wire_format="named_tensors", **kwargs):
        from verl_mtp.rollout.drafter_sync import vllm_adapter_update_weights

        return await vllm_adapter_update_weights(
            original, self, weights, global_steps=global_steps, wire_format=wire_format, **kwargs
        )

    update_weights.__verl_mtp_original__ = original
    return update_weights


def _patch_vllm_server_adapter(module: Any, restore: list) -> None:
    adapter = _require(module, "ServerAdapter")
    original = getattr(adapter, "update_weights", None)
    params = list(inspect.signature(original).parameters) if callable(original) else []
    if params[:4] != ["self", "weights", "global_steps", "wire_format"] or not inspect.iscoroutinefunction(
        getattr(adapter, "_execute_method", None)
    ):
        raise PatchError(
            "vllm_rollout.ServerAdapter.update_weights(self, weights, global_steps, wire_format, **kwargs) and "
            f"async _execute_method not found (update_weights parameters: {params})"
        )
    _replace(adapter, "update_weights", _drafter_checked_update_weights(original), restore)


def _recording_update_weights_from_ipc(original: Callable) -> Callable:
    @functools.wraps(original)
    def update_weights_from_ipc(self, *args, **kwargs):
        from verl_mtp.rollout.drafter_sync import vllm_worker_begin_sync, vllm_worker_end_sync

        vllm_worker_begin_sync(self)
        try:
            return original(self, *args, **kwargs)
        finally:
            vllm_worker_end_sync(self)

    update_weights_from_ipc.__verl_mtp_original__ = original
    return update_weights_from_ipc


def _drafter_sync_report(self):
    from verl_mtp.rollout.drafter_sync import vllm_worker_drafter_report

    return vllm_worker_drafter_report(self)


def _patch_vllm_worker_extension(module: Any, restore: list) -> None:
    from verl_mtp.rollout.drafter_sync import VLLM_REPORT_METHOD

    extension = _require(module, "vLLMColocateWorkerExtension")
    original = getattr(extension, "update_weights_from_ipc", None)
    # The recorder finds the drafter where verl's own helper does (model_runner.drafter.model).
    if not callable(original) or not callable(getattr(extension, "_get_drafter_model", None)):
        raise PatchError("vLLMColocateWorkerExtension.update_weights_from_ipc / _get_drafter_model not found")
    _replace(extension, "update_weights_from_ipc", _recording_update_weights_from_ipc(original), restore)
    # collective_rpc by method name: vLLM serialises a function argument only with
    # VLLM_ALLOW_INSECURE_SERIALIZATION on some versions, a name always works.
    _add(extension, VLLM_REPORT_METHOD, _drafter_sync_report, restore)


def _collective_rpc_body_kind_of_source(source: str) -> str:
    """'discards' when the method is one ``await self.engine.collective_rpc(...)`` statement,
    'returns' when it already returns that call, else 'unknown'."""
    import ast
    import textwrap

    tree = ast.parse(textwrap.dedent(source))
    body = [n for n in tree.body[0].body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
    if len(body) != 1 or not isinstance(body[0], (ast.Expr, ast.Return)):
        return "unknown"
    call = getattr(body[0].value, "value", None)  # Await(...).value
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr == "collective_rpc"):
        return "unknown"
    return "returns" if isinstance(body[0], ast.Return) else "discards"


async def _returning_collective_rpc(self, method, timeout=None, args=(), kwargs=None):
    return await self.engine.collective_rpc(method=method, timeout=timeout, args=args, kwargs=kwargs)


def _patch_vllm_http_server(module: Any, restore: list) -> None:
    # verl 0.9.1's vLLMHttpServer.collective_rpc awaits the engine's call and drops the workers'
    # results; the drafter check needs them back.
    server = _require(module, "vLLMHttpServer")
    original = getattr(server, "collective_rpc", None)
    params = list(inspect.signature(original).parameters) if callable(original) else []
    if params != ["self", "method", "timeout", "args", "kwargs"]:
        raise PatchError(f"vLLMHttpServer.collective_rpc(self, method, timeout, args, kwargs) not found (got {params})")
    kind = _collective_rpc_body_kind_of_source(inspect.getsource(original))
    if kind == "returns":
        return
    if kind != "discards":
        raise PatchError("vLLMHttpServer.collective_rpc is no longer a single `await self.engine.collective_rpc(...)`")
    _returning_collective_rpc.__verl_mtp_original__ = original
    _replace(server, "collective_rpc", _returning_collective_rpc, restore)


def _worker_update_weights_returning_drafter_metrics(original: Callable) -> Callable:
    @functools.wraps(original)  # keeps verl's @register dispatch attributes
    async def update_weights(self, global_steps=None, mode="auto"):
        from verl_mtp.rollout.drafter_sync import take_drafter_sync_metrics

        result = await original(self, global_steps=global_steps, mode=mode)
        metrics = take_drafter_sync_metrics()
        if not metrics:
            return result
        if result is None:
            return metrics
        return {**result, **metrics} if isinstance(result, dict) else result

    update_weights.__verl_mtp_original__ = original
    return update_weights


def _patch_actor_worker_update_weights(module: Any, restore: list) -> None:
    worker = _require(module, "ActorRolloutRefWorker")
    original = getattr(worker, "update_weights", None)
    params = list(inspect.signature(original).parameters) if callable(original) else []
    if params != ["self", "global_steps", "mode"] or not inspect.iscoroutinefunction(original):
        raise PatchError(f"ActorRolloutRefWorker.update_weights(self, global_steps, mode) (async) not found (got {params})")
    _replace(worker, "update_weights", _worker_update_weights_returning_drafter_metrics(original), restore)


# verl 0.9.1's naive (colocated) branch of CheckpointEngineManager.update_weights, which drops the
# workers' results; the replacement below does the same call and keeps them.
_NAIVE_SYNC_SOURCE = "ray.get(self.actor_wg.update_weights(global_steps=global_steps, mode=self.backend))"


def _manager_update_weights_keeping_worker_results(inner: Callable, auto_await: Callable) -> Callable:
    @functools.wraps(inner)
    async def update_weights(self, global_steps=None):
        if self.backend != "naive":
            return await inner(self, global_steps=global_steps)
        import ray

        from verl_mtp.rollout.drafter_sync import record_worker_sync_results

        record_worker_sync_results(ray.get(self.actor_wg.update_weights(global_steps=global_steps, mode=self.backend)))
        return {}

    return auto_await(update_weights)


def _patch_manager_naive_sync(module: Any, restore: list) -> None:
    from verl.utils.ray_utils import auto_await

    manager = _require(module, "CheckpointEngineManager")
    original = getattr(manager, "update_weights", None)
    inner = getattr(original, "__wrapped__", None)  # the coroutine function under verl's @auto_await
    if inner is None or not inspect.iscoroutinefunction(inner) or list(inspect.signature(inner).parameters) != [
        "self", "global_steps"
    ]:
        raise PatchError("CheckpointEngineManager.update_weights(self, global_steps) under @auto_await not found")
    source = inspect.getsource(inner)
    if _NAIVE_SYNC_SOURCE not in source or 'if self.backend == "naive":' not in source:
        raise PatchError(f"CheckpointEngineManager.update_weights no longer syncs the naive backend with {_NAIVE_SYNC_SOURCE}")
    patched = _manager_update_weights_keeping_worker_results(inner, auto_await)
    patched.__verl_mtp_original__ = original
    _replace(manager, "update_weights", patched, restore)


DRAFTER_SYNC_CHECK = deferred_patch(
    "drafter_sync_check",
    "after every vLLM weight sync the MTP drafter's received tensors are fingerprinted in each engine "
    "worker and compared with the trainer's (mtp.drafter_sync_check: auto | raise | warn | off); the "
    "verdict reaches the driver's step metrics as rollout/mtp_drafter_in_sync (colocated sync)",
    {
        "verl.workers.rollout.vllm_rollout.vllm_rollout": _patch_vllm_server_adapter,
        "verl.workers.rollout.vllm_rollout.utils": _patch_vllm_worker_extension,
        "verl.workers.rollout.vllm_rollout.vllm_async_server": _patch_vllm_http_server,
        "verl.workers.engine_workers": _patch_actor_worker_update_weights,
        "verl.checkpoint_engine.base": _patch_manager_naive_sync,
    },
)


# --- patch 9: exact per-step speculative-decoding metrics and the adaptive speculation policy ----
# verl computes its step metrics in plain module functions that both trainers (ray_trainer.fit and
# v1 trainer_base._compute_metrics) call once per step: compute_throughout_metrics (has the batch
# and timing_raw["gen"]) and then compute_spec_decode_metrics (has the per-request spec counts);
# their results are merged into the logged dict. LLMServerManager knows the replicas' addresses.


def _spec_throughput_metrics(original: Callable) -> Callable:
    @functools.wraps(original)
    def compute_throughout_metrics(batch, timing_raw, *args, **kwargs):
        from verl_mtp.rollout.spec_control import record_generation

        from verl_mtp.rollout.drafter_sync import pop_driver_drafter_metrics

        result = original(batch, timing_raw, *args, **kwargs)
        record_generation(batch, timing_raw)
        # the drafter check's verdict of this step's weight sync (patch drafter_sync_check)
        return {**result, **pop_driver_drafter_metrics()}

    compute_throughout_metrics.__verl_mtp_original__ = original
    return compute_throughout_metrics


def _spec_step_metrics(original: Callable) -> Callable:
    @functools.wraps(original)
    def compute_spec_decode_metrics(spec_drafts, spec_accepts, spec_verifies, non_padding_mask=None):
        from verl_mtp.rollout.spec_control import step_metrics_from_verl

        result = dict(original(spec_drafts, spec_accepts, spec_verifies, non_padding_mask))
        result.update(step_metrics_from_verl(spec_drafts, spec_accepts, spec_verifies, non_padding_mask))
        return result

    compute_spec_decode_metrics.__verl_mtp_original__ = original
    return compute_spec_decode_metrics


def _patch_trainer_metrics(module: Any, restore: list) -> None:
    throughput = _require(module, "compute_throughout_metrics")
    spec = _require(module, "compute_spec_decode_metrics")
    if list(inspect.signature(spec).parameters)[:3] != ["spec_drafts", "spec_accepts", "spec_verifies"]:
        raise PatchError(f"{module.__name__}.compute_spec_decode_metrics(spec_drafts, spec_accepts, spec_verifies, ...) not found")
    if list(inspect.signature(throughput).parameters)[:2] != ["batch", "timing_raw"]:
        raise PatchError(f"{module.__name__}.compute_throughout_metrics(batch, timing_raw, ...) not found")
    _replace(module, "compute_throughout_metrics", _spec_throughput_metrics(throughput), restore)
    _replace(module, "compute_spec_decode_metrics", _spec_step_metrics(spec), restore)


def _spec_register_servers(original: Callable) -> Callable:
    @functools.wraps(original)
    async def _init_global_load_balancer(self, *args, **kwargs):
        from verl_mtp.rollout.spec_control import register_server_manager

        result = await original(self, *args, **kwargs)
        register_server_manager(self)
        return result

    _init_global_load_balancer.__verl_mtp_original__ = original
    return _init_global_load_balancer


def _patch_server_manager(module: Any, restore: list) -> None:
    manager = _require(module, "LLMServerManager")
    original = getattr(manager, "_init_global_load_balancer", None)
    if original is None or not inspect.iscoroutinefunction(original):
        raise PatchError("LLMServerManager._init_global_load_balancer (async) not found")
    _replace(manager, "_init_global_load_balancer", _spec_register_servers(original), restore)


SPEC_STEP_METRICS = deferred_patch(
    "spec_step_metrics",
    "per-step speculative-decoding metrics summed exactly over rollout replicas (rollout/mtp_spec_*, "
    "rollout/mtp_gen_throughput), the acceptance-collapse watch and the adaptive speculation policy",
    {
        "verl.trainer.ppo.ray_trainer": _patch_trainer_metrics,
        "verl.trainer.ppo.v1.trainer_base": _patch_trainer_metrics,
        "verl.workers.rollout.llm_server": _patch_server_manager,
    },
)


# --- patch: corrected mbridge bridges and MTP-complete HF exports (vanilla mbridge / Megatron-Bridge)


class _RegistryEntries:
    """Attribute view of mbridge's model registry dict, so ``_replace`` (and undo) can swap
    entries in place: ``mbridge.core.auto_bridge`` holds a reference to the same dict."""

    def __init__(self, registry: dict):
        object.__setattr__(self, "_registry", registry)

    def __getattr__(self, model_type: str):
        return self._registry.get(model_type)

    def __setattr__(self, model_type: str, cls: Any) -> None:
        if cls is None:
            self._registry.pop(model_type, None)
        else:
            self._registry[model_type] = cls


def _patch_mbridge_registry(module: Any, restore: list) -> None:
    from mbridge.core import bridge as mbridge_core

    from verl_mtp.models.bridges import REGISTERED_MODEL_TYPES, bridge_classes

    registry = getattr(mbridge_core, "_MODEL_REGISTRY", None)
    if not isinstance(registry, dict) or not callable(getattr(mbridge_core, "register_model", None)):
        raise PatchError("mbridge.core.bridge._MODEL_REGISTRY / register_model not found")
    entries = _RegistryEntries(registry)
    for model_type, key in REGISTERED_MODEL_TYPES.items():
        new = bridge_classes()[key]
        if registry.get(model_type) is not new:
            _replace(entries, model_type, new, restore)


def _patch_mbridge_model_type(module: Any, restore: list) -> None:
    from verl_mtp.models.mbridge_compat import model_type_for_mbridge

    if getattr(module, "ModelType", None) is None or not callable(getattr(module, "get_model", None)):
        raise PatchError("mbridge.core.util.ModelType / get_model not found")
    compat = model_type_for_mbridge()
    if compat is not None:  # megatron-core 0.18+: the member mbridge compares with is gone
        _replace(module, "ModelType", compat, restore)


def _checked_per_tensor_param(original: Callable) -> Callable:
    @functools.wraps(original)
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

    get_per_tensor_param.__verl_mtp_original__ = original
    return get_per_tensor_param


def _patch_engine_weight_export(module: Any, restore: list) -> None:
    engine_cls = _require(module, "MegatronEngine")
    original = _check_params(engine_cls, "get_per_tensor_param", ["base_sync_done"])
    _replace(engine_cls, "get_per_tensor_param", _checked_per_tensor_param(original), restore)


def _checked_hf_save(original: Callable) -> Callable:
    @functools.wraps(original)
    def _save_model_as_hf_via_bridge(self, hf_ckpt_path, *args, **kwargs):
        from verl_mtp.models.export_check import finish_hf_save

        result = original(self, hf_ckpt_path, *args, **kwargs)
        if getattr(self, "peft_cls", None) is None:
            # every rank calls this method: rank 0 fixes config.json's depths and checks the files,
            # every rank raises on a failed check
            finish_hf_save(hf_ckpt_path, self.model, self.bridge, self.hf_config)
        return result

    _save_model_as_hf_via_bridge.__verl_mtp_original__ = original
    return _save_model_as_hf_via_bridge


def _patch_manager_hf_save(module: Any, restore: list) -> None:
    manager = _require(module, "MegatronCheckpointManager")
    original = _check_params(manager, "_save_model_as_hf_via_bridge", ["hf_ckpt_path"])
    _replace(manager, "_save_model_as_hf_via_bridge", _checked_hf_save(original), restore)


MTP_COMPLETE_EXPORT = deferred_patch(
    "mtp_complete_export",
    "mbridge gets verl-mtp's MTP-complete bridges (MiMo half swap, DeepSeek-V3 any depth, GLM-4.5 MTP block) "
    "and builds models on megatron-core 0.18 (ModelType.encoder_and_decoder is gone there); "
    "every HF export (rollout weight sync, model/huggingface) is checked to carry every MTP tensor, and "
    "config.json declares the model's MTP depths",
    {
        "mbridge": _patch_mbridge_registry,
        "mbridge.core.util": _patch_mbridge_model_type,
        "verl.workers.engine.megatron.transformer_impl": _patch_engine_weight_export,
        "verl.utils.checkpoint.megatron_checkpoint_manager": _patch_manager_hf_save,
    },
)


ALL_PATCHES = (
    EXTENDED_MTP_CONFIG,
    DRIVER_VALIDATION,
    DEPTH_OVERRIDE,
    MTP_FORWARD,
    MTP_POLICY_LOSS,
    OCC_UPDATE_SCHEDULE,
    MTP_CHECKPOINT,
    DRAFTER_SYNC_CHECK,
    SPEC_STEP_METRICS,
    MTP_COMPLETE_EXPORT,
)
