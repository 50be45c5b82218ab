"""Reaching the megatron model inside the wrappers a real run puts around it."""

from __future__ import annotations

import torch


def unwrap_model(module):
    """The model inside ``Float16Module``, DDP and friends (each keeps it in ``.module``)."""
    while isinstance(getattr(module, "module", None), torch.nn.Module):
        module = module.module
    return module
