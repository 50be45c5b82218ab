"""verl's entry point into verl-mtp (group ``verl.plugins``).

``import verl`` imports this module in every process (driver, TaskRunner, Ray workers, rollout
servers) unless ``VERL_USE_EXTERNAL_PLUGINS=none``. Importing it activates verl-mtp: the patches
in ``verl_mtp.patches`` are applied once. verl logs plugin import errors only at DEBUG level, so
a patch that fails is reported here, on stderr and as a warning, with the versions found; a
failure never breaks ``import verl`` (a run without MTP does not need the patches). A run whose
MTP config needs a patch that did not apply is stopped by ``require_patches``, which the engine's
initialisation and the actor loss call: the feature is never silently left out.
"""

from __future__ import annotations

import sys
import warnings

from verl_mtp.patches import (
    ALL_PATCHES,
    DEPTH_OVERRIDE,
    EXTENDED_MTP_CONFIG,
    MTP_CHECKPOINT,
    MTP_COMPLETE_EXPORT,
    MTP_FORWARD,
    MTP_POLICY_LOSS,
    OCC_UPDATE_SCHEDULE,
    Patch,
    PatchDeferred,
    PatchError,
    check_megatron_core_version,
    installed_versions,
)

_failures: dict[str, str] = {}


class VerlMtpPluginWarning(RuntimeWarning):
    pass


class PatchNotActiveError(RuntimeError):
    """A patch that the run's MTP config needs is not active in this process."""


def report_failure(patch_name: str, exc: BaseException) -> None:
    versions = ", ".join(f"{k} {v}" for k, v in installed_versions().items())
    message = (
        f"verl-mtp: patch '{patch_name}' FAILED to apply: {type(exc).__name__}: {exc}. "
        f"A run whose MTP config needs it stops at the engine's initialisation. Versions found: {versions}."
    )
    _failures[patch_name] = message
    # Both channels: stderr always shows in Ray worker logs; the warning is catchable in tests.
    print(f"[verl-mtp] ERROR: {message}", file=sys.stderr, flush=True)
    warnings.warn(message, VerlMtpPluginWarning, stacklevel=2)


def apply_patches(patches: tuple[Patch, ...] = ALL_PATCHES) -> bool:
    """Apply ``patches`` (idempotent); report each failure loudly. True if all are applied."""
    ok = True
    for patch in patches:
        if patch.applied:
            continue
        _failures.pop(patch.name, None)  # before: applying runs deferred steps that may report
        try:
            patch.apply()
            ok = ok and patch.name not in _failures
        except PatchDeferred:
            ok = False
        except Exception as exc:  # noqa: BLE001 - reported, never swallowed
            report_failure(patch.name, exc)
            ok = False
    return ok


def deactivate(patches: tuple[Patch, ...] = ALL_PATCHES) -> None:
    """Undo every applied patch, in reverse order (for tests)."""
    for patch in reversed(patches):
        patch.undo()


def status() -> dict[str, str]:
    """Patch name -> 'applied' | 'not applied' | the failure message."""
    # A deferred patch is "applied" from plugin load on; its failure on a target module wins.
    return {
        p.name: _failures[p.name] if p.name in _failures else "applied" if p.applied else "not applied"
        for p in ALL_PATCHES
    }


def patches_needed(mtp) -> tuple[Patch, ...]:
    """The trainer-side patches an ``ExtendedMtpConfig`` relies on (rollout-side ones run elsewhere)."""
    if not mtp.enable:
        return ()
    needed = [EXTENDED_MTP_CONFIG, DEPTH_OVERRIDE, MTP_CHECKPOINT, MTP_COMPLETE_EXPORT]
    if mtp.enable_train:
        needed += [MTP_FORWARD, MTP_POLICY_LOSS]
        if mtp.mtp_coef_mode == "occ":
            needed.append(OCC_UPDATE_SCHEDULE)
    return tuple(needed)


def require_patches(mtp, where: str) -> None:
    """Stop ``where`` with PatchNotActiveError when a patch ``mtp`` needs is not active here, or
    megatron-core is not a supported version. Names the patch, its error and the versions."""
    if not mtp.enable:
        return
    problems = []
    try:
        check_megatron_core_version()
    except PatchError as exc:
        problems.append(f"megatron-core: {exc}")
    for patch in patches_needed(mtp):
        if patch.name in _failures:
            problems.append(f"patch '{patch.name}': {_failures[patch.name]}")
        elif not patch.applied:
            problems.append(f"patch '{patch.name}' is not applied (plugin not loaded, or deactivated)")
        elif patch.unfinished_targets():
            problems.append(f"patch '{patch.name}' did not finish on {', '.join(patch.unfinished_targets())}")
    if problems:
        versions = ", ".join(f"{k} {v}" for k, v in installed_versions().items())
        raise PatchNotActiveError(
            f"verl-mtp cannot apply this MTP config ({where}): " + "; ".join(problems)
            + f". Versions found: {versions}. Fix the install (see the README's version matrix) or set "
            f"actor_rollout_ref.model.mtp.enable=False to run without MTP."
        )


apply_patches()
