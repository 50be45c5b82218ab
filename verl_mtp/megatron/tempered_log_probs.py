"""Log-probs of given tokens under vocabulary-parallel logits at a sampling temperature, in fp32.

``log softmax(logits / T)[label]`` for logits [s, b, V/tp] (each tensor-parallel rank holds one
vocabulary slice; labels are global ids). It is what the RL loss needs from every MTP depth, and
the step's hottest elementwise work: at small hidden sizes a pass over a [tokens, V] tensor costs
about as much as the output layer's GEMM, and under activation checkpointing the forward runs
twice. Dividing the logits by T and calling megatron's vocabulary-parallel cross-entropy makes
three fresh [tokens, V] tensors (the fp32 copy, the division's gradient, the bf16 cast of it) and
keeps an fp32 softmax for backward. Here instead:

- the logits are read a block of rows at a time into one fp32 scratch buffer (on CPU about 1 MiB,
  so each block's upcast, division, max, exp and sum stay in cache; on an accelerator one block);
- forward keeps only the (bf16) logits it was given and a per-row log-sum-exp: no fp32 copy of
  the vocabulary outlives the call (less memory than megatron's saved softmax);
- backward rebuilds each block's softmax from them and writes ``(softmax - onehot) * -grad / T``
  straight into the gradient, in the logits' dtype: the gradient is the only [tokens, V] tensor
  it makes.

Across tensor-parallel ranks the log-sum-exp combines the per-rank ones (shifted by their global
maximum) and the label's logit comes from the rank that owns it. The numbers are those of
``log_softmax`` to fp32 rounding.
"""

from __future__ import annotations

from typing import Optional

import torch

# On CPU, fp32 scratch rows per block: about 1 MiB, so a block's passes run in cache (measured
# on a [512, 16384] bf16 chunk: 1 MiB beat 256 KiB and 4 MiB), and at most a quarter of the rows,
# so the scratch adds little to the chunk's own memory.
_CPU_BLOCK_BYTES = 1 << 20


def _all_reduce(tensor: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None:
        torch.distributed.all_reduce(tensor, op=op, group=group)
    return tensor


def _owned_labels(labels: torch.Tensor, shard: int, group):
    """(owned mask, local index) of global vocabulary ids for this rank's slice."""
    rank = torch.distributed.get_rank(group) if group is not None else 0
    local = labels - rank * shard
    owned = (local >= 0) & (local < shard)
    return owned, local.clamp(0, shard - 1)


def _row_blocks(rows: int, vocab: int, device: torch.device):
    per_block = rows
    if device.type == "cpu":
        per_block = max(1, min(_CPU_BLOCK_BYTES // (4 * vocab), -(-rows // 4)))
    return [slice(start, min(start + per_block, rows)) for start in range(0, rows, per_block)]


def _scaled_block(scratch, logits, temperature, block):
    """``logits[block] / T`` in fp32, in the scratch buffer."""
    out = scratch[: block.stop - block.start]
    out.copy_(logits[block])
    if temperature is not None:
        out.div_(temperature[block])  # divided, as verl divides the main head's logits
    return out


class _TemperedLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, temperature, group):
        rows = logits.reshape(-1, logits.shape[-1])
        blocks = _row_blocks(rows.shape[0], rows.shape[1], rows.device)
        scratch = torch.empty((blocks[0].stop, rows.shape[1]), dtype=torch.float32, device=rows.device)
        local_lse = torch.empty(rows.shape[0], dtype=torch.float32, device=rows.device)
        for block in blocks:
            scaled = _scaled_block(scratch, rows, temperature, block)
            peak = scaled.amax(dim=-1, keepdim=True)
            local_lse[block] = scaled.sub_(peak).exp_().sum(dim=-1).log_().add_(peak.squeeze(-1))
        lse = local_lse
        if group is not None:  # the log-sum-exp over all vocabulary slices, from each rank's own
            shift = _all_reduce(local_lse.clone(), torch.distributed.ReduceOp.MAX, group)
            lse = shift + torch.log(_all_reduce(torch.exp(local_lse - shift), torch.distributed.ReduceOp.SUM, group))
        owned, local = _owned_labels(labels.reshape(-1), rows.shape[1], group)
        label_logit = torch.gather(rows, -1, local.unsqueeze(-1)).squeeze(-1).float()
        if temperature is not None:
            label_logit = label_logit / temperature.squeeze(-1)
        label_logit = _all_reduce(label_logit * owned, torch.distributed.ReduceOp.SUM, group)
        ctx.save_for_backward(logits, lse, owned, local, temperature)
        return (label_logit - lse).view(labels.shape)

    @staticmethod
    def backward(ctx, grad):
        logits, lse, owned, local, temperature = ctx.saved_tensors
        rows = logits.reshape(-1, logits.shape[-1])
        # d log p[label] / d logits = (onehot - softmax) / T, scaled by the incoming gradient
        coef = -grad.reshape(-1, 1).float()
        if temperature is not None:
            coef = coef / temperature
        grad_rows = torch.empty_like(rows)
        blocks = _row_blocks(rows.shape[0], rows.shape[1], rows.device)
        scratch = torch.empty((blocks[0].stop, rows.shape[1]), dtype=torch.float32, device=rows.device)
        minus_owned = -owned.to(torch.float32).unsqueeze(-1)
        for block in blocks:
            probs = _scaled_block(scratch, rows, temperature, block)
            probs.sub_(lse[block].unsqueeze(-1)).exp_()
            probs.scatter_add_(-1, local[block].unsqueeze(-1), minus_owned[block])
            grad_rows[block].copy_(probs.mul_(coef[block]))
        return grad_rows.view_as(logits), None, None, None


def tempered_log_probs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: Optional[torch.Tensor] = None,
    tp_group=None,
) -> torch.Tensor:
    """``log softmax(logits / temperature)[labels]`` in fp32, [s, b].

    ``logits`` [s, b, V/tp] (any float dtype; its gradient comes back in that dtype), ``labels``
    [s, b] global vocabulary ids, ``temperature`` broadcastable to [s, b] (None: 1),
    ``tp_group`` the tensor-parallel group holding the vocabulary slices (None: one rank).
    """
    if temperature is not None:
        # one value per token, [tokens, 1], in fp32
        temperature = torch.as_tensor(temperature, device=logits.device, dtype=torch.float32)
        temperature = temperature.expand(labels.shape).reshape(-1, 1).contiguous()
    return _TemperedLogProbs.apply(logits.contiguous(), labels, temperature, tp_group)
