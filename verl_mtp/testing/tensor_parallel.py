"""One rank of a tensor-parallel MTP scoring check (run under ``verl_mtp.testing.gloo``).

Lives in the package, not in tests/, because spawned ranks import their target by module name
and ``tests`` names the verl wheel's own top-level package there.
"""

from __future__ import annotations

import torch

from verl_mtp.local_megatron.single_process import cpu_megatron


def vocab_parallel_mtp_scoring_rank(weight, hidden, labels, sequence_parallel: bool, chunk_tokens: int):
    """MTP log-probs + gradients through megatron's ColumnParallelLinear on this rank's vocab shard.

    ``weight`` [V, h], ``hidden`` [s, b, h] and ``labels`` [b, s] are the full tensors (same on
    every rank); the rank keeps its vocabulary shard of the weight, and with sequence parallelism
    its sequence shard of the hidden states. Returns (log_probs, valid, hidden grad, weight grad).
    """
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.transformer import TransformerConfig

    from verl_mtp.megatron.mtp_log_probs import mtp_raw_log_probs

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
            local = (hidden.chunk(world)[rank] if sequence_parallel else hidden).clone().requires_grad_()
            log_probs, valid = mtp_raw_log_probs(layer, [local], labels, chunk_tokens=chunk_tokens)
            weights = torch.linspace(-1.0, 2.0, log_probs.numel()).view_as(log_probs)
            (log_probs * weights * valid).sum().backward()
        finally:
            parallel_state.destroy_model_parallel()
    return log_probs.detach(), valid, local.grad, layer.weight.grad
