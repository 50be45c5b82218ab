"""OCC fixture: train as the n-th mini-batch of one step of verl's mini-batch loop."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def in_update_step(loss_function, mini_batch_index: int = 0):
    """Train inside one step of verl's mini-batch loop, as its ``mini_batch_index``-th mini-batch.

    0 is the step's on-policy first mini-batch; from 1 on, OCC takes its formula at face value.
    verl's ``TrainingWorker.train_mini_batch`` opens the step in a real run, and the engine's
    ``train_batch`` (patched) advances it.
    """
    from verl_mtp.loss import actor_update_step, occ_target

    with actor_update_step(loss_function):
        target = occ_target(loss_function)
        if target is not None:
            policy_loss, config, _ = target
            for _ in range(mini_batch_index):  # the mini-batches trained before this one
                policy_loss.begin_mini_batch(config)
        yield
