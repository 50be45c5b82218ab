"""The MTP depths verl's Megatron engine builds: ``mtp.mtp_num_layers`` checked against the
checkpoint and handed to megatron. The ``mtp_depth_override`` patch calls these around verl's
``check_mtp_config``."""

from __future__ import annotations

from typing import Any, Optional

from verl_mtp.config import as_extended, detect_mtp_depths, resolve_mtp_depths


def requested_mtp_depths(model_config: Any) -> Optional[int]:
    """The depths ``mtp.mtp_num_layers`` asks the engine to build (checked against the
    checkpoint, which must declare MTP layers when MTP is on), or None when MTP is off or the
    checkpoint's own count stands.

    Call it before verl's ``check_mtp_config``: verl zeroes the HF depth count when MTP is off.
    """
    mtp = as_extended(model_config.mtp)
    if not mtp.enable:
        return None
    depths = resolve_mtp_depths(mtp, detect_mtp_depths(model_config.hf_config))
    return depths if mtp.mtp_num_layers is not None else None


def override_mtp_depths(engine_config: Any, depths: Optional[int]) -> None:
    """Make megatron build ``depths`` MTP layers (after verl's ``check_mtp_config``); None: no change."""
    if depths is not None:
        engine_config.override_transformer_config["mtp_num_layers"] = depths
