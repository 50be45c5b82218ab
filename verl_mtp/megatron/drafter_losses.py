"""Drafter losses: how far an MTP depth's distribution is from the policy's, per token, in fp32.

The student is an MTP depth's logits ``z`` and the teacher the main head's logits ``t`` at the
position whose next token the depth predicts (depth k at position t predicts token t+k+1, as the
main head does at position t+k), both at the rollout temperature T: ``q = softmax(z / T)``,
``p = softmax(t / T)``. The teacher is detached: it never receives a gradient.

- ``kl``: forward KL(p || q) = Σ p (log p − log q). Its gradient wrt ``z`` is (q − p) / T, the
  same as soft cross-entropy's (−Σ p log q), which differs from it by p's entropy, a constant.
- ``tv``: total variation ½ Σ |p − q| = 1 − Σ min(p, q), one minus the probability that a draft
  sampled from q is accepted by speculative sampling against p. With g = ½ sign(q − p), its
  gradient wrt ``z_j`` is q_j (g_j − Σ_i q_i g_i) / T.

Logits are [s, b, V/tp]: each tensor-parallel rank holds one vocabulary slice. Global softmaxes
combine the per-rank log-sum-exps; sums over the vocabulary are all-reduced over the group (only
when one is given). Memory follows ``tempered_log_probs``: both logits are read a block of rows at a
time into small fp32 scratch buffers, forward saves only the logits it was given, and backward
writes the student's gradient straight into a tensor of the logits' dtype, the only [tokens, V]
tensor it makes. Work: the value costs one exp per element of each logits tensor, and so does the
gradient (each block's softmaxes rebuilt from its own rows); under chunk checkpointing the value
is not recomputed (see ``_DrafterDivergenceGrad``).
"""

from __future__ import annotations

from typing import Optional

import torch

from verl_mtp.megatron.tempered_log_probs import _all_reduce, _row_blocks

DIVERGENCES = ("kl", "tv")


def _scaled(scratch, logits, temperature, block):
    """``logits[block] / T`` in fp32, in the scratch buffer."""
    out = scratch[: block.stop - block.start]
    out.copy_(logits[block])
    if temperature is not None:
        out.div_(temperature[block])
    return out


def _global_lse(local_lse, group):
    """Log-sum-exp over every rank's vocabulary slice, from each rank's own."""
    if group is None:
        return local_lse
    shift = _all_reduce(local_lse.clone(), torch.distributed.ReduceOp.MAX, group)
    return shift + torch.log(_all_reduce(torch.exp(local_lse - shift), torch.distributed.ReduceOp.SUM, group))


def _scratch(blocks, vocab, device, count):
    return [torch.empty((blocks[0].stop, vocab), dtype=torch.float32, device=device) for _ in range(count)]


def _kl_forward(student, teacher, temperature, group):
    """KL per row in one pass over the vocabulary.

    With a = t/T and b = z/T: KL = E_p[a − b] − lse(a) + lse(b). Each rank sums exp(a − its max)
    and exp(a − its max)(a − b) over its slice; the slices' E_p parts are then weighted by each
    rank's share of p's mass, exp(local lse(a) − global lse(a)).
    """
    rows, vocab = student.shape
    blocks = _row_blocks(rows, 3 * vocab, student.device)  # three scratch buffers
    a_buf, b_buf, c_buf = _scratch(blocks, vocab, student.device, 3)
    # Per-row scalars in fp64: KL is a small difference of log-sum-exps of order log V, which fp32
    # would round to ~1e-6; the vocabulary-sized work stays fp32.
    lse_a = torch.empty(rows, dtype=torch.float64, device=student.device)
    lse_b = torch.empty_like(lse_a)
    mean_gap = torch.empty_like(lse_a)  # this slice's E_p[a − b] under its own normalisation
    for block in blocks:
        a = _scaled(a_buf, teacher, temperature, block)
        b = _scaled(b_buf, student, temperature, block)
        lse_b[block] = _row_lse(c_buf[: b.shape[0]].copy_(b))
        b.sub_(a).neg_()  # b := a − b
        peak_a = a.amax(dim=-1, keepdim=True)
        a.sub_(peak_a).exp_()  # a := exp(a − max)
        mass = a.sum(dim=-1)
        lse_a[block] = mass.double().log_().add_(peak_a.squeeze(-1))
        mean_gap[block] = a.mul_(b).sum(dim=-1).double().div_(mass)
    global_a = _global_lse(lse_a, group)
    global_b = _global_lse(lse_b, group)
    expected_gap = _all_reduce(mean_gap * torch.exp(lse_a - global_a), torch.distributed.ReduceOp.SUM, group)
    return (expected_gap - global_a + global_b).float()


def _row_lse(x):
    """Log-sum-exp of each row of the fp32 block ``x`` (overwritten), in fp64."""
    peak = x.amax(dim=-1, keepdim=True)
    return x.sub_(peak).exp_().sum(dim=-1).double().log_().add_(peak.squeeze(-1))


def _block_probs(scratch, logits, temperature, block, group):
    """softmax(logits[block] / T) over the whole vocabulary, in fp32 in ``scratch``: one exp per element.

    A block holds whole rows of this rank's slice, so its maximum and mass are known in the block;
    across ranks the block's log-sum-exps are combined by a collective per block (every rank walks
    the same blocks) and each rank rescales its exp(x − its max).
    """
    x = _scaled(scratch, logits, temperature, block)
    peak = x.amax(dim=-1, keepdim=True)
    mass = x.sub_(peak).exp_().sum(dim=-1, keepdim=True)
    if group is None:
        return x.div_(mass)
    lse = _global_lse(mass.double().log_().add_(peak), group)
    return x.mul_(torch.exp(peak.double() - lse).float())


def _tv_value(student, teacher, temperature, group):
    """½ Σ |p − q| per row: each block's p and q with one exp per element, then one row sum."""
    rows, vocab = student.shape
    blocks = _row_blocks(rows, 2 * vocab, student.device)
    p_buf, q_buf = _scratch(blocks, vocab, student.device, 2)
    tv = torch.empty(rows, dtype=torch.float32, device=student.device)
    for block in blocks:
        p = _block_probs(p_buf, teacher, temperature, block, group)
        q = _block_probs(q_buf, student, temperature, block, group)
        tv[block] = torch.linalg.vector_norm(p.sub_(q), ord=1, dim=-1)
    return _all_reduce(tv, torch.distributed.ReduceOp.SUM, group).mul_(0.5)


class _DrafterDivergenceGrad(torch.autograd.Function):
    """Zeros in forward, the divergence's gradient wrt the student in backward.

    The value is added by the caller after this node (``drafter_divergence``): under activation
    checkpointing a chunk's recompute stops once this node has saved its inputs (torch's early
    stop), so the value's vocabulary passes run once per chunk instead of twice. Backward needs
    no statistics from forward: each block's softmaxes come from its own rows.
    """

    @staticmethod
    def forward(ctx, student, teacher, temperature, kind, group):
        ctx.kind, ctx.group = kind, group
        ctx.save_for_backward(student, teacher, temperature)
        return student.new_zeros(student.shape[:-1], dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad):
        student, teacher, temperature = ctx.saved_tensors
        rows = student.reshape(-1, student.shape[-1])
        teacher_rows = teacher.reshape(-1, teacher.shape[-1])
        coef = grad.reshape(-1, 1).float()
        if temperature is not None:
            coef = coef / temperature  # d(z/T)/dz
        grad_rows = torch.empty_like(rows)
        blocks = _row_blocks(rows.shape[0], 2 * rows.shape[1], rows.device)
        p_buf, q_buf = _scratch(blocks, rows.shape[1], rows.device, 2)
        for block in blocks:
            p = _block_probs(p_buf, teacher_rows, temperature, block, ctx.group)
            q = _block_probs(q_buf, rows, temperature, block, ctx.group)
            if ctx.kind == "kl":
                out = q.sub_(p)  # (q − p)
            else:
                g = p.sub_(q).neg_().sign_().mul_(0.5)  # g = ½ sign(q − p)
                q_dot_g = _all_reduce(torch.linalg.vecdot(q, g), torch.distributed.ReduceOp.SUM, ctx.group)
                out = q.mul_(g.sub_(q_dot_g.unsqueeze(-1)))  # q (g − Σ q g)
            grad_rows[block].copy_(out.mul_(coef[block]))
        return grad_rows.view_as(student), None, None, None, None


@torch.no_grad()
def _divergence_value(student, teacher, temperature, kind, group):
    rows = student.reshape(-1, student.shape[-1])
    teacher_rows = teacher.reshape(-1, teacher.shape[-1])
    if kind == "kl":
        value = _kl_forward(rows, teacher_rows, temperature, group)
    else:
        value = _tv_value(rows, teacher_rows, temperature, group)
    return value.view(student.shape[:-1])


def drafter_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str,
    temperature: Optional[torch.Tensor] = None,
    tp_group=None,
) -> torch.Tensor:
    """Per-token ``kind`` divergence (``kl`` or ``tv``) of the student from the teacher, [s, b] fp32.

    ``student_logits`` and ``teacher_logits`` [s, b, V/tp] (any float dtype; the student's gradient
    comes back in its dtype, the teacher is detached), ``temperature`` broadcastable to [s, b]
    (None: 1), ``tp_group`` the tensor-parallel group holding the vocabulary slices (None: one rank).
    """
    if kind not in DIVERGENCES:
        raise ValueError(f"drafter divergence kind={kind!r}: expected one of {DIVERGENCES}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"drafter divergence: student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape"
        )
    if temperature is not None:
        temperature = torch.as_tensor(temperature, device=student_logits.device, dtype=torch.float32)
        temperature = temperature.expand(student_logits.shape[:-1]).reshape(-1, 1).contiguous()
    student, teacher = student_logits.contiguous(), teacher_logits.detach().contiguous()
    if not (torch.is_grad_enabled() and student.requires_grad):
        return _divergence_value(student, teacher, temperature, kind, tp_group)
    # the gradient's node first, the value after it (see _DrafterDivergenceGrad)
    carrier = _DrafterDivergenceGrad.apply(student, teacher, temperature, kind, tp_group)
    return carrier + _divergence_value(student, teacher, temperature, kind, tp_group)


def mtp_drafter_divergences(
    output_layer: torch.nn.Module,
    hidden_chunks,
    teacher_hidden_chunks,
    kind: str,
    temperature: Optional[torch.Tensor] = None,
    *,
    output_weight: Optional[torch.Tensor] = None,
    detach_output_layer: bool = False,
    scale_logits_fn=None,
    runtime_gather_output=None,
    chunk_tokens: int = 0,
    agreement_labels=None,
):
    """Per-token drafter divergence [b, s, K] of MTP depths 1..K from the main head, in fp32.

    ``hidden_chunks[k-1]`` is depth k's MTP output [s, b, h] and ``teacher_hidden_chunks[k-1]``
    the main head's final hidden states already aligned to it (row t holds position t+k), in the
    same (sequence-parallel) layout. Both go through the model's output layer chunk by chunk
    (``map_token_chunks``): the teacher's logits on detached inputs and weights without autograd,
    so per chunk only the two chunks' logits exist, and none outlive it. ``temperature`` [b, s]
    (or broadcastable) is the rollout temperature; positions whose label lies outside the sequence
    come back with finite junk and must be masked by the caller (``depth_targets``' validity).
    ``agreement_labels`` (depth k's labels [b, s] per depth) also returns [b, s, K]: the depth's
    argmax == its label, as a pair (divergence, agreement).
    """
    from verl_mtp.megatron.mtp_log_probs import (
        _output_layer_layout,
        _tensor_parallel_group,
        argmax_agrees,
        map_token_chunks,
        output_logits,
    )

    if kind not in DIVERGENCES:
        raise ValueError(f"drafter divergence kind={kind!r}: expected one of {DIVERGENCES}")
    tp_group = _tensor_parallel_group()
    sequence_parallel, tp_size = _output_layer_layout(output_layer)
    batch = hidden_chunks[0].shape[1]
    full_len = hidden_chunks[0].shape[0] * (tp_size if sequence_parallel else 1)
    if temperature is not None:
        temperature = torch.as_tensor(temperature, device=hidden_chunks[0].device, dtype=torch.float32)
        temperature = temperature.expand(batch, full_len)

    def score(joined, temperature_bs, labels_bs=None):
        # contiguous: torch.matmul does not fold a strided 3-D input that requires grad into one GEMM;
        # it broadcasts the [h, V] weight to every position and runs a batched product (~20x the step)
        student_hidden, teacher_hidden = (half.contiguous() for half in joined.chunk(2, dim=-1))
        student = output_logits(output_layer, student_hidden, output_weight, detach_output_layer, runtime_gather_output)
        with torch.no_grad():
            teacher = output_logits(output_layer, teacher_hidden, output_weight, True, runtime_gather_output)
        if scale_logits_fn is not None:
            student = scale_logits_fn(student)
            with torch.no_grad():
                teacher = scale_logits_fn(teacher)
        temperature_sb = None if temperature_bs is None else temperature_bs.transpose(0, 1)
        divergence = drafter_divergence(student, teacher, kind, temperature_sb, tp_group).transpose(0, 1)
        if labels_bs is None:
            return (divergence,)
        return divergence, argmax_agrees(student, labels_bs.transpose(0, 1), tp_group).transpose(0, 1)

    out, agree = [], []
    labels = agreement_labels if agreement_labels is not None else [None] * len(hidden_chunks)
    for hidden, teacher_hidden, depth_labels in zip(hidden_chunks, teacher_hidden_chunks, labels, strict=True):
        # one [s, b, 2h] input per depth, so the chunking slices student and teacher rows together
        joined = torch.cat([hidden, teacher_hidden.detach()], dim=-1)
        per_token = (temperature,) if depth_labels is None else (temperature, depth_labels)
        scored = map_token_chunks(
            score, joined, per_token,
            chunk_tokens=chunk_tokens, sequence_parallel=sequence_parallel, tp_size=tp_size,
        )
        out.append(scored[0])
        if depth_labels is not None:
            agree.append(scored[1])
    if agreement_labels is None:
        return torch.stack(out, dim=-1)
    return torch.stack(out, dim=-1), torch.stack(agree, dim=-1)


@torch.no_grad()
def aligned_teacher_hidden(
    main_hidden: torch.Tensor,
    num_depths: int,
    *,
    sequence_parallel: bool = False,
    tp_group=None,
    cp_group=None,
    packed_seq_params=None,
):
    """The main head's final hidden states aligned to depths 1..K, detached: a list of [s, b, h].

    Depth k's row t holds the main head's row t+k (whose next token depth k predicts at t), rolled
    with megatron's ``roll_tensor`` exactly as ``depth_targets`` rolls the labels, so packed
    sequences and context-parallel shards line up with the labels; rows whose label lies outside
    the sequence hold junk the caller masks. With sequence parallelism each tensor-parallel rank
    holds a slice of the sequence: the slices are gathered (hidden-sized, not vocabulary-sized),
    rolled, and each rank keeps its own slice again.
    """
    from megatron.core.transformer.multi_token_prediction import roll_tensor

    hidden = main_hidden.detach()
    tp_size = torch.distributed.get_world_size(tp_group) if (sequence_parallel and tp_group is not None) else 1
    if tp_size > 1:
        parts = [torch.empty_like(hidden) for _ in range(tp_size)]
        torch.distributed.all_gather(parts, hidden.contiguous(), group=tp_group)
        hidden = torch.cat(parts, dim=0)
    rows = hidden.movedim(0, -1)  # roll_tensor rolls the last dimension: [b, h, s]
    out = []
    for _ in range(num_depths):
        rows, _ = roll_tensor(rows, shifts=-1, dims=-1, cp_group=cp_group, packed_seq_params=packed_seq_params)
        aligned = rows.movedim(-1, 0)
        if tp_size > 1:
            aligned = aligned.chunk(tp_size, dim=0)[torch.distributed.get_rank(tp_group)]
        out.append(aligned.contiguous())
    return out


def add_mtp_drafter_losses(
    carrier: torch.Tensor,
    main_hidden: torch.Tensor,
    hidden_chunks,
    labels: torch.Tensor,
    loss_mask: Optional[torch.Tensor],
    kind: str,
    temperature=None,
    *,
    output_layer: torch.nn.Module,
    output_weight: Optional[torch.Tensor],
    depth_scales,
    per_token_loss: bool,
    record=None,
    detach_output_layer: bool = False,
    scale_logits_fn=None,
    cp_group=None,
    packed_seq_params=None,
    runtime_gather_output=None,
    chunk_tokens: int = 0,
):
    """Attach each depth's drafter divergence to ``carrier`` (megatron's MTPLossAutoScaler).

    The drafter-loss twin of ``add_mtp_ce_losses``: depth k's loss is ``depth_scales[k-1] *
    sum(mask_k * D_k) / sum(mask_k)`` with D the per-token ``kind`` divergence from the main head
    at the aligned position (``main_hidden`` [s, b, h], the main head's final hidden states, is
    detached), the same masks, normalisation and ``record`` as the cross-entropy. Returns the
    carrier and agreement / validity [b, s, K] for metrics.
    """
    from verl_mtp.megatron.mtp_log_probs import (
        _output_layer_layout,
        _tensor_parallel_group,
        attach_depth_loss,
        depth_targets,
    )

    if loss_mask is None:
        loss_mask = torch.ones_like(labels)
    original_num_tokens = loss_mask.sum()
    if temperature is not None and not (torch.is_tensor(temperature) and temperature.dim() == 2):
        temperature = torch.as_tensor(temperature, device=labels.device, dtype=torch.float32).expand(labels.shape)
    sequence_parallel, _ = _output_layer_layout(output_layer)
    targets = list(depth_targets(
        labels, len(hidden_chunks), loss_mask=loss_mask, cp_group=cp_group, packed_seq_params=packed_seq_params
    ))
    teachers = aligned_teacher_hidden(
        main_hidden, len(hidden_chunks), sequence_parallel=sequence_parallel, tp_group=_tensor_parallel_group(),
        cp_group=cp_group, packed_seq_params=packed_seq_params,
    )
    divergence, agree = mtp_drafter_divergences(
        output_layer, hidden_chunks, teachers, kind, temperature,
        output_weight=output_weight, detach_output_layer=detach_output_layer, scale_logits_fn=scale_logits_fn,
        runtime_gather_output=runtime_gather_output, chunk_tokens=chunk_tokens,
        agreement_labels=[t.labels for t in targets],
    )
    for target, scale in zip(targets, depth_scales):
        carrier = attach_depth_loss(
            carrier, target, divergence[..., target.depth - 1], scale, original_num_tokens,
            per_token_loss=per_token_loss, record=record,
        )
    return carrier, agree, torch.stack([t.valid for t in targets], dim=-1)
