"""verl's entry point into verl-mtp (group ``verl.plugins``).

``import verl`` imports this module in every process (driver, TaskRunner, Ray workers, rollout
servers) unless ``VERL_USE_EXTERNAL_PLUGINS=none``. Importing it activates verl-mtp once per
process: the patches in ``verl_mtp.patches`` that ``VERL_MTP_PATCHES`` allows are applied. verl
logs plugin import errors only at DEBUG level, so a patch that fails is reported here, loudly and
with its traceback; a failure never breaks ``import verl`` (a run without MTP does not need the
patches). A run whose MTP config needs a patch that is not active is stopped by
``require_patches`` (verl_mtp.patches.core), which the engine's initialisation and the actor loss
call: the feature is never silently left out.

``VERL_MTP_PATCHES``: ``all`` (default); ``name,name``: only these; ``-name,-name``: all but these.
"""

from __future__ import annotations

import os

from verl_mtp.errors import MtpConfigError, invalid_value, report_loudly
from verl_mtp.patches.catalog import ALL_PATCHES
from verl_mtp.patches.core import (
    PATCHES_ENV,
    Patch,
    VerlMtpPluginWarning,
    failure_of,
    forget_failure,
    report_failure,
    switch_off,
    switch_on,
    switched_off,
)

__all__ = ["PATCHES_ENV", "VerlMtpPluginWarning", "apply_patches", "deactivate", "selected_patches", "status"]


def selected_patches(setting: str | None = None, patches: tuple[Patch, ...] = ALL_PATCHES) -> tuple[Patch, ...]:
    """The patches ``VERL_MTP_PATCHES`` (or ``setting``) allows, in order; MtpConfigError for a
    name that is not a patch or a list that mixes allowing and denying."""
    setting = os.environ.get(PATCHES_ENV, "all") if setting is None else setting
    names = [n.strip() for n in setting.split(",") if n.strip()]
    if names in ([], ["all"]):
        return patches
    denied = [n[1:] for n in names if n.startswith("-")]
    valid = [p.name for p in patches]
    expected = (f"'all', a comma-separated list of patch names to apply, or of -names to leave out; "
                f"patch names: {', '.join(valid)}")
    unknown = [n for n in (denied or names) if n not in valid]
    if unknown or (denied and len(denied) != len(names)):
        raise MtpConfigError(invalid_value(PATCHES_ENV, setting, expected))
    return tuple(p for p in patches if (p.name not in denied if denied else p.name in names))


def apply_patches(patches: tuple[Patch, ...] = ALL_PATCHES) -> bool:
    """Apply the ``patches`` that ``VERL_MTP_PATCHES`` allows (idempotent); report each failure
    loudly. True if all of them are applied; the ones left out are recorded for require_patches."""
    chosen = selected_patches(patches=patches)
    ok = True
    for patch in patches:
        if patch not in chosen:
            switch_off(patch.name, f"{PATCHES_ENV}={os.environ.get(PATCHES_ENV)!r}")
            continue
        switch_on(patch.name)
        ok = _apply_one(patch) and ok
    return ok


def _apply_one(patch: Patch) -> bool:
    if patch.applied:
        return True
    forget_failure(patch.name)  # before: applying runs deferred steps that may report
    try:
        patch.apply()
    except Exception as exc:  # noqa: BLE001 - reported, never swallowed
        report_failure(patch.name, exc)
    return patch.applied and failure_of(patch.name) is None


def deactivate(patches: tuple[Patch, ...] = ALL_PATCHES) -> None:
    """Undo every applied patch, in reverse order (for tests)."""
    for patch in reversed(patches):
        patch.undo()


def status() -> dict[str, str]:
    """Patch name -> 'applied' | 'not applied' | 'switched off by ...' | the failure message."""
    # A deferred patch is "applied" from plugin load on; its failure on a target module wins.
    def one(patch: Patch) -> str:
        if failure_of(patch.name):
            return failure_of(patch.name)
        if switched_off(patch.name):
            return f"switched off by {switched_off(patch.name)}"
        return "applied" if patch.applied else "not applied"

    return {p.name: one(p) for p in ALL_PATCHES}


def _activate() -> None:
    try:
        apply_patches()
    except MtpConfigError as exc:  # a bad VERL_MTP_PATCHES: nothing applied, every patch reports it
        report_loudly(f"ERROR: {exc}; no verl-mtp patch is applied", VerlMtpPluginWarning)
        for patch in ALL_PATCHES:
            switch_off(patch.name, f"an invalid {PATCHES_ENV} ({exc})")


_activate()
