"""Per-depth log-probabilities of the sampled tokens under the MTP heads.

Output indexing is megatron's own: depth k's hidden state at position t scores
``input_ids[t+k+1]``. Labels are moved with megatron's ``roll_tensor`` (the same calls its MTP
cross-entropy makes), so packed sequences and context-parallel shards roll exactly as megatron
rolls them: a label never comes from the next sequence, and a rolled-in slot is marked invalid.
``verl_mtp.align`` then puts the result on the main head's positions.

Logits are built one depth at a time through the model's own output layer (tensor-parallel
aware) and scored with verl's vocab-parallel log-prob helper, at the rollout temperature so the
values are comparable with the old log-probs. ``detach_output_layer`` evaluates the output layer
on detached weights, for a standalone regime in which the lm_head must not learn from MTP.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


def _output_logits(output_layer, hidden, output_weight, detach_output_layer, runtime_gather_output):
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs [b, s, K] and validity [b, s, K] of the sampled tokens for MTP depths 1..K.

    ``hidden_chunks[k-1]`` is depth k's output of the MTP block, [s, b, h] (sequence first, as
    megatron produces it); ``labels`` [b, s] are the main head's labels (``input_ids`` rolled by
    one, as verl passes them to the model); ``temperature`` broadcasts to [b, s].
    """
    from megatron.core.transformer.multi_token_prediction import roll_tensor
    from verl.utils.megatron.tensor_parallel import vocab_parallel_log_probs_from_logits

    roll = dict(shifts=-1, dims=-1, cp_group=cp_group, packed_seq_params=packed_seq_params)
    labels_k = labels
    # ``labels`` are input_ids rolled once already, so each sequence's last label is junk: start
    # from "this label lies inside the sequence" (ones rolled once), not from all-ones.
    in_sequence, _ = roll_tensor(torch.ones_like(labels, dtype=torch.float32), **roll)
    log_probs, valid = [], []
    for hidden in hidden_chunks:
        labels_k, _ = roll_tensor(labels_k, **roll)
        in_sequence, _ = roll_tensor(in_sequence, **roll)
        logits = _output_logits(output_layer, hidden, output_weight, detach_output_layer, runtime_gather_output)
        # Score in megatron's [s, b, V/tp] layout and scale in place (the output layer does not
        # need its output for backward): no extra vocabulary-sized copies per depth.
        if temperature is not None:
            logits.div_(temperature.transpose(0, 1).unsqueeze(-1).to(logits.dtype))
        log_probs.append(vocab_parallel_log_probs_from_logits(logits, labels_k.transpose(0, 1).contiguous()).transpose(0, 1))
        valid.append(in_sequence > 0)
        del logits  # one depth's vocabulary-sized logits alive at a time (plus what autograd keeps)
    return torch.stack(log_probs, dim=-1), torch.stack(valid, dim=-1)
