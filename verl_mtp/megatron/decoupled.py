"""The decoupled regime's gradient split: two passes of the MTP block in one training step.

Both MTP terms are functions of the same depth hidden states h_k = MTP(trunk hidden, embedding; phi),
where phi are the MTP module's own parameters. The decoupled regime wants

    shared parameters (trunk, embedding, lm_head)  <-  lambda * policy-loss term only
    phi (the MTP module)                           <-  drafter loss only

One backward through one MTP block cannot give that: the block's backward sends the summed gradient
of both terms to its inputs and to phi alike. So the block runs twice from the same inputs:

- the *policy pass* with phi frozen (``requires_grad`` off): its hidden states feed the policy-loss
  log-probs through the live lm_head, and its backward computes only input gradients;
- the *drafter pass* with its inputs detached (the trunk's hidden states, and the token embeddings
  at every depth, as the standalone regime detaches them; depth k+1 still reads depth k's output
  with its graph): its hidden states feed the drafter loss through a detached lm_head, and its
  backward reaches phi only.

The split is exact (each parameter group gets exactly one term's gradient, ``tests/test_decoupled.py``
compares it with the joint-rl and standalone runs), and costs one extra forward of the MTP block
(one transformer layer per depth, plus its activations until backward); the backward does no extra
matrix products, as each pass computes only the gradients it keeps. Splitting one forward's backward
instead (two vector-Jacobian products with ``torch.autograd.grad``) would save that forward but breaks
under megatron's reentrant activation recompute and its fused weight-gradient accumulation, which
writes weight gradients on any backward. Freezing by ``requires_grad`` is what megatron's linear
layers (local and Transformer Engine) read at forward time to skip the weight gradient.
"""

from __future__ import annotations

import contextlib
import functools
from typing import TYPE_CHECKING, Callable

from verl_mtp.errors import VerlMtpError

if TYPE_CHECKING:
    import torch

# Selective recompute of these modules holds no parameters: recomputing them in backward cannot
# bring phi's gradient back into the policy pass. Any other recomputed module would.
_PARAMETER_FREE_RECOMPUTE = frozenset({"core_attn", "moe_act"})


class DecoupledSplitError(VerlMtpError, RuntimeError):
    """The decoupled regime cannot split the MTP gradients exactly on this model or configuration."""


def recompute_leak(granularity, modules) -> str | None:
    """Why megatron's recompute settings would break the split, or None (also for config-time checks)."""
    if granularity != "selective":
        return None  # none, or full: the frozen layer call covers full recompute
    modules = sorted(set(modules or ("core_attn",)))  # megatron's default
    with_parameters = sorted(set(modules) - _PARAMETER_FREE_RECOMPUTE)
    if not with_parameters:
        return None
    return (
        f"recompute_modules={modules} recomputes {with_parameters} in backward with the MTP module's "
        "parameters live, which would leak the policy-loss gradient into the MTP module; recompute only "
        f"{sorted(_PARAMETER_FREE_RECOMPUTE)} (or recompute_granularity=full) in a decoupled run"
    )


def check_decoupled_model(model) -> None:
    """Refuse, at engine initialisation, a model on which the split would not be exact."""
    config = model.config
    leak = recompute_leak(config.recompute_granularity, getattr(config, "recompute_modules", None))
    if leak:
        raise DecoupledSplitError(f"mtp_training_mode=decoupled: {leak}")
    if config.recompute_granularity == "full" and config.mtp_num_layers:
        import inspect

        checkpointed = getattr(model.mtp.layers[0], "_checkpointed_forward", None)
        if checkpointed is None or "forward_func" not in inspect.signature(checkpointed).parameters:
            # megatron-core 0.18 looks the layer function up again inside backward's recompute, after
            # the policy pass's freeze has ended (its MTP full recompute also rejects padding_mask).
            raise DecoupledSplitError(
                "mtp_training_mode=decoupled: recompute_granularity=full on this megatron-core recomputes the MTP "
                "layers through a function the policy pass cannot keep frozen in backward (megatron-core 0.16's "
                "passes it in; 0.18's looks it up again); use recompute_granularity=selective (core_attn) or "
                "megatron-core 0.16 for a decoupled run with full recompute"
            )
    for layer in model.mtp.layers:
        for name in ("_proj_and_transformer_layer", "_get_embeddings"):
            if not callable(getattr(layer, name, None)):
                raise DecoupledSplitError(
                    f"mtp_training_mode=decoupled: this megatron-core's MTP layer "
                    f"({type(layer).__name__}) has no {name}, which the gradient split wraps "
                    "(known on megatron-core 0.16 and 0.18)"
                )


@contextlib.contextmanager
def _requires_grad_off(params):
    """Parameters in ``params`` that require grad do not, inside the block (nesting is harmless)."""
    live = [p for p in params if p.requires_grad]
    for p in live:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in live:
            p.requires_grad_(True)


def _frozen_layer_call(fn: Callable, params) -> Callable:
    # The layer's projection + transformer layer, frozen whenever it runs: megatron's full recompute
    # keeps this function and calls it again in backward, after the policy pass has ended.
    @functools.wraps(fn)
    def frozen(*args, **kwargs):
        with _requires_grad_off(params):
            return fn(*args, **kwargs)

    return frozen


def _detached_embeddings(fn: Callable) -> Callable:
    # ``_get_embeddings`` returns (..., decoder_input, hidden_states) on every megatron-core.
    @functools.wraps(fn)
    def detached(*args, **kwargs):
        *head, decoder_input, hidden_states = fn(*args, **kwargs)
        return (*head, decoder_input.detach(), hidden_states)

    return detached


@contextlib.contextmanager
def _layer_methods_replaced(layers, name: str, wrap: Callable):
    """Each layer's method ``name`` replaced by ``wrap(layer, method)`` on the instance, then restored
    (an instance attribute another patch put there comes back; otherwise the class's method shows)."""
    missing = object()
    saved = [layer.__dict__.get(name, missing) for layer in layers]
    for layer in layers:
        setattr(layer, name, wrap(layer, getattr(layer, name)))
    try:
        yield
    finally:
        for layer, before in zip(layers, saved):
            if before is missing:
                delattr(layer, name)
            else:
                setattr(layer, name, before)


def run_decoupled_mtp_blocks(model, trunk_hidden: "torch.Tensor", run_block: Callable[["torch.Tensor"], "torch.Tensor"]):
    """(policy pass, drafter pass) of ``model``'s MTP block, each [main; depth 1; ...; depth K]
    along the sequence; ``run_block(hidden)`` runs the block once on the forward's inputs with the
    trunk's hidden states ``hidden``."""
    if not model.post_process:
        raise DecoupledSplitError("mtp_training_mode=decoupled needs the MTP block on the last pipeline stage")
    import torch

    if not torch.is_grad_enabled():  # OCC's no-grad pre-pass: no gradient to split, one pass does
        hidden = run_block(trunk_hidden)
        return hidden, hidden
    layers = list(model.mtp.layers)
    params = [p for p in model.mtp.parameters() if p.requires_grad]
    frozen = lambda layer, fn: _frozen_layer_call(fn, list(layer.parameters()))  # noqa: E731
    with _requires_grad_off(params), _layer_methods_replaced(layers, "_proj_and_transformer_layer", frozen):
        policy = run_block(trunk_hidden)
    # The drafter pass starts from the trunk's hidden states cut from the graph: a fresh leaf that
    # requires grad, so a recomputed first layer still has a differentiable input.
    cut = trunk_hidden.detach().requires_grad_(True)
    with _layer_methods_replaced(layers, "_get_embeddings", lambda layer, fn: _detached_embeddings(fn)):
        drafter = run_block(cut)
    return policy, drafter
