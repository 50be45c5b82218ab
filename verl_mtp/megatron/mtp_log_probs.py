"""Per-depth evaluation of the MTP heads: log-probs, cross-entropy and argmax agreement.

Output indexing is megatron's own: depth k's hidden state at position t scores
``input_ids[t+k+1]``. Labels and masks are moved with megatron's ``roll_tensor`` (the same calls
its MTP cross-entropy makes), so packed sequences and context-parallel shards roll exactly as
megatron rolls them: a label never comes from the next sequence, and a rolled-in slot is marked
invalid. ``verl_mtp.align`` then puts the results on the main head's positions.

Logits are built one depth at a time through the model's own output layer (tensor-parallel
aware). ``detach_output_layer`` evaluates the output layer on detached weights, for the
standalone regime in which the lm_head must not learn from MTP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch


def output_logits(output_layer, hidden, output_weight, detach_output_layer, runtime_gather_output):
    """The output layer on ``hidden`` [s, b, h] -> [s, b, V/tp], on detached weights if asked."""
    if not detach_output_layer:
        logits, _ = output_layer(hidden, weight=output_weight, runtime_gather_output=runtime_gather_output)
        return logits
    params = {name: p.detach() for name, p in output_layer.named_parameters()}
    params.update(dict(output_layer.named_buffers()))
    weight = output_weight.detach() if output_weight is not None else None
    logits, _ = torch.func.functional_call(
        output_layer, params, args=(hidden,), kwargs={"weight": weight, "runtime_gather_output": runtime_gather_output}
    )
    return logits


def _tensor_parallel_group():
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return None
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return None
    return parallel_state.get_tensor_model_parallel_group()


@torch.no_grad()
def argmax_agrees(logits: torch.Tensor, labels: torch.Tensor, tp_group=None) -> torch.Tensor:
    """Whether the label is the argmax of vocabulary-parallel ``logits`` [s, b, V/tp] (ties agree).

    ``labels`` [s, b] are global vocabulary ids. With tensor parallelism each rank holds a vocab
    slice: the label's logit comes from the rank that owns it and the maximum is taken over all
    ranks, so no rank gathers the full vocabulary.
    """
    shard = logits.shape[-1]
    rank = torch.distributed.get_rank(tp_group) if tp_group is not None else 0
    local = labels - rank * shard
    owned = (local >= 0) & (local < shard)
    label_logit = torch.gather(logits, -1, local.clamp(0, shard - 1).unsqueeze(-1)).squeeze(-1).float()
    label_logit = torch.where(owned, label_logit, torch.full_like(label_logit, float("-inf")))
    best = logits.max(dim=-1).values.float()
    if tp_group is not None:
        torch.distributed.all_reduce(label_logit, op=torch.distributed.ReduceOp.MAX, group=tp_group)
        torch.distributed.all_reduce(best, op=torch.distributed.ReduceOp.MAX, group=tp_group)
    return label_logit >= best


@dataclass
class DepthTargets:
    depth: int  # 1-based
    labels: torch.Tensor  # [b, s]: input_ids[t+k+1]
    valid: torch.Tensor  # [b, s] bool: that label lies inside the sequence
    loss_mask: Optional[torch.Tensor]  # [b, s]: the response mask rolled like the labels (CE only)
    num_tokens: Optional[torch.Tensor]  # loss_mask.sum() as roll_tensor returns it


def depth_targets(
    labels: torch.Tensor,
    num_depths: int,
    *,
    loss_mask: Optional[torch.Tensor] = None,
    cp_group=None,
    packed_seq_params=None,
) -> Iterator[DepthTargets]:
    """Labels, validity and loss mask of depths 1..num_depths, from the main head's ones.

    ``labels`` are input_ids rolled once already (as verl passes them to the model) and
    ``loss_mask`` is rolled identically, so depth k rolls both k more times. Each sequence's last
    label is junk: validity starts from ones rolled once, not from all-ones.
    """
    from megatron.core.transformer.multi_token_prediction import roll_tensor

    roll = dict(shifts=-1, dims=-1, cp_group=cp_group, packed_seq_params=packed_seq_params)
    in_sequence, _ = roll_tensor(torch.ones_like(labels, dtype=torch.float32), **roll)
    num_tokens = None
    for depth in range(1, num_depths + 1):
        labels, _ = roll_tensor(labels, **roll)
        in_sequence, _ = roll_tensor(in_sequence, **roll)
        if loss_mask is not None:
            loss_mask, num_tokens = roll_tensor(loss_mask, **roll)
        yield DepthTargets(depth, labels, in_sequence > 0, loss_mask, num_tokens)


def mtp_raw_log_probs(
    output_layer: torch.nn.Module,
    hidden_chunks: Sequence[torch.Tensor],
    labels: torch.Tensor,
    temperature: Optional[torch.Tensor] = None,
    *,
    output_weight: Optional[torch.Tensor] = None,
    detach_output_layer: bool = False,
    cp_group=None,
    packed_seq_params=None,
    runtime_gather_output=None,
    with_agreement: bool = False,
):
    """Log-probs [b, s, K] and validity [b, s, K] of the sampled tokens for MTP depths 1..K.

    ``hidden_chunks[k-1]`` is depth k's output of the MTP block, [s, b, h] (sequence first, as
    megatron produces it); ``labels`` [b, s] are the main head's labels; ``temperature``
    broadcasts to [b, s]. The log-probs are at the rollout temperature, comparable with the old
    log-probs. ``with_agreement`` also returns [b, s, K]: argmax == sampled token.
    """
    from verl.utils.megatron.tensor_parallel import vocab_parallel_log_probs_from_logits

    tp_group = _tensor_parallel_group()
    log_probs, valid, agree = [], [], []
    targets = depth_targets(labels, len(hidden_chunks), cp_group=cp_group, packed_seq_params=packed_seq_params)
    for hidden, target in zip(hidden_chunks, targets):
        logits = output_logits(output_layer, hidden, output_weight, detach_output_layer, runtime_gather_output)
        labels_sb = target.labels.transpose(0, 1).contiguous()
        if with_agreement:  # before scoring: megatron's vocab-parallel CE works on the logits in place
            agree.append(argmax_agrees(logits, labels_sb, tp_group).transpose(0, 1))
        # Score in megatron's [s, b, V/tp] layout and scale in place (the output layer does not
        # need its output for backward): no extra vocabulary-sized copies per depth.
        if temperature is not None:
            logits.div_(temperature.transpose(0, 1).unsqueeze(-1).to(logits.dtype))
        log_probs.append(vocab_parallel_log_probs_from_logits(logits, labels_sb).transpose(0, 1))
        valid.append(target.valid)
        del logits  # one depth's vocabulary-sized logits alive at a time (plus what autograd keeps)
    result = (torch.stack(log_probs, dim=-1), torch.stack(valid, dim=-1))
    return (*result, torch.stack(agree, dim=-1)) if with_agreement else result


def add_mtp_ce_losses(
    main_hidden: torch.Tensor,
    hidden_chunks: Sequence[torch.Tensor],
    labels: torch.Tensor,
    loss_mask: Optional[torch.Tensor],
    *,
    output_layer: torch.nn.Module,
    output_weight: Optional[torch.Tensor],
    compute_language_model_loss: Callable,
    depth_scales: Sequence[float],
    per_token_loss: bool,
    record: Optional[Callable[[torch.Tensor, int], None]] = None,
    detach_output_layer: bool = False,
    scale_logits_fn: Optional[Callable] = None,
    cp_group=None,
    packed_seq_params=None,
    runtime_gather_output=None,
):
    """Attach each depth's cross-entropy to ``main_hidden`` (megatron's MTPLossAutoScaler).

    Depth k's loss is ``depth_scales[k-1] * sum(mask_k * CE_k) / sum(mask_k)`` (with
    ``per_token_loss``, megatron's later division by the main token count is undone, as megatron
    does). ``record(loss_for_log, k-1)`` receives the per-token mean for logging. Returns the
    hidden states carrying the losses, and agreement/validity [b, s, K] for metrics.
    """
    from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler

    if loss_mask is None:
        loss_mask = torch.ones_like(labels)
    original_num_tokens = loss_mask.sum()
    tp_group = _tensor_parallel_group()
    agree, valid = [], []
    targets = depth_targets(
        labels, len(hidden_chunks), loss_mask=loss_mask, cp_group=cp_group, packed_seq_params=packed_seq_params
    )
    for hidden, target, scale in zip(hidden_chunks, targets, depth_scales):
        logits = output_logits(output_layer, hidden, output_weight, detach_output_layer, runtime_gather_output)
        if scale_logits_fn is not None:
            logits = scale_logits_fn(logits)
        agree.append(argmax_agrees(logits, target.labels.transpose(0, 1), tp_group).transpose(0, 1))
        valid.append(target.valid)
        loss = target.loss_mask * compute_language_model_loss(target.labels, logits)  # [b, s]
        del logits
        num_tokens = target.num_tokens.clamp(min=1)
        if record is not None:
            record(loss.detach().sum() * (target.num_tokens > 0).to(loss.dtype) / num_tokens, target.depth - 1)
        if per_token_loss:
            main_hidden = MTPLossAutoScaler.apply(main_hidden, scale * loss * (original_num_tokens / num_tokens))
        else:
            main_hidden = MTPLossAutoScaler.apply(main_hidden, scale * loss / num_tokens)
    return main_hidden, torch.stack(agree, dim=-1), torch.stack(valid, dim=-1)
