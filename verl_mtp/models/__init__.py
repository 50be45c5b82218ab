"""Per-family MTP weight naming (MiMo, DeepSeek-V3, GLM-4.5, Qwen3-Next, Qwen3.5).

Importing this package is cheap: it touches neither verl nor torch. The modules below it that
convert weights (``bridges``, ``export_check``, ``head_spec``) are imported where they are used.
"""

from verl_mtp.models.families import (
    DEPTH_KEYS,
    DRAFTER_SHARED_SUFFIXES,
    FAMILIES,
    Family,
    MtpKey,
    MtpNaming,
    UnknownFamilyError,
    depth_key_location,
    detect_family,
    family_by_name,
    known_families,
    mtp_depths,
    text_config,
    with_depths,
)

__all__ = [
    "DEPTH_KEYS",
    "DRAFTER_SHARED_SUFFIXES",
    "FAMILIES",
    "Family",
    "MtpKey",
    "MtpNaming",
    "UnknownFamilyError",
    "depth_key_location",
    "detect_family",
    "family_by_name",
    "known_families",
    "mtp_depths",
    "text_config",
    "with_depths",
]
