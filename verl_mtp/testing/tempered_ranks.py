"""One rank of the tensor-parallel check of ``tempered_log_probs`` (run under ``verl_mtp.testing.gloo``).

In the package, not in tests/, because spawned ranks import their target by module name.
"""

from __future__ import annotations

import torch


def tempered_log_probs_rank(logits, labels, temperature, upstream):
    """Log-probs and this rank's logits gradient, on this rank's vocabulary slice of ``logits``."""
    import torch.distributed as dist

    from verl_mtp.megatron.tempered_log_probs import tempered_log_probs

    rank, world = dist.get_rank(), dist.get_world_size()
    local = logits.chunk(world, dim=-1)[rank].clone().requires_grad_()
    log_probs = tempered_log_probs(local, labels, temperature, dist.group.WORLD)
    (log_probs * upstream).sum().backward()
    return log_probs.detach(), local.grad
