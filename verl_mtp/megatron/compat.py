"""What the installed megatron-core does with MTP, by API generation.

megatron-core <= 0.16 computes MTP losses in ``GPTModel._postprocess`` ("legacy"); 0.18 adds
``process_mtp_loss`` ("process_mtp_loss"). verl's MTP postprocess follows the same split, and the
split decides where MTP gradient leaks (DESIGN.md section 7.3). ``tests/test_grad_reach.py``
re-measures ``EXPECTED_GRADIENT_REACH`` on a real model for the installed version.
"""

from __future__ import annotations

import importlib.util
from importlib.metadata import PackageNotFoundError, version

LEGACY_API = "legacy"
PROCESS_MTP_LOSS_API = "process_mtp_loss"

# mtp_loss_type=ce: regime -> parameter groups that receive gradient from the MTP term, per API
# generation, through stock verl 0.9.1's MTP postprocess. Measured on megatron-core 0.16.1 and 0.18.2.
EXPECTED_GRADIENT_REACH = {
    LEGACY_API: {
        "disabled": (),
        "standalone": ("mtp",),
        # verl's legacy path runs the MTP logits through a detached copy of output_layer.
        "joint": ("mtp", "trunk", "embedding"),
    },
    PROCESS_MTP_LOSS_API: {
        "disabled": (),
        # Leak: process_mtp_loss uses the live output_layer, so lm_head is trained by MTP even
        # with detach_encoder=True.
        "standalone": ("mtp", "lm_head"),
        "joint": ("mtp", "trunk", "embedding", "lm_head"),
    },
}


def megatron_core_version() -> str | None:
    try:
        return version("megatron-core")
    except PackageNotFoundError:
        return None


def mtp_api() -> str | None:
    """The installed megatron-core's MTP API generation, or None if megatron-core is absent."""
    if importlib.util.find_spec("megatron") is None or megatron_core_version() is None:
        return None
    from megatron.core.transformer import multi_token_prediction

    return PROCESS_MTP_LOSS_API if hasattr(multi_token_prediction, "process_mtp_loss") else LEGACY_API


# mtp_loss_type=rl goes through verl-mtp's own forward (verl_mtp.megatron.rl_forward), the same on
# every megatron-core: standalone detaches the output layer too, joint trains it.
# Measured by tests/test_rl_forward_e2e.py.
RL_GRADIENT_REACH = {
    "disabled": (),
    "standalone": ("mtp",),
    "joint": ("mtp", "trunk", "embedding", "lm_head"),
}


def expected_gradient_reach(regime: str, api: str | None = None, loss_type: str = "ce") -> tuple[str, ...] | None:
    """Parameter groups that get MTP gradient under ``regime``; None if megatron-core is absent."""
    api = api or mtp_api()
    if api is None:
        return None
    if loss_type == "rl":
        return RL_GRADIENT_REACH[regime]
    return EXPECTED_GRADIENT_REACH[api][regime]
