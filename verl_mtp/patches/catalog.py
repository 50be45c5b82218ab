"""Every patch, in the order ``verl_mtp.plugin`` applies them (and undoes them in reverse)."""

from verl_mtp.patches.checkpoint import MTP_CHECKPOINT
from verl_mtp.patches.config import DRIVER_VALIDATION, EXTENDED_MTP_CONFIG
from verl_mtp.patches.export import MTP_COMPLETE_EXPORT
from verl_mtp.patches.rollout import DRAFTER_SYNC_CHECK, SPEC_STEP_METRICS
from verl_mtp.patches.training import DEPTH_OVERRIDE, MTP_FORWARD, MTP_POLICY_LOSS, OCC_UPDATE_SCHEDULE

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
]
