"""What the installed megatron-core does with MTP, by API generation.

megatron-core <= 0.16 computes MTP losses in ``GPTModel._postprocess`` ("legacy"); 0.18 adds
``process_mtp_loss`` ("process_mtp_loss"). verl's MTP postprocess follows the same split, and the
split decides which parameters the MTP loss sends gradient into (the two tables below).
``tests/test_grad_reach.py`` re-measures both tables on a real model for the installed version.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from importlib.metadata import PackageNotFoundError, version

LEGACY_API = "legacy"
PROCESS_MTP_LOSS_API = "process_mtp_loss"
_MTP_MODULE = "megatron.core.transformer.multi_token_prediction"

# What stock verl 0.9.1's MTP postprocess does (mtp_loss_type=ce), per API generation: regime ->
# parameter groups that receive gradient from the MTP term. Measured on megatron-core 0.16.1 and
# 0.18.2; verl-mtp replaces this postprocess (see GRADIENT_REACH).
STOCK_VERL_GRADIENT_REACH = {
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

# With verl-mtp (both loss types, every megatron-core): standalone trains the MTP module alone,
# joint sends MTP gradient into everything it uses. Measured by tests/test_grad_reach.py (ce)
# and tests/test_rl_forward_e2e.py (rl).
GRADIENT_REACH = {
    "disabled": (),
    "standalone": ("mtp",),
    "joint": ("mtp", "trunk", "embedding", "lm_head"),
    "decoupled": ("mtp", "trunk", "embedding", "lm_head"),
}

# decoupled: which MTP term reaches which groups (verl_mtp.megatron.decoupled; measured by
# tests/test_decoupled.py against the joint-rl and standalone runs).
DECOUPLED_SPLIT = {
    "policy-loss term": ("trunk", "embedding", "lm_head"),
    "drafter loss": ("mtp",),
}


def megatron_core_version() -> str | None:
    try:
        return version("megatron-core")
    except PackageNotFoundError:
        return None


def mtp_api() -> str | None:
    """The installed megatron-core's MTP API generation, or None if megatron-core is absent."""
    spec = importlib.util.find_spec("megatron")
    if spec is None or megatron_core_version() is None:
        return None
    loaded = sys.modules.get(_MTP_MODULE)
    if loaded is not None:
        return PROCESS_MTP_LOSS_API if hasattr(loaded, "process_mtp_loss") else LEGACY_API
    # Importing megatron.core.transformer takes seconds (``verl-mtp explain`` only needs this
    # answer), so read the module's source for the top-level definition instead.
    for root in spec.submodule_search_locations or ():
        path = os.path.join(root, *_MTP_MODULE.split(".")[1:]) + ".py"
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                found = re.search(r"^def process_mtp_loss\(", f.read(), re.MULTILINE)
            return PROCESS_MTP_LOSS_API if found else LEGACY_API
    from megatron.core.transformer import multi_token_prediction

    return PROCESS_MTP_LOSS_API if hasattr(multi_token_prediction, "process_mtp_loss") else LEGACY_API


def expected_gradient_reach(regime: str, api: str | None = None, stock_verl: bool = False) -> tuple[str, ...] | None:
    """Parameter groups that get MTP gradient under ``regime``; None if megatron-core is absent.

    ``stock_verl`` gives what verl without verl-mtp would do (for comparison in ``explain``).
    """
    api = api or mtp_api()
    if api is None:
        return None
    if stock_verl:  # verl has no decoupled regime: the same switches (detach_encoder=False) mean joint
        return STOCK_VERL_GRADIENT_REACH[api]["joint" if regime == "decoupled" else regime]
    return GRADIENT_REACH[regime]
