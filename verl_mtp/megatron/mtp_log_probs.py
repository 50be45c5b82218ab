"""Per-depth evaluation of the MTP heads: log-probs, cross-entropy and argmax agreement.

Output indexing is megatron's own: depth k's hidden state at position t scores
``input_ids[t+k+1]``. Labels and masks are moved with megatron's ``roll_tensor`` (the same calls
its MTP cross-entropy makes), so packed sequences and context-parallel shards roll exactly as
megatron rolls them: a label never comes from the next sequence, and a rolled-in slot is marked
invalid. ``verl_mtp.align`` then puts the results on the main head's positions.

Logits are built one depth at a time through the model's own output layer (tensor-parallel
aware), and within a depth one token chunk at a time (``chunk_tokens``): each chunk's
vocabulary-sized logits are freed as soon as its log-probs / cross-entropy are taken, and
rebuilt in backward (activation checkpointing of the output layer + loss only), so an MTP depth
never holds more than one chunk of logits, forward or backward, whatever the sequence length.
``detach_output_layer`` evaluates the output layer on detached weights, for the standalone regime
in which the lm_head must not learn from MTP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch

from verl_mtp.megatron.tempered_log_probs import tempered_log_probs


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


def token_chunks(local_len: int, chunk_len: int, *, sequence_parallel: bool = False, tp_size: int = 1):
    """Split a depth's hidden states [local_len, b, h] into chunks along the sequence.

    Returns ``[(local slice, global positions), ...]``: ``global positions`` index the labels
    [b, s] scored by that chunk, in the order the output layer's logits rows come out. Without
    sequence parallelism that is the slice itself. With it, each tensor-parallel rank holds
    ``local_len`` consecutive positions and the output layer all-gathers the chunk, so the rows
    are rank 0's slice, then rank 1's, ... (all ranks run the same chunks in the same order).
    """
    ranks = range(tp_size) if sequence_parallel else range(1)
    chunks = []
    for start in range(0, local_len, max(1, chunk_len)):
        stop = min(start + max(1, chunk_len), local_len)
        positions = torch.cat([torch.arange(r * local_len + start, r * local_len + stop) for r in ranks])
        chunks.append((slice(start, stop), positions))
    return chunks


def map_token_chunks(
    score: Callable,
    hidden: torch.Tensor,
    per_token: Sequence[Optional[torch.Tensor]],
    *,
    chunk_tokens: int,
    sequence_parallel: bool = False,
    tp_size: int = 1,
):
    """``score(hidden_chunk, *per_token_chunks) -> tuple of [b, n]``, over bounded token chunks.

    ``hidden`` is [s_local, b, h]; each ``per_token`` tensor is [b, s] (or None, passed through).
    ``chunk_tokens`` bounds the tokens (positions x batch, after the sequence-parallel gather) a
    chunk scores; 0 = one chunk. With several chunks each runs under non-reentrant activation
    checkpointing: only its inputs are kept for backward and its logits are rebuilt there, one
    chunk at a time (autograd walks the chunks in reverse creation order). Results are
    reassembled into [b, s] in label order.
    """
    local_len, batch = hidden.shape[0], hidden.shape[1]
    rows_per_position = batch * (tp_size if sequence_parallel else 1)
    chunk_len = local_len if chunk_tokens <= 0 else max(1, chunk_tokens // rows_per_position)
    chunks = token_chunks(local_len, chunk_len, sequence_parallel=sequence_parallel, tp_size=tp_size)
    if len(chunks) == 1 and not sequence_parallel:
        return score(hidden, *per_token)
    checkpointed = torch.is_grad_enabled() and len(chunks) > 1
    pieces = []
    for local, positions in chunks:
        positions = positions.to(hidden.device)
        args = [None if t is None else t.index_select(1, positions) for t in per_token]
        if checkpointed:
            # preserve_rng_state=False: the output layer and the loss draw no random numbers.
            out = torch.utils.checkpoint.checkpoint(
                score, hidden[local], *args, use_reentrant=False, preserve_rng_state=False
            )
        else:
            out = score(hidden[local], *args)
        pieces.append(out)
    order = torch.cat([positions for _, positions in chunks]).to(hidden.device)
    restore = torch.argsort(order) if sequence_parallel else None
    results = []
    for parts in zip(*pieces):
        joined = torch.cat(parts, dim=1)
        results.append(joined if restore is None else joined.index_select(1, restore))
    return tuple(results)


def _output_layer_layout(output_layer):
    """(sequence_parallel, tensor-parallel size) of the output layer's input."""
    from megatron.core import parallel_state

    sequence_parallel = bool(getattr(output_layer, "sequence_parallel", False))
    tp_size = 1
    if parallel_state.model_parallel_is_initialized():
        tp_size = parallel_state.get_tensor_model_parallel_world_size()
    return sequence_parallel and tp_size > 1, tp_size


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
    chunk_tokens: int = 0,
):
    """Log-probs [b, s, K] and validity [b, s, K] of the sampled tokens for MTP depths 1..K.

    ``hidden_chunks[k-1]`` is depth k's output of the MTP block, [s, b, h] (sequence first, as
    megatron produces it); ``labels`` [b, s] are the main head's labels; ``temperature``
    broadcasts to [b, s]. The log-probs are at the rollout temperature, comparable with the old
    log-probs. ``with_agreement`` also returns [b, s, K]: argmax == sampled token.
    ``chunk_tokens`` bounds the vocabulary-sized logits alive per depth (``map_token_chunks``).
    """
    tp_group = _tensor_parallel_group()
    sequence_parallel, tp_size = _output_layer_layout(output_layer)
    if temperature is not None and not (torch.is_tensor(temperature) and temperature.dim() == 2):
        temperature = torch.as_tensor(temperature, device=labels.device, dtype=torch.float32).expand(labels.shape)

    def score(hidden, labels_bs, temperature_bs):
        logits = output_logits(output_layer, hidden, output_weight, detach_output_layer, runtime_gather_output)
        labels_sb = labels_bs.transpose(0, 1).contiguous()
        agree = None
        if with_agreement:
            agree = argmax_agrees(logits, labels_sb, tp_group).transpose(0, 1)
        # In fp32 like the main head (whose bf16 logits Float16Module upcasts before verl divides
        # by the temperature), fused into one autograd function (tempered_log_probs says why).
        temperature_sb = None if temperature_bs is None else temperature_bs.transpose(0, 1)
        log_probs = tempered_log_probs(logits, labels_sb, temperature_sb, tp_group).transpose(0, 1)
        return (log_probs, agree) if with_agreement else (log_probs,)

    log_probs, valid, agree = [], [], []
    targets = depth_targets(labels, len(hidden_chunks), cp_group=cp_group, packed_seq_params=packed_seq_params)
    for hidden, target in zip(hidden_chunks, targets):
        out = map_token_chunks(
            score, hidden, (target.labels, temperature),
            chunk_tokens=chunk_tokens, sequence_parallel=sequence_parallel, tp_size=tp_size,
        )
        log_probs.append(out[0])
        valid.append(target.valid)
        if with_agreement:
            agree.append(out[1])
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
    chunk_tokens: int = 0,
):
    """Attach each depth's cross-entropy to ``main_hidden`` (megatron's MTPLossAutoScaler).

    Depth k's loss is ``depth_scales[k-1] * sum(mask_k * CE_k) / sum(mask_k)`` (with
    ``per_token_loss``, megatron's later division by the main token count is undone, as megatron
    does). ``record(loss_for_log, k-1)`` receives the per-token mean for logging. Returns the
    hidden states carrying the losses, and agreement/validity [b, s, K] for metrics.
    """
    if loss_mask is None:
        loss_mask = torch.ones_like(labels)
    original_num_tokens = loss_mask.sum()
    tp_group = _tensor_parallel_group()
    sequence_parallel, tp_size = _output_layer_layout(output_layer)

    def score(hidden, labels_bs):
        logits = output_logits(output_layer, hidden, output_weight, detach_output_layer, runtime_gather_output)
        if scale_logits_fn is not None:
            logits = scale_logits_fn(logits)
        agree = argmax_agrees(logits, labels_bs.transpose(0, 1), tp_group).transpose(0, 1)
        return compute_language_model_loss(labels_bs, logits), agree  # [b, n] each

    agree, valid = [], []
    targets = depth_targets(
        labels, len(hidden_chunks), loss_mask=loss_mask, cp_group=cp_group, packed_seq_params=packed_seq_params
    )
    for hidden, target, scale in zip(hidden_chunks, targets, depth_scales):
        token_loss, depth_agree = map_token_chunks(
            score, hidden, (target.labels,),
            chunk_tokens=chunk_tokens, sequence_parallel=sequence_parallel, tp_size=tp_size,
        )
        agree.append(depth_agree)
        valid.append(target.valid)
        main_hidden = attach_depth_loss(
            main_hidden, target, token_loss, scale, original_num_tokens, per_token_loss=per_token_loss, record=record
        )
    return main_hidden, torch.stack(agree, dim=-1), torch.stack(valid, dim=-1)


def attach_depth_loss(carrier, target: "DepthTargets", token_loss, scale, original_num_tokens, *,
                      per_token_loss: bool, record=None):
    """``carrier`` with depth ``target.depth``'s loss ``scale * sum(mask * token_loss) / sum(mask)``
    attached (megatron's MTPLossAutoScaler); with ``per_token_loss`` megatron's later division by the
    main token count is undone, as megatron does. ``record`` gets the per-token mean for logging."""
    from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler

    loss = target.loss_mask * token_loss  # [b, s]
    num_tokens = target.num_tokens.clamp(min=1)
    if record is not None:
        record(loss.detach().sum() * (target.num_tokens > 0).to(loss.dtype) / num_tokens, target.depth - 1)
    if per_token_loss:
        return MTPLossAutoScaler.apply(carrier, scale * loss * (original_num_tokens / num_tokens))
    return MTPLossAutoScaler.apply(carrier, scale * loss / num_tokens)
