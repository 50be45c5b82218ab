"""verl's real Megatron engine (``MegatronEngineWithLMHead``) on CPU, in bf16, on gloo.

Tests and the benchmark drive the engine a real ``main_ppo`` run builds, through the same calls:
the model from a Hugging Face checkpoint through verl's vanilla-mbridge path (verl-mtp's MiMo
bridge, ``bf16=True``, megatron's ``Float16Module`` and megatron's DDP), ``infer_batch`` for the
old log-probs, ``train_batch`` through megatron's pipeline schedule, megatron's optimizer and
``optimizer.step``, the LR scheduler step. The Ray worker around the engine is not built; its
bookkeeping (``TrainingWorker.train_mini_batch`` / ``train_batch`` / ``infer_batch``, the
trainer's padding conversions) runs as verl's own functions on a small shell object.

What is CUDA-bound is redirected, each by one named context manager in this module, applied only
while :func:`cpu_engine_runtime` is active and undone on exit:

- ``cpu_megatron`` (``verl_mtp.local_megatron.single_process``): ``torch.cuda.current_device`` -> "cpu"
  (megatron allocates RoPE, DDP buffers, p2p shape tensors and MTP loss trackers there) and the
  CUDA RNG tracker's ``fork`` -> no-op (it swaps CUDA RNG states).
- :func:`modules_stay_on_cpu`: ``torch.nn.Module.cuda`` -> identity (mbridge's ``get_model`` moves
  every chunk to the GPU).
- :func:`cuda_tensors_on_cpu`: a ``TorchFunctionMode`` that creates tensors requested on device
  "cuda" on the CPU and makes ``Tensor.cuda()`` a no-op (megatron's optimizer, grad scaler,
  ``clip_grads`` and schedules allocate small tensors with a hard-coded ``device="cuda"``).
- :func:`no_cuda_synchronize`: ``torch.cuda.synchronize`` -> no-op (megatron's p2p
  communication synchronizes after every exchange; gloo's ``wait`` already completed it).
- :func:`cuda_memory_stats_empty`: ``torch.cuda``'s memory statistics report 0 and
  ``empty_cache`` is a no-op (verl without an accelerator falls back to its CUDA platform and
  logs device memory through them).
- :func:`causal_mask_for_local_attention` (per model, not global): verl's BSHD path passes a
  ``[batch, seq]`` padding mask that only TransformerEngine attention accepts; megatron's local
  attention gets the equivalent 4-D causal mask (right padding + causal attention: valid positions
  never attend to padding).

mbridge 0.15.1 on megatron-core 0.18 (``ModelType.encoder_and_decoder`` is gone) is not this
module's business: the product's ``mtp_complete_export`` patch fixes it for real runs
(verl_mtp.models.mbridge_compat), so the tests take the path a user takes.

CPU boundaries that stand in for GPU parts: the BSHD layout (``use_remove_padding=False``)
instead of THD, because packed sequences (``PackedSeqParams``) need TransformerEngine or flash
attention; megatron's local layer spec and torch norms instead of TransformerEngine's; fusions off.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from verl_mtp.local_megatron.single_process import CPU_TRANSFORMER_OVERRIDES, causal_mask, cpu_megatron

# transformers has no "mimo" model type; released MiMo checkpoints ship their config class as
# remote code, and so does the tiny one (a Qwen2 config with MTP depths).
_MIMO_CONFIG_CODE = '''from transformers import Qwen2Config


class MiMoConfig(Qwen2Config):
    model_type = "mimo"

    def __init__(self, num_nextn_predict_layers=0, **kwargs):
        self.num_nextn_predict_layers = num_nextn_predict_layers
        super().__init__(**kwargs)
'''

# TransformerConfig overrides for verl's override_transformer_config: the CPU build's (fusions and
# dropout off). attention_backend stays "auto" (the layer spec is the local one either way):
# "local" makes megatron set the NVTE_* variables process-wide, which every later "auto" model in
# the process then refuses.
ENGINE_TRANSFORMER_OVERRIDES = dict(CPU_TRANSFORMER_OVERRIDES, attention_backend="auto")


def write_tiny_engine_checkpoint(path: str, mtp_depths: int = 2, seed: int = 0, vocab_size: int = 64) -> str:
    """A tiny random MiMo checkpoint (Qwen2 trunk + MTP depths) that verl's HFModelConfig loads:
    safetensors, config.json with its remote-code config class, and a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from verl_mtp.testing.tiny_hf import write_tiny_checkpoint

    write_tiny_checkpoint(path, "mimo", mtp_depths=mtp_depths, seed=seed, vocab_size=vocab_size)
    config_file = os.path.join(path, "config.json")
    with open(config_file) as f:
        config = json.load(f)
    config["auto_map"] = {"AutoConfig": "configuration_mimo.MiMoConfig"}
    config.update(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with open(config_file, "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(path, "configuration_mimo.py"), "w") as f:
        f.write(_MIMO_CONFIG_CODE)
    vocab = {f"t{i}": i for i in range(vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t3"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="t0", bos_token="t1", eos_token="t2", unk_token="t3"
    ).save_pretrained(path)
    return path


# --- the CUDA redirections -----------------------------------------------------------------------


@contextlib.contextmanager
def modules_stay_on_cpu():
    """``torch.nn.Module.cuda`` -> identity: mbridge's ``get_model`` moves each model chunk to the GPU."""
    original = torch.nn.Module.cuda
    torch.nn.Module.cuda = lambda self, device=None: self
    try:
        yield
    finally:
        torch.nn.Module.cuda = original


@contextlib.contextmanager
def no_cuda_synchronize():
    """``torch.cuda.synchronize`` -> no-op: megatron's p2p exchange synchronizes the GPU after
    ``batch_isend_irecv``; on gloo the requests' ``wait`` has already completed the exchange."""
    original = torch.cuda.synchronize
    torch.cuda.synchronize = lambda device=None: None
    try:
        yield
    finally:
        torch.cuda.synchronize = original


_CUDA_TYPE_NAMES = {f"torch.{t}": f"torch.cuda.{t}" for t in ("FloatTensor", "HalfTensor", "BFloat16Tensor")}


class _CudaTensorsOnCpu(torch.overrides.TorchFunctionMode):
    """Tensors requested on a CUDA device are made on the CPU; ``Tensor.cuda()`` keeps them there."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # megatron's fp16/bf16 optimizers accept parameters by their legacy CUDA type name
            name = func(*args)
            return _CUDA_TYPE_NAMES.get(name, name)
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cuda":
            kwargs = dict(kwargs, device="cpu")
        return func(*args, **kwargs)


@contextlib.contextmanager
def cuda_tensors_on_cpu():
    """megatron allocates small tensors with a hard-coded ``device="cuda"``: the optimizer's
    ``found_inf`` / ``_scale_one``, the grad scaler, ``clip_grads``' norms, the schedules' token
    counter; these are created on the CPU (a ``TorchFunctionMode``, thread-local, undone on exit)."""
    with _CudaTensorsOnCpu():
        yield


_MEMORY_STATS = ("memory_allocated", "memory_reserved", "max_memory_allocated", "max_memory_reserved")


@contextlib.contextmanager
def cuda_memory_stats_empty():
    """verl 0.9.1 on a machine without an accelerator falls back to its CUDA platform, so its
    memory logging calls ``torch.cuda``'s memory statistics: they report 0 bytes (CPU memory is
    not the device memory those metrics mean); ``empty_cache`` is a no-op."""
    saved = {name: getattr(torch.cuda, name) for name in (*_MEMORY_STATS, "mem_get_info", "empty_cache")}
    for name in _MEMORY_STATS:
        setattr(torch.cuda, name, lambda device=None: 0)
    torch.cuda.mem_get_info = lambda device=None: (0, 0)
    torch.cuda.empty_cache = lambda: None
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(torch.cuda, name, value)


def causal_mask_for_local_attention(gpt_model) -> None:
    """verl's BSHD forward passes a ``[batch, seq]`` padding mask, which only TransformerEngine's
    attention accepts; megatron's local attention gets the equivalent 4-D causal mask (sequences
    are right-padded, so under causal attention valid positions never attend to padding).
    Installed on the model instance; :func:`remove_causal_mask` undoes it."""
    inner = type(gpt_model).forward.__get__(gpt_model)

    def forward(*args, attention_mask=None, **kwargs):
        if attention_mask is not None and attention_mask.dim() == 2:
            attention_mask = causal_mask(attention_mask.shape[-1]).to(attention_mask.device)
        return inner(*args, attention_mask=attention_mask, **kwargs)

    gpt_model.forward = forward


def remove_causal_mask(gpt_model) -> None:
    gpt_model.__dict__.pop("forward", None)


@contextlib.contextmanager
def cpu_engine_runtime():
    """Every global CUDA redirection above, for the duration (see the module docstring); inside
    :func:`engine_device` ("cuda") none of them."""
    if _engine_device == "cuda":
        yield
        return
    with contextlib.ExitStack() as stack:
        stack.enter_context(cpu_megatron())
        stack.enter_context(modules_stay_on_cpu())
        stack.enter_context(no_cuda_synchronize())
        stack.enter_context(cuda_tensors_on_cpu())
        stack.enter_context(cuda_memory_stats_empty())
        yield


# --- the same engine on a GPU -------------------------------------------------------------------

_engine_device = "cpu"
ENGINE_DEVICES = ("cpu", "cuda")


@contextlib.contextmanager
def engine_device(device: str):
    """Build and run :class:`RealEngine` on ``device`` for the duration: "cpu" (the default: every
    CUDA redirection of :func:`cpu_engine_runtime`) or "cuda" (none of them: megatron and verl
    allocate, synchronize and move the model to the GPU as in a real run). Both keep megatron's
    local attention with :func:`causal_mask_for_local_attention` and the version shim."""
    global _engine_device
    if device not in ENGINE_DEVICES:
        raise ValueError(f"device={device!r}: valid choices are {', '.join(ENGINE_DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but torch sees no CUDA device (torch.cuda.is_available() is False)")
    previous, _engine_device = _engine_device, device
    try:
        yield
    finally:
        _engine_device = previous


def init_engine_process_group(device: str = "cpu") -> None:
    """World size 1 and megatron's model-parallel state (TP = PP = 1), idempotent: gloo on the CPU,
    nccl on CUDA (the distributed optimizer reduce-scatters CUDA gradient buffers, which gloo cannot)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from verl_mtp.local_megatron.single_process import free_port, init_single_process_megatron

    if device not in ENGINE_DEVICES:
        raise ValueError(f"device={device!r}: valid choices are {', '.join(ENGINE_DEVICES)}")
    if device == "cpu":
        init_single_process_megatron()
        return
    torch.cuda.set_device(0)
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)


# --- building the engine as verl's actor worker does --------------------------------------------


class _TrainingWorkerShell:
    """verl's ``TrainingWorker`` bookkeeping without Ray: its own ``train_mini_batch``,
    ``train_batch``, ``infer_batch`` and ``_postprocess_output`` run on this object, which carries
    the attributes they read (the engine, configs, loss function, a disabled profiler). The MFU
    estimate is left out (``flops_counter=None``): it needs a device's peak FLOPs."""

    def __init__(self, engine, model_config, engine_config, loss_fn):
        from verl.utils.device import get_device_name
        from verl.utils.profiler import DistProfiler

        self.engine = engine
        self.model_config = model_config
        self.engine_config = engine_config
        self.loss_fn = loss_fn
        self.device_name = get_device_name()
        self.flops_counter = None
        self.profiler = DistProfiler(rank=0, config=None)


def _borrow_worker_methods() -> None:
    from verl.workers.engine_workers import TrainingWorker

    for name in ("train_mini_batch", "train_batch", "infer_batch", "_postprocess_output"):
        setattr(_TrainingWorkerShell, name, getattr(TrainingWorker, name))


def _pad(rows: list[torch.Tensor], width: int, left: bool, value: int = 0):
    out = torch.full((len(rows), width), value, dtype=rows[0].dtype)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row)
        if left:
            out[i, width - n :], mask[i, width - n :] = row, 1
        else:
            out[i, :n], mask[i, :n] = row, 1
    return out, mask


def rollout_batch(prompts: list[torch.Tensor], responses: list[torch.Tensor], pad_token_id: int = 0):
    """The trainer's padded batch after a rollout: left-padded prompts, right-padded responses,
    ``input_ids`` / ``attention_mask`` / ``position_ids`` / ``response_mask`` (a TensorDict)."""
    import verl.utils.tensordict_utils as tu

    prompt_ids, prompt_mask = _pad(prompts, max(len(p) for p in prompts), left=True, value=pad_token_id)
    response_ids, response_mask = _pad(responses, max(len(r) for r in responses), left=False, value=pad_token_id)
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    return tu.get_tensordict(
        {
            "prompts": prompt_ids,
            "responses": response_ids,
            "input_ids": torch.cat([prompt_ids, response_ids], dim=1),
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "response_mask": response_mask,
        },
        {},
    )


@dataclass
class RealEngine:
    """verl's ``MegatronEngineWithLMHead`` for the actor, initialised from a checkpoint; every
    call runs inside :func:`cpu_engine_runtime`."""

    engine: Any
    actor_config: Any
    worker: _TrainingWorkerShell
    temperature: float = 1.0
    _masked: list = field(default_factory=list)

    @classmethod
    def build(
        cls,
        checkpoint: str,
        mtp,
        *,
        micro_batch_size: int = 2,
        infer_micro_batch_size: int = 4,
        mini_batch_size: int = 4,
        lr: float = 1e-2,
        clip_grad: float = 1.0,
        pipeline_parallel: int = 1,
        temperature: float = 1.0,
        seed: int = 42,
        transformer_overrides: dict | None = None,
        **actor,
    ) -> "RealEngine":
        """The actor's engine as ``ActorRolloutRefWorker.init_model`` builds it (bf16, vanilla
        mbridge, distributed optimizer, BSHD); ``mtp`` is the run's ``ExtendedMtpConfig``."""
        from functools import partial

        import verl.workers.engine_workers as engine_workers
        from verl.workers.config import HFModelConfig, McoreEngineConfig, McoreOptimizerConfig
        from verl.workers.config.actor import McoreActorConfig
        from verl.workers.engine import EngineRegistry

        _borrow_worker_methods()
        from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

        MTPLossLoggingHelper.tracker.clear()  # process-global, sized by the first model built
        model_config = HFModelConfig(path=checkpoint, trust_remote_code=True, mtp=mtp, use_remove_padding=False)
        engine_config = McoreEngineConfig(
            dtype="bfloat16",
            vanilla_mbridge=True,
            pipeline_model_parallel_size=pipeline_parallel,
            use_distributed_optimizer=True,
            override_transformer_config={**ENGINE_TRANSFORMER_OVERRIDES, **(transformer_overrides or {})},
            seed=seed,
        )
        actor_config = McoreActorConfig(
            megatron=engine_config,
            optim=McoreOptimizerConfig(lr=lr, clip_grad=clip_grad, total_training_steps=100),
            ppo_mini_batch_size=mini_batch_size,
            ppo_micro_batch_size_per_gpu=micro_batch_size,
            use_dynamic_bsz=False,
            rollout_n=1,
            **actor,
        )
        actor_config.model_config = model_config
        # ActorRolloutRefWorker.init_model's assignments (use_remove_padding comes from the model)
        engine_config = actor_config.engine
        engine_config.use_dynamic_bsz = False
        engine_config.micro_batch_size_per_gpu = micro_batch_size
        engine_config.infer_micro_batch_size_per_gpu = infer_micro_batch_size
        engine_config.use_remove_padding = model_config.use_remove_padding
        engine_config.use_fused_kernels = model_config.use_fused_kernels
        model_config.model_type = "language_model"
        with cpu_engine_runtime():
            engine = EngineRegistry.new(
                model_type="language_model", backend="megatron", model_config=model_config,
                engine_config=engine_config, optimizer_config=actor_config.optim,
                checkpoint_config=actor_config.checkpoint,
            )
            engine.initialize()
        loss_fn = partial(engine_workers.ppo_loss, config=actor_config)  # the name init_model binds
        out = cls(engine=engine, actor_config=actor_config,
                  worker=_TrainingWorkerShell(engine, model_config, engine_config, loss_fn), temperature=temperature)
        for model in out.gpt_models():
            causal_mask_for_local_attention(model)
            out._masked.append(model)
        return out

    def close(self) -> None:
        for model in self._masked:
            remove_causal_mask(model)
        self._masked.clear()

    def gpt_models(self) -> list:
        """The GPTModel chunks inside megatron's DDP and Float16Module wrappers."""
        from verl.utils.megatron_utils import unwrap_model

        return [unwrap_model(chunk) for chunk in self.engine.module]

    def named_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        for model in self.gpt_models():
            yield from model.named_parameters()

    def compute_log_prob(self, batch) -> dict[str, torch.Tensor]:
        """The trainer's ``_compute_old_log_prob``: padded ``old_log_probs`` and ``entropys``
        from the worker's ``infer_batch`` (its own micro-batching). Non-last pipeline stages
        return an empty dict."""
        import verl.utils.tensordict_utils as tu
        from verl.workers.utils.padding import left_right_2_no_padding, no_padding_2_padding

        data = left_right_2_no_padding(batch.clone())
        tu.assign_non_tensor(data, calculate_entropy=True, calculate_sum_pi_squared=False, compute_loss=False,
                             temperature=self.temperature)
        with cpu_engine_runtime():
            output = self.worker.infer_batch(data)
        if output is None:
            return {}
        return {
            "old_log_probs": no_padding_2_padding(tu.get(output, "log_probs"), data).float(),
            "entropys": no_padding_2_padding(tu.get(output, "entropy"), data).float(),
            "metrics": tu.get(output, "metrics"),
        }

    def mini_batch_data(self, batch, old_log_probs: torch.Tensor | None = None, advantages: torch.Tensor | None = None,
                        calculate_entropy: bool = False):
        """``batch`` as the engine receives one mini-batch from the worker's ``train_batch``
        (no-padding layout, the worker's engine defaults, the trainer's meta keys)."""
        import verl.utils.tensordict_utils as tu
        from verl.workers.utils.padding import left_right_2_no_padding

        data = batch.clone()
        width = data["responses"].shape[1]
        data["old_log_probs"] = (torch.zeros(len(data), width) if old_log_probs is None else old_log_probs).float()
        data["advantages"] = (torch.zeros(len(data), width) if advantages is None else advantages).float()
        data = left_right_2_no_padding(data)
        config = self.worker.engine_config
        tu.assign_non_tensor(
            data, calculate_entropy=calculate_entropy, distillation_use_topk=False, distillation_only=False,
            global_batch_size=len(batch), temperature=self.temperature,
            use_remove_padding=self.worker.model_config.use_remove_padding, use_dynamic_bsz=config.use_dynamic_bsz,
            max_token_len_per_gpu=config.max_token_len_per_gpu, micro_batch_size_per_gpu=config.micro_batch_size_per_gpu,
            use_fused_kernels=config.use_fused_kernels,
        )
        return data

    def forward_backward(self, data, loss_function, forward_only: bool = False):
        """The engine's own ``forward_backward_batch`` (megatron's schedule) with ``loss_function``
        (verl's signature: ``model_output, data, dp_group`` -> ``loss, metrics``), in train mode;
        gradients stay in megatron's DDP buffers (``param.main_grad``) until :meth:`zero_grad`."""
        with cpu_engine_runtime(), self.engine.train_mode(disable_auto_offload=True, zero_grad_on_exit=False):
            if forward_only:
                with torch.no_grad():
                    return self.engine.forward_backward_batch(data, loss_function, forward_only=True)
            return self.engine.forward_backward_batch(data, loss_function, forward_only=False)

    def zero_grad(self) -> None:
        with cpu_engine_runtime():
            self.engine.optimizer_zero_grad()

    def update_actor(self, batch, old_log_probs: torch.Tensor, advantages: torch.Tensor, *,
                     epochs: int = 1, shuffle: bool = False) -> dict:
        """The trainer's ``_update_actor`` -> the worker's ``train_mini_batch``: mini-batches of
        ``ppo_mini_batch_size``, each one ``train_batch`` (forward/backward through megatron's
        schedule, optimizer step). Returns the metrics (lists over mini-batches / micro-batches);
        ``{}`` on ranks that hold no outputs."""
        import verl.utils.tensordict_utils as tu
        from verl.workers.utils.padding import left_right_2_no_padding

        data = batch.clone()
        data["old_log_probs"] = old_log_probs.float()
        data["advantages"] = advantages.float()
        data = left_right_2_no_padding(data)
        mini = self.actor_config.ppo_mini_batch_size
        tu.assign_non_tensor(
            data, calculate_entropy=False, distillation_use_topk=False, distillation_only=False,
            global_batch_size=mini, mini_batch_size=mini, epochs=epochs, seed=42,
            dataloader_kwargs={"shuffle": shuffle}, compute_loss=True, temperature=self.temperature,
        )
        with cpu_engine_runtime():
            output = self.worker.train_mini_batch(data)
        return {} if output is None else tu.get(output, "metrics")


# --- one RL step, and the same on two pipeline-parallel ranks -----------------------------------


def tiny_rollout(num: int = 8, vocab_size: int = 64, seed: int = 0):
    """``num`` random (prompt, response) pairs of 2-4 / 2-6 tokens and per-token advantages."""
    g = torch.Generator().manual_seed(seed)
    prompt_lens = [2 + (3 * i) % 3 for i in range(num)]
    response_lens = [2 + (5 * i + 1) % 5 for i in range(num)]
    prompts = [torch.randint(3, vocab_size, (n,), generator=g) for n in prompt_lens]
    responses = [torch.randint(3, vocab_size, (n,), generator=g) for n in response_lens]
    advantages = torch.randn(num, max(response_lens), generator=g)
    return prompts, responses, advantages


@dataclass
class StepResult:
    old_log_probs: torch.Tensor | None  # None on stages without outputs
    metrics: dict
    before: dict[str, torch.Tensor]  # parameters before the update (megatron names)
    after: dict[str, torch.Tensor]

    def changed(self) -> set[str]:
        return {n for n, p in self.after.items() if not torch.equal(p, self.before[n])}


def rl_step(engine: RealEngine, prompts, responses, advantages, epochs: int = 1) -> StepResult:
    """One RL step's actor work: old log-probs (``infer_batch``), then the actor update
    (``train_mini_batch``). With pipeline parallelism the last stage's old log-probs reach the
    other stages as the trainer's collect/dispatch would carry them (a broadcast here)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu

    batch = rollout_batch(prompts, responses)
    old = engine.compute_log_prob(batch).get("old_log_probs")
    if mpu.get_pipeline_model_parallel_world_size() > 1:
        shape = batch["responses"].shape
        carried = old if old is not None else torch.zeros(shape)
        dist.broadcast(carried, src=mpu.get_pipeline_model_parallel_last_rank(), group=mpu.get_pipeline_model_parallel_group())
        old_for_update = carried
    else:
        old_for_update = old
    before = {n: p.detach().clone() for n, p in engine.named_parameters()}
    metrics = engine.update_actor(batch, old_for_update, advantages[:, : batch["responses"].shape[1]], epochs=epochs)
    after = {n: p.detach().clone() for n, p in engine.named_parameters()}
    return StepResult(old_log_probs=old, metrics=metrics, before=before, after=after)


def pipeline_rank_main(rank: int, port: int, checkpoint: str, scenarios: list[dict], out_dir: str) -> None:
    """One of two gloo ranks with pipeline parallelism 2 (``torch.multiprocessing.spawn`` target):
    for each scenario (``ExtendedMtpConfig`` keyword arguments) build verl's engine, run
    :func:`rl_step`, and save ``{scenario index: StepResult fields}`` to ``out_dir/rank{rank}.pt``."""
    import torch.distributed as dist

    import verl  # noqa: F401 - the plugin activates on verl's import, as in every verl process

    from verl_mtp.config import ExtendedMtpConfig

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    results = {}
    try:
        for index, scenario in enumerate(scenarios):
            engine = RealEngine.build(checkpoint, ExtendedMtpConfig(enable=True, enable_train=True, **scenario),
                                      pipeline_parallel=2)
            try:
                step = rl_step(engine, *tiny_rollout())
            finally:
                engine.close()
            results[index] = {
                "old_log_probs": step.old_log_probs, "metrics": step.metrics, "changed": sorted(step.changed()),
                "names": sorted(step.after),
            }
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
