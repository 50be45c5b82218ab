"""Every change verl-mtp makes to verl (and mbridge), one file per concern; ``verl_mtp.plugin``
applies them, nothing else patches verl.

Each patch is wiring only: it checks its target still looks as expected, replaces it with a
few-line wrapper that calls a named function in a feature module, and can be undone exactly
(``verl_mtp.patches.core`` holds the machinery and the record of what is active).
"""

from verl_mtp.patches.checkpoint import MTP_CHECKPOINT
from verl_mtp.patches.config import DRIVER_VALIDATION, EXTENDED_MTP_CONFIG
from verl_mtp.patches.core import (
    Patch,
    PatchError,
    PatchNotActiveError,
    deferred_patch,
    original_of,
    require_patches,
    when_imported,
)
from verl_mtp.patches.export import MTP_COMPLETE_EXPORT
from verl_mtp.patches.rollout import DRAFTER_SYNC_CHECK, SPEC_STEP_METRICS
from verl_mtp.patches.training import DEPTH_OVERRIDE, MTP_FORWARD, MTP_POLICY_LOSS, OCC_UPDATE_SCHEDULE

# In the order they are applied (and undone in reverse).
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

__all__ = [
    "ALL_PATCHES",
    "DEPTH_OVERRIDE",
    "DRAFTER_SYNC_CHECK",
    "DRIVER_VALIDATION",
    "EXTENDED_MTP_CONFIG",
    "MTP_CHECKPOINT",
    "MTP_COMPLETE_EXPORT",
    "MTP_FORWARD",
    "MTP_POLICY_LOSS",
    "OCC_UPDATE_SCHEDULE",
    "SPEC_STEP_METRICS",
    "Patch",
    "PatchError",
    "PatchNotActiveError",
    "deferred_patch",
    "original_of",
    "require_patches",
    "when_imported",
]
