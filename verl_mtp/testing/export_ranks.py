"""Ranks of a multi-process weight export on gloo, with a deadline (tests of the export verdict).

``run_ranks_with_deadline`` starts one spawned process per rank, joined in a gloo group, and
collects what each rank reports; a rank that has not finished by the deadline is reported as
hung and killed, so a deadlock fails a test instead of hanging it.

``weight_sync_rank`` is one trainer rank of verl's weight sync: verl 0.9.1's
``MegatronEngine.get_per_tensor_param`` (patched by verl-mtp) on a real megatron-core MiMo model
loaded through verl-mtp's mbridge bridge, its stream consumed the way verl's
``BucketedWeightSender`` consumes it (``ensure_async_iterator``), then the barrier verl's
``update_weights`` runs after a colocated sync; then verl's HF save through a real
``MegatronCheckpointManager`` (patched ``_save_model_as_hf_via_bridge``). What stands in: the engine object (a namespace
with the attributes the method reads; building verl's engine needs CUDA) and verl's
``load_megatron_model_to_gpu`` (a no-op: there is no GPU to load to).
"""

from __future__ import annotations

import os
import queue as queue_module
import socket
import time
import traceback
from datetime import timedelta
from types import SimpleNamespace
from typing import Any, Callable, Sequence

HUNG = "HUNG"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    port = _free_port()
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


def _sync_once(transformer_impl, engine) -> str:
    """One export through verl's patched get_per_tensor_param, consumed like verl's sender."""
    import asyncio

    import torch.distributed as dist
    from verl.workers.rollout.utils import ensure_async_iterator

    from verl_mtp.testing.tiny_megatron import cpu_megatron

    async def send(stream):
        count = 0
        async for _name, _tensor in ensure_async_iterator(stream):
            count += 1
        return count

    try:
        with cpu_megatron():
            stream, _ = transformer_impl.MegatronEngine.get_per_tensor_param(engine, base_sync_done=False)
            asyncio.run(send(stream))
        outcome = "ok"
    except Exception as exc:  # noqa: BLE001 - what this rank raised is the outcome under test
        outcome = f"{type(exc).__name__}: {exc}"
    # verl's colocated update_weights waits for its peers after the sync (a rank that raised
    # leaves it too, so a rank stuck here is what the deadline catches).
    dist.barrier()
    return outcome


def weight_sync_rank(rank: int, checkpoint: str, save_root: str):
    """Scenarios of weight syncs, then of HF saves under ``save_root``; yields (scenario, outcome)."""
    import verl  # noqa: F401 - activates the verl-mtp plugin, as in every verl worker
    from verl.workers.engine.megatron import transformer_impl

    from verl_mtp.models.bridges import load_hf_model

    if not hasattr(transformer_impl.MegatronEngine.get_per_tensor_param, "__verl_mtp_original__"):
        raise RuntimeError("verl-mtp's mtp_complete_export patch is not applied to MegatronEngine")
    transformer_impl.load_megatron_model_to_gpu = lambda *args, **kwargs: None  # CUDA-bound, nothing to load
    loaded = load_hf_model(checkpoint)  # TP=PP=1 on this 2-rank group: data parallel 2
    bridge = loaded.bridge
    engine = SimpleNamespace(
        peft_cls=None, _qat_enabled=False, vanilla_bridge=True, bridge=bridge, module=[loaded.model],
        model_config=SimpleNamespace(lora={}, hf_config=bridge.hf_config),
    )
    full_export = bridge.export_weights

    yield "complete", _sync_once(transformer_impl, engine)

    if rank == 1:  # this rank's export loses one MTP tensor
        bridge.export_weights = lambda models: ((n, t) for n, t in full_export(models) if n != DROPPED)
    yield "rank1_drops", _sync_once(transformer_impl, engine)
    bridge.export_weights = full_export

    if rank == 0:  # this rank's check cannot even start
        def broken(names):
            raise KeyError("no HF name for mtp.layers.0.eh_proj.weight")

        bridge.expected_mtp_hf_names = broken
    yield "rank0_check_breaks", _sync_once(transformer_impl, engine)
    vars(bridge).pop("expected_mtp_hf_names", None)

    yield "complete_again", _sync_once(transformer_impl, engine)

    # verl's HF save (model/huggingface): every rank calls the patched
    # MegatronCheckpointManager._save_model_as_hf_via_bridge; rank 0 writes and checks the files.
    from verl_mtp.testing.ckpt_ranks import make_hf_manager

    manager = make_hf_manager(loaded)
    yield "hf_save_complete", _hf_save_once(manager, os.path.join(save_root, "complete"))
    if rank == 0:  # the writer loses an MTP tensor from the file that holds it
        real_save = bridge.save_weights

        def losing_save(models, weights_path, **kwargs):
            real_save(models, weights_path, **kwargs)
            _drop_from_shards(weights_path, DROPPED)

        bridge.save_weights = losing_save
    yield "hf_save_file_lost", _hf_save_once(manager, os.path.join(save_root, "lost"))
    vars(bridge).pop("save_weights", None)


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

    from verl_mtp.testing.tiny_megatron import cpu_megatron

    try:
        with cpu_megatron():
            manager._save_model_as_hf_via_bridge(path)
        outcome = "ok"
    except Exception as exc:  # noqa: BLE001 - what this rank raised is the outcome under test
        outcome = f"{type(exc).__name__}: {exc}"
    dist.barrier()  # verl's save_checkpoint goes on to further collectives
    return outcome
