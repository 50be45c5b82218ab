"""Log-probs of given tokens under vocabulary-parallel logits at a sampling temperature, in fp32.

``log softmax(logits / T)[label]`` for logits [s, b, V/tp] (each tensor-parallel rank holds one
vocabulary slice; labels are global ids). It is what the RL loss needs from every MTP depth, and
the step's hottest elementwise work: every pass over a [tokens, V] tensor costs about as much as
the output layer's GEMM at small hidden sizes, and under activation checkpointing the forward
runs twice. One autograd function therefore does the whole job in the fewest passes:

- forward: one pass casts the (bf16) logits to fp32 and divides by T, then a log-sum-exp
  (reductions only; across ranks through the per-rank maxima) and a gather of the label's logit;
  only the fp32 scaled logits and the log-sum-exp are kept;
- backward: ``d log p[label] / d logits = (onehot - softmax) / T``, built in place on the saved
  fp32 tensor (softmax from the log-sum-exp, minus one at the label) and written out in the
  logits' dtype by the same pass that scales it by ``-grad / T``.

Compared with dividing the logits by T and calling megatron's vocab-parallel cross-entropy, this
saves the separate upcast copy, the normalisation pass, and the division's backward (a fresh
[tokens, V] fp32 tensor). The numbers are the same to fp32 rounding.
"""

from __future__ import annotations

from typing import Optional

import torch


def _all_reduce(tensor: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None:
        torch.distributed.all_reduce(tensor, op=op, group=group)
    return tensor


def _owned_labels(labels: torch.Tensor, shard: int, group):
    """(owned mask, local index) of global vocabulary ids for this rank's slice."""
    rank = torch.distributed.get_rank(group) if group is not None else 0
    local = labels - rank * shard
    owned = (local >= 0) & (local < shard)
    return owned, local.clamp(0, shard - 1).unsqueeze(-1)


class _TemperedLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, temperature, group):
        # One pass: bf16 / fp32 promotes, so the quotient is written in fp32 directly.
        scaled = torch.div(logits, temperature) if temperature is not None else logits.float()
        if scaled.dtype != torch.float32:
            scaled = scaled.float()
        # Log-sum-exp across the vocabulary slices: shift by the global maximum of the per-rank ones.
        local_lse = torch.logsumexp(scaled, dim=-1)
        shift = _all_reduce(local_lse.clone(), torch.distributed.ReduceOp.MAX, group)
        summed = _all_reduce(torch.exp(local_lse - shift), torch.distributed.ReduceOp.SUM, group)
        lse = shift + torch.log(summed)
        owned, local = _owned_labels(labels, scaled.shape[-1], group)
        label_logit = torch.gather(scaled, -1, local).squeeze(-1) * owned
        label_logit = _all_reduce(label_logit, torch.distributed.ReduceOp.SUM, group)
        ctx.save_for_backward(scaled, lse, owned, local, temperature)
        ctx.logits_dtype = logits.dtype
        return label_logit - lse

    @staticmethod
    def backward(ctx, grad):
        scaled, lse, owned, local, temperature = ctx.saved_tensors
        # softmax, in place on the saved fp32 tensor (backward runs once per forward, as in
        # megatron's cross-entropy, which reuses its saved softmax the same way)
        probs = scaled.sub_(lse.unsqueeze(-1)).exp_()
        probs.scatter_add_(-1, local, -owned.unsqueeze(-1).to(probs.dtype))  # softmax - onehot
        coef = -grad.unsqueeze(-1)
        if temperature is not None:
            coef = coef / temperature
        grad_logits = torch.empty(probs.shape, dtype=ctx.logits_dtype, device=probs.device)
        torch.mul(probs, coef, out=grad_logits)  # scale and cast in one pass
        return grad_logits, None, None, None


def tempered_log_probs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: Optional[torch.Tensor] = None,
    tp_group=None,
) -> torch.Tensor:
    """``log softmax(logits / temperature)[labels]`` in fp32, [s, b].

    ``logits`` [s, b, V/tp] (any float dtype; its gradient comes back in that dtype), ``labels``
    [s, b] global vocabulary ids, ``temperature`` broadcastable to [s, b, 1] (None: 1),
    ``tp_group`` the tensor-parallel group holding the vocabulary slices (None: one rank).
    """
    if temperature is not None:
        temperature = temperature.to(device=logits.device, dtype=torch.float32)
        if temperature.dim() == logits.dim() - 1:
            temperature = temperature.unsqueeze(-1)
        temperature = temperature.contiguous()
    return _TemperedLogProbs.apply(logits, labels, temperature, tp_group)
