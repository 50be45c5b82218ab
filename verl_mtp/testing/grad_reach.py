"""Which parameter groups the MTP loss term alone sends gradient to, measured on a real model.

The regime is applied the way verl applies it on the Megatron engine: labels reach the model only
when MTP training is on, and the engine's ``patch_engine_mtp`` installs the MTP postprocess (and,
for ``detach_encoder``, verl's embedding/hidden-state detach). ``stock_verl=True`` uses verl's
own function, bypassing verl-mtp's forward, to measure what verl alone does. The main-head term is multiplied by 0,
so every non-zero gradient comes from the MTP loss that megatron injects in the backward pass.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

PARAM_GROUPS = ("mtp", "trunk", "embedding", "lm_head")


def param_group(name: str) -> str:
    """Map a GPTModel parameter name to one of PARAM_GROUPS."""
    if name.startswith("mtp."):
        return "mtp"
    if name.startswith("embedding."):
        return "embedding"
    if name.startswith("output_layer."):
        return "lm_head"
    if name.startswith("decoder."):
        return "trunk"
    raise ValueError(f"parameter {name!r} belongs to no known group ({', '.join(PARAM_GROUPS)})")


def gradient_norms_by_group(model: torch.nn.Module) -> dict[str, float]:
    norms = dict.fromkeys(PARAM_GROUPS, 0.0)
    for name, param in model.named_parameters():
        if param.grad is not None:
            norms[param_group(name)] += float(param.grad.detach().float().pow(2).sum())
    return {group: value**0.5 for group, value in norms.items()}


def measure_mtp_gradient_reach(model, regime: str, batch: dict, stock_verl: bool = False) -> dict[str, float]:
    """Gradient norm per parameter group from the MTP (cross-entropy) term alone under ``regime``.

    ``model`` must be freshly built (the patches are per instance and are left installed).
    """
    import verl.workers.engine.megatron.transformer_impl as engine_module
    from verl.utils.megatron_utils import patch_engine_mtp as stock_patch_engine_mtp

    from verl_mtp.config import ExtendedMtpConfig
    from verl_mtp.local_megatron.tiny_gpt import forward

    # "disabled" still loads the head (enable=True): verl patches the model and runs no MTP loss.
    mtp = ExtendedMtpConfig(enable=True, mtp_training_mode=regime)
    patch_engine_mtp = stock_patch_engine_mtp if stock_verl else engine_module.patch_engine_mtp
    patch_engine_mtp(model, SimpleNamespace(mtp=mtp))
    model.zero_grad(set_to_none=True)
    input_ids = batch["input_ids"]
    labels = loss_mask = None
    if mtp.enable_train:
        labels = torch.roll(input_ids, shifts=-1, dims=-1)
        loss_mask = torch.ones_like(input_ids, dtype=torch.float32)
    output = forward(model, batch, labels=labels, loss_mask=loss_mask)
    (output.float().sum() * 0.0).backward()
    return gradient_norms_by_group(model)
