"""verl's entry point into verl-mtp (group ``verl.plugins``).

``import verl`` imports this module in every process (driver, TaskRunner, Ray workers, rollout
servers) unless ``VERL_USE_EXTERNAL_PLUGINS=none``. Importing it activates verl-mtp: the patches
in ``verl_mtp.patches`` are applied once. verl logs plugin import errors only at DEBUG level, so
a patch that fails is reported here, on stderr and as a warning, with the versions found; a
failure never breaks ``import verl``.
"""

from __future__ import annotations

import sys
import warnings

from verl_mtp.patches import ALL_PATCHES, Patch, PatchDeferred, installed_versions

_failures: dict[str, str] = {}


class VerlMtpPluginWarning(RuntimeWarning):
    pass


def report_failure(patch_name: str, exc: BaseException) -> None:
    versions = ", ".join(f"{k} {v}" for k, v in installed_versions().items())
    message = (
        f"verl-mtp: patch '{patch_name}' FAILED to apply: {type(exc).__name__}: {exc}. "
        f"MTP features that depend on it are OFF. Versions found: {versions}."
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
        try:
            patch.apply()
            _failures.pop(patch.name, None)
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
    return {
        p.name: "applied" if p.applied else _failures.get(p.name, "not applied") for p in ALL_PATCHES
    }


def is_active() -> bool:
    return all(p.applied for p in ALL_PATCHES)


apply_patches()
