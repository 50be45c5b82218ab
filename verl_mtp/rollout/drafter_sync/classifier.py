"""Which tensors of a weight stream belong to the MTP head (the ones the drafter must receive)."""

from __future__ import annotations

from typing import Any, Callable

from verl_mtp.models.families import detect_family, hf_config_dict, mtp_depths


def mtp_tensor_classifier(hf_config: Any) -> Callable[[str], bool]:
    """``is_mtp(hf_name)`` for the model family of ``hf_config`` (verl_mtp.models naming).

    Raises UnknownFamilyError for a family without MTP naming, and ValueError when the config
    declares no MTP depth (then there is no drafter to check).
    """
    config = hf_config_dict(hf_config)
    depths = mtp_depths(config)
    family = detect_family(config)
    if depths <= 0:
        raise ValueError(
            f"the {family.title} config declares no MTP depth ({family.depth_key} is missing or 0): "
            f"there is no MTP drafter whose sync could be checked"
        )
    return family.naming(config, depths).is_mtp
