"""Ranks of a multi-process weight export on gloo, with a deadline (tests of the export verdict).

``run_ranks_with_deadline`` starts one spawned process per rank, joined in a gloo group, and
collects what each rank reports; a rank that has not finished by the deadline is reported as
hung and killed, so a deadlock fails a test instead of hanging it.

``weight_sync_rank`` is one trainer rank of verl's weight sync on verl 0.9.1's real
``MegatronEngineWithLMHead`` with pipeline parallelism 2 (``verl_mtp.testing.real_engine``: bf16,
vanilla mbridge with verl-mtp's MiMo bridge, its CUDA redirections documented there): the
engine's ``get_per_tensor_param`` (patched by verl-mtp), its stream consumed the way verl's
``BucketedWeightSender`` consumes it (``ensure_async_iterator``), then the barrier verl's
``update_weights`` runs after a colocated sync; then the HF save through the engine's own
``MegatronCheckpointManager`` (patched ``_save_model_as_hf_via_bridge``). The sender's CUDA-IPC
transport itself is not run (no GPU, and no vLLM worker to receive).
"""

from __future__ import annotations

import os
import queue as queue_module
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, Sequence

from verl_mtp.local_megatron.single_process import free_port

HUNG = "HUNG"


def _rank_main(rank: int, world_size: int, port: int, target: Callable, args: Sequence, results, timeout_s: float):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))
    try:
        for key, outcome in target(rank, *args):
            results.put((key, rank, outcome))
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test
        results.put(("crash", rank, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


def run_ranks_with_deadline(target: Callable, args: Sequence, world_size: int, keys: Sequence[str],
                            deadline_s: float) -> dict[str, list]:
    """``target(rank, *args)`` on every rank of a fresh gloo group; it yields ``(key, outcome)``
    pairs. Returns ``{key: [outcome of rank 0, ...]}`` for ``keys``; an outcome that did not
    arrive within ``deadline_s`` seconds (from the start) is ``HUNG``. A rank that crashed
    outside ``target``'s own handling raises RuntimeError with its traceback."""
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    # The group's own timeout is past the deadline: a hung collective is caught here, not by gloo.
    procs = [
        context.Process(target=_rank_main, args=(r, world_size, port, target, args, results, deadline_s + 60),
                        daemon=True)
        for r in range(world_size)
    ]
    for proc in procs:
        proc.start()
    outcomes = {key: [HUNG] * world_size for key in keys}
    missing = len(keys) * world_size
    end = time.monotonic() + deadline_s
    try:
        while missing and time.monotonic() < end:
            try:
                key, rank, outcome = results.get(timeout=max(0.1, min(5.0, end - time.monotonic())))
            except queue_module.Empty:
                if all(not p.is_alive() for p in procs) and results.empty():
                    break
                continue
            if key == "crash":
                raise RuntimeError(f"rank {rank} crashed:\n{outcome}")
            outcomes[key][rank] = outcome
            missing -= 1
    finally:
        for proc in procs:
            proc.join(timeout=10 if not missing else 0.1)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=10)
    return outcomes


# --- one trainer rank of verl's weight sync ------------------------------------------------------

DROPPED = "model.mtp_layers.0.input_proj.weight"


def _sync_once(engine) -> str:
    """One export through verl's (patched) get_per_tensor_param, consumed like verl's sender."""
    import asyncio

    import torch.distributed as dist
    from verl.workers.rollout.utils import ensure_async_iterator

    from verl_mtp.testing.real_engine import cpu_engine_runtime

    async def send(stream):
        async for _name, _tensor in ensure_async_iterator(stream):
            pass

    try:
        with cpu_engine_runtime():
            stream, _ = engine.get_per_tensor_param(base_sync_done=False)
            asyncio.run(send(stream))
        outcome = "ok"
    except Exception as exc:  # noqa: BLE001 - what this rank raised is the outcome under test
        outcome = f"{type(exc).__name__}: {exc}"
    # verl's colocated update_weights waits for its peers after the sync (a rank that raised
    # leaves it too, so a rank stuck here is what the deadline catches).
    dist.barrier()
    return outcome


def _drop_from_shards(hf_dir: str, name: str) -> None:
    from safetensors.torch import load_file, save_file

    for file in os.listdir(hf_dir):
        if file.endswith(".safetensors"):
            path = os.path.join(hf_dir, file)
            tensors = load_file(path)
            if name in tensors:
                del tensors[name]
                save_file(tensors, path, metadata={"format": "pt"})


def _hf_save_once(manager, path: str) -> str:
    import torch.distributed as dist

    from verl_mtp.testing.real_engine import cpu_engine_runtime

    try:
        with cpu_engine_runtime():
            manager._save_model_as_hf_via_bridge(path)
        outcome = "ok"
    except Exception as exc:  # noqa: BLE001 - what this rank raised is the outcome under test
        outcome = f"{type(exc).__name__}: {exc}"
    dist.barrier()  # verl's save_checkpoint goes on to further collectives
    return outcome


def weight_sync_rank(rank: int, checkpoint: str, save_root: str):
    """One of two pipeline-parallel ranks of verl's real Megatron engine (rank 0: first stage, no
    MTP block; rank 1: last stage, holds it): weight syncs, then HF saves under ``save_root``.
    Yields (scenario, outcome) per scenario."""
    import verl  # noqa: F401 - activates the verl-mtp plugin, as in every verl worker
    from verl.workers.engine.megatron import transformer_impl

    from verl_mtp.config import ExtendedMtpConfig
    from verl_mtp.patches.core import is_patched
    from verl_mtp.testing.real_engine import RealEngine

    if not is_patched(transformer_impl.MegatronEngine.get_per_tensor_param):
        raise RuntimeError("verl-mtp's mtp_complete_export patch is not applied to MegatronEngine")
    real = RealEngine.build(checkpoint, ExtendedMtpConfig(enable=True, enable_train=True), pipeline_parallel=2)
    engine = real.engine
    bridge = engine.bridge
    yield "holds_mtp", bool([n for n, _ in real.named_parameters() if n.startswith("mtp.")])
    full_export = bridge.export_weights

    yield "complete", _sync_once(engine)

    if rank == 0:  # the first stage's export loses one MTP tensor
        bridge.export_weights = lambda models: ((n, t) for n, t in full_export(models) if n != DROPPED)
    yield "rank0_drops", _sync_once(engine)
    vars(bridge).pop("export_weights", None)

    if rank == 1:  # the last stage's exact check cannot even start
        def broken(names):
            raise KeyError("no HF name for mtp.layers.0.eh_proj.weight")

        bridge.expected_mtp_hf_names = broken
    yield "rank1_check_breaks", _sync_once(engine)
    vars(bridge).pop("expected_mtp_hf_names", None)

    yield "complete_again", _sync_once(engine)

    # verl's HF save (model/huggingface) through the engine's own checkpoint manager: every rank
    # calls the patched _save_model_as_hf_via_bridge; rank 0 writes and checks the files.
    manager = engine.checkpoint_mananager  # sic: verl's attribute name
    yield "hf_save_complete", _hf_save_once(manager, os.path.join(save_root, "complete"))
    if rank == 0:  # the writer loses an MTP tensor from the file that holds it
        real_save = bridge.save_weights

        def losing_save(models, weights_path, **kwargs):
            real_save(models, weights_path, **kwargs)
            _drop_from_shards(weights_path, DROPPED)

        bridge.save_weights = losing_save
    yield "hf_save_file_lost", _hf_save_once(manager, os.path.join(save_root, "lost"))
    vars(bridge).pop("save_weights", None)
    real.close()
