"""verl's MegatronCheckpointManager on CPU around a tiny megatron-core model (tests only).

Lives in the package, not in tests/, because ranks spawned by ``verl_mtp.testing.gloo`` import
their target by module name (and ``tests`` names the verl wheel's own top-level package there).

CPU boundary: the manager saves and loads ``['model', 'extra']`` with ``use_dist_checkpointing``
(or ``['model']`` on the Hugging Face path through verl-mtp's mbridge bridges);
megatron-core's optimizer hard-codes CUDA (``FP32Optimizer.__init__`` allocates its loss scale
with ``device='cuda'``, ``get_grad_norm_fp32`` too), so no optimizer is built. Two more CUDA-only
spots are redirected by ``cpu_checkpointing``.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import verl  # noqa: F401 - activates the verl-mtp plugin in spawned ranks, as in every verl process

from verl_mtp.local_megatron.single_process import cpu_megatron
from verl_mtp.local_megatron.tiny_gpt import TinyGPTSpec, build_tiny_gpt


@contextlib.contextmanager
def cpu_checkpointing():
    """``cpu_megatron`` plus: dist_checkpointing's write preload calls ``torch.cuda.synchronize``,
    and verl's ``extra`` content saves/restores the CUDA RNG tracker's states, never seeded on CPU
    (verl raises on an empty one): the tracker holds a CPU generator state meanwhile."""
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker()
    saved_states, saved_sync = tracker.get_states(), torch.cuda.synchronize
    tracker.set_states({"model-parallel-rng": torch.get_rng_state()})
    torch.cuda.synchronize = lambda *args, **kwargs: None
    try:
        with cpu_megatron():
            yield
    finally:
        torch.cuda.synchronize = saved_sync
        tracker.set_states(saved_states)


def _checkpoint_config(save, load):
    from omegaconf import OmegaConf

    return OmegaConf.create({"save_contents": list(save), "load_contents": list(load), "async_save": False})


def make_manager(model, mtp=None, save=("model", "extra"), load=("model", "extra")):
    """verl's MegatronCheckpointManager as the Megatron engine builds it (dist_checkpointing for the
    model, no optimizer); ``mtp`` is attached as the engine patch attaches the run's MTP config."""
    from omegaconf import OmegaConf
    from verl.utils.checkpoint.megatron_checkpoint_manager import MegatronCheckpointManager

    from verl_mtp.ckpt.mtp_manifest import MTP_CONFIG_ATTR

    manager = MegatronCheckpointManager(
        config=OmegaConf.create(
            {
                "model": {"path": "unused"},
                "megatron": {
                    "dist_ckpt_optim_fully_reshardable": False,
                    "distrib_optim_fully_reshardable_mem_efficient": False,
                },
            }
        ),
        checkpoint_config=_checkpoint_config(save, load),
        model_config=None, transformer_config=model.config, role="actor", model=[model], arch="GPTModel",
        hf_config=None, param_dtype=torch.float32, share_embeddings_and_output_weights=False,
        processing_class=None, optimizer=None, optimizer_scheduler=None, use_distributed_optimizer=False,
        use_dist_checkpointing=True,
    )
    if mtp is not None:
        setattr(manager, MTP_CONFIG_ATTR, mtp)
    return manager


def make_hf_manager(loaded, mtp=None, save=("model",), load=("model",)):
    """The manager on verl's default model path: Hugging Face files through mbridge
    (``use_dist_checkpointing=False``); ``loaded`` is a ``verl_mtp.local_megatron.hf_model.LoadedModel``."""
    from omegaconf import OmegaConf
    from verl.utils.checkpoint.megatron_checkpoint_manager import MegatronCheckpointManager

    from verl_mtp.ckpt.mtp_manifest import MTP_CONFIG_ATTR

    hf_config = loaded.bridge.hf_config
    manager = MegatronCheckpointManager(
        config=OmegaConf.create({"model": {"path": "unused"}, "megatron": {}}),
        checkpoint_config=_checkpoint_config(save, load),
        model_config=hf_config, transformer_config=loaded.model.config, role="actor", model=[loaded.model],
        arch=hf_config.architectures[0], hf_config=hf_config, param_dtype=torch.float32,
        share_embeddings_and_output_weights=False, processing_class=None, optimizer=None, optimizer_scheduler=None,
        use_distributed_optimizer=False, use_dist_checkpointing=False, bridge=loaded.bridge,
    )
    if mtp is not None:
        setattr(manager, MTP_CONFIG_ATTR, mtp)
    return manager


def save(manager, path, step: int = 1) -> None:
    with cpu_checkpointing():
        manager.save_checkpoint(str(path), global_step=step)


def load(manager, path) -> None:
    with cpu_checkpointing():
        manager.load_checkpoint(str(path))


def save_without_checks(manager, path, edit) -> None:
    """verl's unpatched save, writing ``edit(model sharded state dict)``: a checkpoint as a buggy
    exporter would leave it (a tensor dropped, a shape changed)."""
    from verl.utils.checkpoint.megatron_checkpoint_manager import MegatronCheckpointManager

    from verl_mtp.patches.core import original_of

    build = manager._build_model_sharded_state_dict
    manager._build_model_sharded_state_dict = lambda metadata: {"model": edit(dict(build(metadata)["model"]))}
    try:
        with cpu_checkpointing():
            original_of(MegatronCheckpointManager.save_checkpoint)(manager, str(path), global_step=1)
    finally:
        del manager._build_model_sharded_state_dict


def dropping(key: str):
    def edit(sharded: dict) -> dict:
        sharded.pop(key)
        return sharded

    return edit


def build_tensor_parallel_tiny_gpt(spec: TinyGPTSpec, tp: int):
    """``build_tiny_gpt`` with tensor parallel size ``tp`` (model-parallel state must already be TP=tp)."""
    import megatron.core.transformer as transformer_pkg

    original = transformer_pkg.TransformerConfig

    @dataclass
    class TensorParallelConfig(original):
        tensor_model_parallel_size: int = tp

    transformer_pkg.TransformerConfig = TensorParallelConfig  # build_tiny_gpt imports it at call time
    try:
        return build_tiny_gpt(spec)
    finally:
        transformer_pkg.TransformerConfig = original


def tensor_parallel_checkpoint_rank(root: str, tp: int, depths: int, dropped: str) -> dict:
    """One rank of a TP=``tp`` save / load / corrupted-load round trip; see test_mtp_checkpoint."""
    from megatron.core import parallel_state

    from verl_mtp.ckpt.mtp_manifest import MtpCheckpointError
    from verl_mtp.config import ExtendedMtpConfig

    parallel_state.initialize_model_parallel(tp, 1)
    try:
        model = build_tensor_parallel_tiny_gpt(TinyGPTSpec(mtp_num_layers=depths), tp)
        save(make_manager(model, ExtendedMtpConfig(enable=True)), os.path.join(root, "tp"))
        # name -> (this rank's tensor, the dim TP splits it along, or None when replicated)
        shards = {
            n: (p.detach().clone(), p.partition_dim if getattr(p, "tensor_model_parallel", False) else None)
            for n, p in model.named_parameters()
        }
        target = build_tensor_parallel_tiny_gpt(TinyGPTSpec(mtp_num_layers=depths, seed=7), tp)
        load(make_manager(target, ExtendedMtpConfig(enable=True)), os.path.join(root, "tp"))
        reloaded = all(torch.equal(p, shards[n][0]) for n, p in target.named_parameters())

        save_without_checks(make_manager(model), os.path.join(root, "corrupt"), dropping(dropped))
        fresh = build_tensor_parallel_tiny_gpt(TinyGPTSpec(mtp_num_layers=depths, seed=8), tp)
        try:
            load(make_manager(fresh, ExtendedMtpConfig(enable=True)), os.path.join(root, "corrupt"))
            error = None
        except MtpCheckpointError as exc:
            error = str(exc)
        return {"shards": shards, "reloaded": reloaded, "error": error}
    finally:
        parallel_state.destroy_model_parallel()
