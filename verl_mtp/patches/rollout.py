"""Rollout patches: the MTP drafter is verified after every weight sync (verl_mtp.rollout.drafter_sync,
verl_mtp.rollout.weight_sync), and exact per-step speculative-decoding metrics with the adaptive
speculation policy (verl_mtp.rollout.spec_control)."""

from __future__ import annotations

import inspect
from typing import Any, Callable

from verl_mtp.patches.core import (
    PatchError,
    add,
    deferred_patch,
    mark_original,
    parameter_names,
    replace,
    require_attr,
    wraps_original,
)

# --- 8. drafter_sync_check: the MTP drafter is verified after every weight sync (vLLM) ----------


def _drafter_checked_update_weights(original: Callable) -> Callable:
    @wraps_original(original)
    async def update_weights(self, weights, global_steps=None, wire_format="named_tensors", **kwargs):
        from verl_mtp.rollout.drafter_sync import vllm_adapter_update_weights

        return await vllm_adapter_update_weights(
            original, self, weights, global_steps=global_steps, wire_format=wire_format, **kwargs
        )

    return update_weights


def patch_vllm_server_adapter(module: Any, restore: list) -> None:
    adapter = require_attr(module, "ServerAdapter")
    original = getattr(adapter, "update_weights", None)
    params = parameter_names(original)
    if params[:4] != ["self", "weights", "global_steps", "wire_format"] or not inspect.iscoroutinefunction(
        getattr(adapter, "_execute_method", None)
    ):
        raise PatchError(
            "vllm_rollout.ServerAdapter.update_weights(self, weights, global_steps, wire_format, **kwargs) and "
            f"async _execute_method not found (update_weights parameters: {params})"
        )
    replace(adapter, "update_weights", _drafter_checked_update_weights(original), restore)


def _recording_update_weights_from_ipc(original: Callable) -> Callable:
    @wraps_original(original)
    def update_weights_from_ipc(self, *args, **kwargs):
        from verl_mtp.rollout.drafter_sync import vllm_worker_begin_sync, vllm_worker_end_sync

        vllm_worker_begin_sync(self)
        try:
            return original(self, *args, **kwargs)
        finally:
            vllm_worker_end_sync(self)

    return update_weights_from_ipc


def _drafter_sync_report(self):
    from verl_mtp.rollout.drafter_sync import vllm_worker_drafter_report

    return vllm_worker_drafter_report(self)


def patch_vllm_worker_extension(module: Any, restore: list) -> None:
    from verl_mtp.rollout.drafter_sync import VLLM_REPORT_METHOD

    extension = require_attr(module, "vLLMColocateWorkerExtension")
    original = getattr(extension, "update_weights_from_ipc", None)
    # The recorder finds the drafter where verl's own helper does (model_runner.drafter.model).
    if not callable(original) or not callable(getattr(extension, "_get_drafter_model", None)):
        raise PatchError("vLLMColocateWorkerExtension.update_weights_from_ipc / _get_drafter_model not found")
    replace(extension, "update_weights_from_ipc", _recording_update_weights_from_ipc(original), restore)
    # collective_rpc by method name: vLLM serialises a function argument only with
    # VLLM_ALLOW_INSECURE_SERIALIZATION on some versions, a name always works.
    add(extension, VLLM_REPORT_METHOD, _drafter_sync_report, restore)


def _returning_collective_rpc(original: Callable) -> Callable:
    @wraps_original(original)
    async def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        from verl_mtp.rollout.weight_sync import returning_collective_rpc

        return await returning_collective_rpc(self, method, timeout=timeout, args=args, kwargs=kwargs)

    return collective_rpc


def patch_vllm_http_server(module: Any, restore: list) -> None:
    # verl 0.9.1's vLLMHttpServer.collective_rpc awaits the engine's call and drops the workers'
    # results; the drafter check needs them back.
    from verl_mtp.rollout.weight_sync import collective_rpc_body_kind

    server = require_attr(module, "vLLMHttpServer")
    original = getattr(server, "collective_rpc", None)
    params = parameter_names(original)
    if params != ["self", "method", "timeout", "args", "kwargs"]:
        raise PatchError(f"vLLMHttpServer.collective_rpc(self, method, timeout, args, kwargs) not found (got {params})")
    kind = collective_rpc_body_kind(inspect.getsource(original))
    if kind == "discards":
        replace(server, "collective_rpc", _returning_collective_rpc(original), restore)
    elif kind != "returns":
        raise PatchError("vLLMHttpServer.collective_rpc is no longer a single `await self.engine.collective_rpc(...)`")


def worker_update_weights_returning_drafter_metrics(original: Callable) -> Callable:
    @wraps_original(original)  # keeps verl's @register dispatch attributes
    async def update_weights(self, global_steps=None, mode="auto"):
        from verl_mtp.rollout.weight_sync import with_drafter_metrics

        return with_drafter_metrics(await original(self, global_steps=global_steps, mode=mode))

    return update_weights


def _patch_actor_worker_update_weights(module: Any, restore: list) -> None:
    worker = require_attr(module, "ActorRolloutRefWorker")
    original = getattr(worker, "update_weights", None)
    params = parameter_names(original)
    if params != ["self", "global_steps", "mode"] or not inspect.iscoroutinefunction(original):
        raise PatchError(f"ActorRolloutRefWorker.update_weights(self, global_steps, mode) (async) not found (got {params})")
    replace(worker, "update_weights", worker_update_weights_returning_drafter_metrics(original), restore)


def _manager_update_weights_keeping_results(inner: Callable) -> Callable:
    @wraps_original(inner)
    async def update_weights(self, global_steps=None):
        from verl_mtp.rollout.weight_sync import naive_sync_keeping_results

        if self.backend != "naive":
            return await inner(self, global_steps=global_steps)
        return naive_sync_keeping_results(self, global_steps)

    return update_weights


def _patch_manager_naive_sync(module: Any, restore: list) -> None:
    from verl.utils.ray_utils import auto_await

    from verl_mtp.rollout.weight_sync import NAIVE_SYNC_SOURCE, is_verls_naive_sync

    manager = require_attr(module, "CheckpointEngineManager")
    original = getattr(manager, "update_weights", None)
    inner = getattr(original, "__wrapped__", None)  # the coroutine function under verl's @auto_await
    if not inspect.iscoroutinefunction(inner) or parameter_names(inner) != ["self", "global_steps"]:
        raise PatchError("CheckpointEngineManager.update_weights(self, global_steps) under @auto_await not found")
    if not is_verls_naive_sync(inspect.getsource(inner)):
        raise PatchError(f"CheckpointEngineManager.update_weights no longer syncs the naive backend with {NAIVE_SYNC_SOURCE}")
    patched = auto_await(_manager_update_weights_keeping_results(inner))
    replace(manager, "update_weights", mark_original(patched, original), restore)


DRAFTER_SYNC_CHECK = deferred_patch(
    "drafter_sync_check",
    "after every vLLM weight sync the MTP drafter's received tensors are fingerprinted in each engine "
    "worker and compared with the trainer's (mtp.drafter_sync_check: auto | raise | warn | off); the "
    "verdict reaches the driver's step metrics as rollout/mtp_drafter_in_sync (colocated sync)",
    {
        "verl.workers.rollout.vllm_rollout.vllm_rollout": patch_vllm_server_adapter,
        "verl.workers.rollout.vllm_rollout.utils": patch_vllm_worker_extension,
        "verl.workers.rollout.vllm_rollout.vllm_async_server": patch_vllm_http_server,
        "verl.workers.engine_workers": _patch_actor_worker_update_weights,
        "verl.checkpoint_engine.base": _patch_manager_naive_sync,
    },
)


# --- 9. spec_step_metrics: exact per-step speculative-decoding metrics, adaptive speculation ----
# verl computes its step metrics in plain module functions that both trainers (ray_trainer.fit and
# v1 trainer_base._compute_metrics) call once per step: compute_throughout_metrics (has the batch
# and timing_raw["gen"]) and then compute_spec_decode_metrics (has the per-request spec counts);
# their results are merged into the logged dict. LLMServerManager knows the replicas' addresses.


def _spec_throughput_metrics(original: Callable) -> Callable:
    @wraps_original(original)
    def compute_throughout_metrics(batch, timing_raw, *args, **kwargs):
        from verl_mtp.rollout.drafter_sync import pop_driver_drafter_metrics
        from verl_mtp.rollout.spec_control import record_generation

        result = original(batch, timing_raw, *args, **kwargs)
        record_generation(batch, timing_raw)
        # the drafter check's verdict of this step's weight sync (patch drafter_sync_check)
        return {**result, **pop_driver_drafter_metrics()}

    return compute_throughout_metrics


def _spec_step_metrics(original: Callable) -> Callable:
    @wraps_original(original)
    def compute_spec_decode_metrics(spec_drafts, spec_accepts, spec_verifies, non_padding_mask=None):
        from verl_mtp.rollout.spec_control import step_metrics_from_verl

        result = dict(original(spec_drafts, spec_accepts, spec_verifies, non_padding_mask))
        result.update(step_metrics_from_verl(spec_drafts, spec_accepts, spec_verifies, non_padding_mask))
        return result

    return compute_spec_decode_metrics


def _patch_trainer_metrics(module: Any, restore: list) -> None:
    throughput = require_attr(module, "compute_throughout_metrics")
    spec = require_attr(module, "compute_spec_decode_metrics")
    if parameter_names(spec)[:3] != ["spec_drafts", "spec_accepts", "spec_verifies"]:
        raise PatchError(f"{module.__name__}.compute_spec_decode_metrics(spec_drafts, spec_accepts, spec_verifies, ...) not found")
    if parameter_names(throughput)[:2] != ["batch", "timing_raw"]:
        raise PatchError(f"{module.__name__}.compute_throughout_metrics(batch, timing_raw, ...) not found")
    replace(module, "compute_throughout_metrics", _spec_throughput_metrics(throughput), restore)
    replace(module, "compute_spec_decode_metrics", _spec_step_metrics(spec), restore)


def _spec_register_servers(original: Callable) -> Callable:
    @wraps_original(original)
    async def _init_global_load_balancer(self, *args, **kwargs):
        from verl_mtp.rollout.spec_control import register_server_manager

        result = await original(self, *args, **kwargs)
        register_server_manager(self)
        return result

    return _init_global_load_balancer


def _patch_server_manager(module: Any, restore: list) -> None:
    manager = require_attr(module, "LLMServerManager")
    original = getattr(manager, "_init_global_load_balancer", None)
    if original is None or not inspect.iscoroutinefunction(original):
        raise PatchError("LLMServerManager._init_global_load_balancer (async) not found")
    replace(manager, "_init_global_load_balancer", _spec_register_servers(original), restore)


SPEC_STEP_METRICS = deferred_patch(
    "spec_step_metrics",
    "per-step speculative-decoding metrics summed exactly over rollout replicas (rollout/mtp_spec_*, "
    "rollout/mtp_gen_throughput), the acceptance-collapse watch and the adaptive speculation policy",
    {
        "verl.trainer.ppo.ray_trainer": _patch_trainer_metrics,
        "verl.trainer.ppo.v1.trainer_base": _patch_trainer_metrics,
        "verl.workers.rollout.llm_server": _patch_server_manager,
    },
)
