"""The machinery every verl-mtp patch is built from, and the record of which patches are active.

A ``Patch`` has a name, an ``apply`` that checks its target still looks as expected before
touching it, and an ``undo`` that puts the very original objects back. Most patches are deferred
(``deferred_patch``): their steps run when verl imports the target module, so ``import verl``
stays cheap in processes that never build a model.

``require_patches`` is how a run that needs a patch refuses to go on without it; the loss and the
engine's initialisation call it. This module imports only ``verl_mtp.errors`` and
``verl_mtp.version`` so that any layer may ask.
"""

from __future__ import annotations

import functools
import importlib
import importlib.abc
import inspect
import os
import sys
import threading
import traceback
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from verl_mtp.errors import VerlMtpError, VerlMtpWarning, report_loudly
from verl_mtp.version import installed_versions

# verl versions the patches were written and tested against. Others are refused (loudly) unless
# VERL_MTP_ALLOW_UNTESTED_VERL=1, because the patched internals are not a public API.
TESTED_VERL = ("0.9.1",)
ALLOW_UNTESTED_ENV = "VERL_MTP_ALLOW_UNTESTED_VERL"
# megatron-core lines whose MTP internals the forward, loss and checkpoint code were built and
# tested against (0.16: legacy MTP API; 0.17+: process_mtp_loss).
SUPPORTED_MEGATRON_CORE = ">=0.16.0,<0.19"
# The plugin's allow/deny list of patches by name (read by verl_mtp.plugin).
PATCHES_ENV = "VERL_MTP_PATCHES"

ORIGINAL_ATTR = "__verl_mtp_original__"


class PatchError(VerlMtpError, RuntimeError):
    """A patch could not be applied; the message says what was expected and what was found."""


class PatchNotActiveError(VerlMtpError, RuntimeError):
    """A patch that the run's MTP config needs is not active in this process."""


class VerlMtpPluginWarning(VerlMtpWarning):
    """A patch failed to apply (the run stops later only if its config needs that patch)."""


def check_verl_version() -> str:
    import verl

    found = str(getattr(verl, "__version__", "unknown"))
    if found in TESTED_VERL or os.environ.get(ALLOW_UNTESTED_ENV) == "1":
        return found
    raise PatchError(
        f"verl {found} is not a version verl-mtp was tested with (tested: {', '.join(TESTED_VERL)}); "
        f"install a tested verl or set {ALLOW_UNTESTED_ENV}=1 to try anyway"
    )


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


# --- wrappers remember what they wrap ----------------------------------------------------------


def wraps_original(original: Callable) -> Callable[[Callable], Callable]:
    """``functools.wraps(original)`` that also records ``original`` on the wrapper, so undo,
    tests and ``original_of`` can reach verl's own function."""

    def decorate(wrapper: Callable) -> Callable:
        functools.wraps(original)(wrapper)
        return mark_original(wrapper, original)

    return decorate


def mark_original(wrapper: Callable, original: Callable) -> Callable:
    """Record ``original`` on a wrapper built without ``wraps_original``; returns the wrapper."""
    setattr(wrapper, ORIGINAL_ATTR, original)
    return wrapper


def original_of(function: Callable) -> Callable:
    """The function a verl-mtp wrapper replaced; PatchError when ``function`` is not one."""
    original = getattr(function, ORIGINAL_ATTR, None)
    if original is None:
        raise PatchError(f"{getattr(function, '__qualname__', function)!r} is not wrapped by a verl-mtp patch")
    return original


def is_patched(function: Callable) -> bool:
    return getattr(function, ORIGINAL_ATTR, None) is not None


# --- run a function right after a module is imported -------------------------------------------

_post_import_hooks: dict[str, list[Callable[[Any], None]]] = {}
_hook_lock = threading.Lock()


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Wraps the loader of watched modules so hooks run once the module body has executed."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _post_import_hooks:
            return None
        spec = _spec_from_other_finders(self, fullname, path, target)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        original_exec = loader.exec_module

        def exec_module(module):
            original_exec(module)
            _run_hooks(fullname, module)

        loader.exec_module = exec_module  # loader objects are per-spec, so this is local
        return spec


def _spec_from_other_finders(finder: Any, fullname: str, path: Any, target: Any) -> Any:
    for other in sys.meta_path:
        if other is not finder and hasattr(other, "find_spec"):
            spec = other.find_spec(fullname, path, target)
            if spec is not None:
                return spec
    return None


_finder = _PostImportFinder()


class _BindingWatch(types.ModuleType):
    """Swapped onto a package while one of its submodules is half-imported: the import system
    binds a submodule to its package only once the submodule's body has run, which is the cue."""

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        full = f"{self.__name__}.{name}"
        if isinstance(value, types.ModuleType) and value.__name__ == full:
            _run_hooks(full, value)


_watched_packages: dict[str, type] = {}  # package -> its module class before the watch


def _importing(module: Any) -> bool:
    # True between the import system putting the module in sys.modules and its body finishing.
    return bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


def _watch_package_of(module_name: str) -> None:
    package = sys.modules.get(module_name.rpartition(".")[0])
    if package is None:
        raise PatchError(f"{module_name} is being imported and has no imported package to watch")
    if package.__name__ not in _watched_packages:
        _watched_packages[package.__name__] = type(package)
        package.__class__ = _BindingWatch


def _unwatch_idle_packages() -> None:
    for name, cls in list(_watched_packages.items()):
        if not any(hooked.startswith(name + ".") for hooked in _post_import_hooks):
            sys.modules[name].__class__ = _watched_packages.pop(name)


def _run_hooks(name: str, module: Any) -> None:
    with _hook_lock:
        hooks = _post_import_hooks.pop(name, [])
        _unwatch_idle_packages()
    for hook in hooks:
        hook(module)


def when_imported(module_name: str, hook: Callable[[Any], None]) -> None:
    """Call ``hook(module)`` now if the module is imported, else right after its import finishes."""
    module = sys.modules.get(module_name)
    if module is not None and not _importing(module):
        hook(module)
        return
    with _hook_lock:
        _post_import_hooks.setdefault(module_name, []).append(hook)
        if module is not None:
            _watch_package_of(module_name)
        elif _finder not in sys.meta_path:
            sys.meta_path.insert(0, _finder)


def cancel_when_imported(module_name: str, hook: Callable[[Any], None]) -> None:
    with _hook_lock:
        hooks = _post_import_hooks.get(module_name, [])
        if hook in hooks:
            hooks.remove(hook)
        if not hooks:
            _post_import_hooks.pop(module_name, None)
        _unwatch_idle_packages()


# --- Patch and the replacements it can undo ----------------------------------------------------

ABSENT = object()  # restore marker: the attribute did not exist before the patch


@dataclass
class Patch:
    name: str
    description: str
    apply_fn: Callable[[], dict]
    undo_fn: Callable[[dict], None]
    # mtp config -> whether a run with it needs this patch (None: never required)
    needed_when: Optional[Callable[[Any], bool]] = field(default=None, repr=False)
    _saved: Optional[dict] = field(default=None, repr=False)
    _applying: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        if self.needed_when is not None:
            _requirable[self.name] = self

    @property
    def applied(self) -> bool:
        return self._saved is not None

    def apply(self) -> None:
        # Re-entrant calls happen: a step that imports verl_mtp.config may import verl, whose
        # plugin loading applies the patches again.
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

    def target_modules(self) -> tuple[str, ...]:
        """The modules a deferred patch works on (empty before it is applied)."""
        return tuple(self._saved.get("targets", ())) if self.applied else ()

    def replacements(self) -> list[tuple[Any, str, Any]]:
        """(owner, attribute, original) for every replacement made so far, in order."""
        return list(self._saved.get("restore", ())) if self.applied else []

    def undo(self) -> None:
        if self.applied:
            self.undo_fn(self._saved)
            self._saved = None


def replace(owner: Any, attr: str, new: Any, restore: list) -> None:
    """``owner.attr = new``, remembering the original in ``restore`` for undo."""
    restore.append((owner, attr, getattr(owner, attr)))
    setattr(owner, attr, new)


def add(owner: Any, attr: str, new: Any, restore: list) -> None:
    """Add a new attribute (undo deletes it); refuses to shadow an existing one."""
    if hasattr(owner, attr):
        raise PatchError(f"{getattr(owner, '__qualname__', owner)}.{attr} already exists")
    restore.append((owner, attr, ABSENT))
    setattr(owner, attr, new)


def undo_replacements(restore: list) -> None:
    for owner, attr, original in reversed(restore):
        if original is ABSENT:
            delattr(owner, attr)
        else:
            setattr(owner, attr, original)
    restore.clear()


class MappingItems:
    """Attribute view of a dict, so ``replace`` and undo can swap its entries in place (other
    modules hold references to the same dict); a missing key reads as ``ABSENT``."""

    def __init__(self, mapping: dict):
        object.__setattr__(self, "_mapping", mapping)

    def __getattr__(self, key: str) -> Any:
        return self._mapping.get(key, ABSENT)

    def __setattr__(self, key: str, value: Any) -> None:
        self._mapping[key] = value

    def __delattr__(self, key: str) -> None:
        self._mapping.pop(key, None)


def require_attr(owner: Any, attr: str) -> Any:
    value = getattr(owner, attr, None)
    if value is None:
        raise PatchError(f"{getattr(owner, '__name__', owner)}.{attr} is missing")
    return value


def parameter_names(function: Any) -> list[str]:
    return list(inspect.signature(function).parameters) if callable(function) else []


def check_params(owner: type, method: str, expected: list[str], keyword_only: bool = False) -> Callable:
    """``owner.method`` when its (keyword-only) parameters after self start with ``expected``."""
    function = getattr(owner, method, None)
    if function is None:
        raise PatchError(f"{owner.__module__}.{owner.__qualname__}.{method} is missing")
    params = inspect.signature(function).parameters
    names = [n for n, p in params.items() if (p.kind == p.KEYWORD_ONLY) == keyword_only and n != "self"]
    if names[: len(expected)] != expected:
        raise PatchError(f"{owner.__qualname__}.{method}({', '.join(params)}) is not the expected ({', '.join(expected)}, ...)")
    return function


# --- deferred patches --------------------------------------------------------------------------

Step = Callable[[Any, list], None]


def deferred_patch(name: str, description: str, targets: dict[str, Step], *, import_targets: bool = False,
                   needed_when: Optional[Callable[[Any], bool]] = None) -> Patch:
    """A Patch whose step ``targets[module_name](module, restore)`` runs when that module is
    imported. A step replaces with ``replace``/``add`` (so undo puts every original back) and
    raises PatchError when the module does not look as expected (reported like a failure at
    plugin load). ``import_targets``: import the targets now, unless one is mid-import."""
    def apply_fn() -> dict:
        # "done": the target modules whose step succeeded (read by require_patches).
        saved: dict = {"restore": [], "hooks": {}, "targets": tuple(targets), "done": set()}
        for module_name, step in targets.items():
            saved["hooks"][module_name] = functools.partial(_run_step, name, step, saved, module_name)
            when_imported(module_name, saved["hooks"][module_name])
            if import_targets and module_name not in sys.modules:
                importlib.import_module(module_name)
        return saved

    def undo_fn(saved: dict) -> None:
        for module_name, hook in saved["hooks"].items():
            cancel_when_imported(module_name, hook)
        undo_replacements(saved["restore"])

    return Patch(name, description, apply_fn, undo_fn, needed_when=needed_when)


def _run_step(patch_name: str, step: Step, saved: dict, module_name: str, module: Any) -> None:
    try:
        step(module, saved["restore"])
        saved["done"].add(module_name)
    except Exception as exc:  # noqa: BLE001 - reported now, fatal for a run that needs it
        report_failure(patch_name, exc)


# --- which patches are active: failures, switched-off patches, what a run needs ----------------

_failures: dict[str, str] = {}
_switched_off: dict[str, str] = {}  # patch name -> why (the env var that denies it)
_requirable: dict[str, Patch] = {}  # every patch some MTP config can need, by name


def _versions_found() -> str:
    return ", ".join(f"{k} {v}" for k, v in installed_versions().items())


def report_failure(patch_name: str, exc: BaseException) -> None:
    """Record that ``patch_name`` failed and say so loudly, with the traceback."""
    message = (
        f"verl-mtp: patch '{patch_name}' FAILED to apply: {type(exc).__name__}: {exc}. "
        f"A run whose MTP config needs it stops at the engine's initialisation. Versions found: {_versions_found()}."
    )
    _failures[patch_name] = message
    trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    report_loudly(f"ERROR: {message}\n{trace}", VerlMtpPluginWarning, stacklevel=3)


def failure_of(patch_name: str) -> Optional[str]:
    return _failures.get(patch_name)


def forget_failure(patch_name: str) -> None:
    _failures.pop(patch_name, None)


def switch_off(patch_name: str, why: str) -> None:
    """Record that the plugin left ``patch_name`` out on purpose (``why`` names the setting)."""
    _switched_off[patch_name] = why


def switch_on(patch_name: str) -> None:
    _switched_off.pop(patch_name, None)


def switched_off(patch_name: str) -> Optional[str]:
    return _switched_off.get(patch_name)


def patches_needed(mtp: Any) -> tuple[Patch, ...]:
    """The trainer-side patches an ``ExtendedMtpConfig`` relies on (rollout-side ones run elsewhere)."""
    if not mtp.enable:
        return ()
    return tuple(p for p in _requirable.values() if p.needed_when(mtp))


def _problem(patch: Patch) -> Optional[str]:
    if patch.name in _switched_off:
        return f"patch '{patch.name}' is switched off by {_switched_off[patch.name]}"
    if patch.name in _failures:
        return f"patch '{patch.name}': {_failures[patch.name]}"
    if not patch.applied:
        return f"patch '{patch.name}' is not applied (plugin not loaded, or deactivated)"
    if patch.unfinished_targets():
        return f"patch '{patch.name}' did not finish on {', '.join(patch.unfinished_targets())}"
    return None


def require_patches(mtp: Any, where: str) -> None:
    """Stop ``where`` with PatchNotActiveError when a patch ``mtp`` needs is not active here, or
    megatron-core is not a supported version. Names the patch, its error and the versions."""
    if not mtp.enable:
        return
    problems = [] if _requirable else ["verl-mtp's patches are not loaded in this process (verl_mtp.plugin)"]
    try:
        check_megatron_core_version()
    except PatchError as exc:
        problems.append(f"megatron-core: {exc}")
    problems += [p for p in map(_problem, patches_needed(mtp)) if p]
    if problems:
        raise PatchNotActiveError(
            f"verl-mtp cannot apply this MTP config ({where}): " + "; ".join(problems)
            + f". Versions found: {_versions_found()}. Fix the install (see the README's version matrix) or set "
            f"actor_rollout_ref.model.mtp.enable=False to run without MTP."
        )
