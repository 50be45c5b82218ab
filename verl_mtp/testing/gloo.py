"""Run a function on N CPU processes joined in a gloo process group (data-parallel tests)."""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import torch.distributed as dist
import torch.multiprocessing as mp

from verl_mtp.local_megatron.single_process import free_port


def _worker(rank: int, world_size: int, port: int, target: Callable, per_rank_args: Sequence, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        results[rank] = target(*per_rank_args[rank])
    finally:
        dist.destroy_process_group()


def run_on_gloo_ranks(target: Callable, per_rank_args: Sequence[Sequence[Any]]) -> list:
    """``target(*per_rank_args[r])`` on rank r of a fresh gloo group; returns the results by rank.

    Uses the spawn start method, so ``target`` must be importable (a module-level function) and
    the caller's own process group, if any, is not inherited.
    """
    world_size = len(per_rank_args)
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(world_size, free_port(), target, list(per_rank_args), results), nprocs=world_size)
        return [results[r] for r in range(world_size)]
