"""Ranks of the tensor-parallel checks of the drafter losses (run under ``verl_mtp.testing.gloo``).

In the package, not in tests/, because spawned ranks import their target by module name.
"""

from __future__ import annotations

import torch

from verl_mtp.local_megatron.single_process import cpu_megatron


def drafter_divergence_rank(student, teacher, kinds, temperature, upstream):
    """{kind: (divergence, this rank's student-logits gradient)} on this rank's vocabulary slice."""
    import torch.distributed as dist

    from verl_mtp.megatron.drafter_losses import drafter_divergence

    rank, world = dist.get_rank(), dist.get_world_size()
    out = {}
    for kind in kinds:
        local = student.chunk(world, dim=-1)[rank].clone().requires_grad_()
        local_teacher = teacher.chunk(world, dim=-1)[rank].clone().requires_grad_()
        value = drafter_divergence(local, local_teacher, kind, temperature, dist.group.WORLD)
        (value * upstream).sum().backward()
        assert local_teacher.grad is None
        out[kind] = (value.detach(), local.grad)
    return out


def vocab_parallel_drafter_rank(
    weight, hidden, teacher_hidden, kind, temperature, upstream, sequence_parallel, chunk_tokens
):
    """``mtp_drafter_divergences`` through megatron's ColumnParallelLinear on this rank's vocab shard.

    ``weight`` [V, h], ``hidden`` / ``teacher_hidden`` [s, b, h], ``temperature`` and ``upstream``
    [b, s] are the full tensors (same on every rank); the rank keeps its vocabulary shard of the
    weight and, with sequence parallelism, its sequence shard of both hidden states. Returns
    (divergence [b, s], hidden grad, teacher hidden grad (None expected), weight grad).
    """
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.transformer import TransformerConfig

    from verl_mtp.megatron.drafter_losses import mtp_drafter_divergences

    rank, world = dist.get_rank(), dist.get_world_size()
    with cpu_megatron():
        parallel_state.initialize_model_parallel(world, 1)
        try:
            config = TransformerConfig(
                num_layers=1, hidden_size=weight.shape[1], num_attention_heads=4, tensor_model_parallel_size=world,
                sequence_parallel=sequence_parallel, use_cpu_initialization=True, gradient_accumulation_fusion=False,
            )
            layer = ColumnParallelLinear(
                weight.shape[1], weight.shape[0], config=config, init_method=torch.nn.init.zeros_, bias=False,
                gather_output=False,
            )
            layer.weight.data.copy_(weight.chunk(world)[rank])
            shard = (lambda t: t.chunk(world)[rank]) if sequence_parallel else (lambda t: t)
            local = shard(hidden).clone().requires_grad_()
            local_teacher = shard(teacher_hidden).clone().requires_grad_()
            divergence = mtp_drafter_divergences(
                layer, [local], [local_teacher], kind, temperature, chunk_tokens=chunk_tokens
            )[..., 0]
            (divergence * upstream).sum().backward()
        finally:
            parallel_state.destroy_model_parallel()
    return divergence.detach(), local.grad, local_teacher.grad, layer.weight.grad


def aligned_teacher_rank(main_hidden, num_depths):
    """``aligned_teacher_hidden`` under sequence parallelism: this rank's slices, per depth."""
    import torch.distributed as dist

    from verl_mtp.megatron.drafter_losses import aligned_teacher_hidden

    rank, world = dist.get_rank(), dist.get_world_size()
    local = main_hidden.chunk(world, dim=0)[rank].clone()
    return aligned_teacher_hidden(local, num_depths, sequence_parallel=True, tp_group=dist.group.WORLD)
