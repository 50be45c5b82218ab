"""Aligning MTP log-probs with the main head's, per sequence.

Indexing on each side:
  main head   log_probs[t]          = log p(input_ids[t+1] | input_ids[<= t])
  MTP depth k raw[t, k-1]           = log q_k(input_ids[t+k+1])  (megatron's native indexing:
              hidden position t fuses h_{k-1}[t] with emb(input_ids[t+k]))
  aligned     aligned[t, k-1]       = raw[t-k, k-1]  = log q_k(input_ids[t+1])

so that verl's ``no_padding_2_padding`` slices both with the same offsets (response token j of a
sequence with prompt length P sits at index P+j-1). The shift runs on the engine's un-packed,
context-parallel-gathered per-sequence output, so it never crosses a sequence boundary and needs
no boundary exchange; the first k positions of every sequence have no depth-k prediction and
come out invalid.
"""

from __future__ import annotations

import torch


def shift_right_within_sequences(
    values: torch.Tensor, valid: torch.Tensor, offsets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shift column k-1 of ``values``/``valid`` [tokens, K] right by k inside each sequence.

    ``offsets`` are the B+1 sequence boundaries in the token dimension. Positions shifted in from
    before a sequence's start are invalid; their value is 0 (callers must honour ``valid``).
    """
    if values.shape != valid.shape or values.dim() != 2:
        raise ValueError(f"expected matching [tokens, depths] tensors, got {tuple(values.shape)} and {tuple(valid.shape)}")
    tokens, depths = values.shape
    offsets = offsets.to(device=values.device, dtype=torch.long)
    if offsets[0] != 0 or offsets[-1] != tokens:
        raise ValueError(f"offsets must run from 0 to {tokens}, got {offsets.tolist()}")
    index = torch.arange(tokens, device=values.device)
    sequence_start = offsets[torch.searchsorted(offsets, index, right=True) - 1]
    position_in_sequence = index - sequence_start
    shifted_values = torch.zeros_like(values)
    shifted_valid = torch.zeros_like(valid, dtype=torch.bool)
    for k in range(1, depths + 1):
        take = position_in_sequence >= k
        source = (index - k).clamp(min=0)
        column = values[:, k - 1]
        shifted_values[:, k - 1] = torch.where(take, column[source], torch.zeros((), dtype=values.dtype, device=values.device))
        shifted_valid[:, k - 1] = take & valid[source, k - 1].bool()
    return shifted_values, shifted_valid


def align_mtp_to_main_head(raw: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The nested [B, tokens_i, K] outputs in raw (megatron) indexing -> main-head indexing."""
    if not (raw.is_nested and valid.is_nested):
        raise ValueError("expected the engine's nested (jagged) per-sequence outputs")
    offsets = raw.offsets()
    values, ok = shift_right_within_sequences(raw.values(), valid.values(), offsets)
    rebuild = lambda v: torch.nested.nested_tensor_from_jagged(v, offsets)  # noqa: E731
    return rebuild(values), rebuild(ok)
