"""The drafter check wired into verl 0.9.1's vLLM rollout (the ``drafter_sync_check`` patch calls these).

* every weight sync to a vLLM replica goes through ``ServerAdapter.update_weights`` - in the
  trainer process for colocated (``naive``) sync, where the stream is the Megatron engine's
  ``get_per_tensor_param`` generator, and in ``CheckpointEngineWorker`` for checkpoint-engine
  backends, where it is the received stream. The replica's leader rank (the one holding the server
  handle) fingerprints that stream; every trainer rank exports the same full HF tensors, so the
  leader's fingerprints stand for what each worker of the replica received;
* each vLLM worker records in ``update_weights_from_ipc`` (verl's worker extension), where verl
  calls ``load_weights`` of the target and - only when ``speculative_config.method == "mtp"`` - of
  the drafter;
* after the sync the leader calls ``collective_rpc(VLLM_REPORT_METHOD)`` (verl's server is patched
  to return the workers' results), compares, and acts per ``drafter_sync_check``;
* the leader knows how many workers serve its server (tensor x pipeline x data parallel of the
  rollout config, ``vllm_worker_layout``) and counts the reports: a sync is reported in sync only
  when every one of them reported and agrees.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Optional

from verl_mtp.config import MTP_KEY_PREFIX, as_extended
from verl_mtp.errors import report_loudly
from verl_mtp.rollout.drafter_sync.classifier import mtp_tensor_classifier
from verl_mtp.rollout.drafter_sync.enforcement import DrafterOutOfSyncError, DrafterSyncChecker, DrafterSyncWarning
from verl_mtp.rollout.drafter_sync.recorder import DrafterSyncRecorder

# --- vLLM worker process: verl's vLLMColocateWorkerExtension --------------------------------------

_WORKER_RECORDER_ATTR = "_verl_mtp_drafter_recorder"
# The worker-extension method (added by the drafter_sync_check patch) that returns vllm_worker_drafter_report.
VLLM_REPORT_METHOD = "verl_mtp_drafter_sync_report"


def _vllm_worker_parts(worker: Any) -> tuple[Any, Any, Optional[str], Any, Optional[str]]:
    """(target model, drafter model or None, speculative method or None, target hf_config,
    quantization or None) of a vLLM worker."""
    runner = worker.model_runner
    vllm_config = runner.vllm_config
    spec = getattr(vllm_config, "speculative_config", None)
    method = getattr(spec, "method", None) if spec is not None else None
    drafter = getattr(getattr(runner, "drafter", None), "model", None)
    model_config = vllm_config.model_config
    quant_config = getattr(vllm_config, "quant_config", None)
    quantization = getattr(model_config, "quantization", None) or (
        type(quant_config).__name__ if quant_config is not None else None
    )
    if quantization is None and os.environ.get("VERL_VLLM_FP8_QUANT_ENABLED", "0") == "1":
        quantization = "fp8 (verl online quantisation)"
    return runner.model, drafter, method, model_config.hf_config, quantization


def _worker_recorder(worker: Any) -> DrafterSyncRecorder:
    recorder = getattr(worker, _WORKER_RECORDER_ATTR, None)
    if recorder is None:
        name = f"vllm worker rank {getattr(worker, 'rank', getattr(worker, 'local_rank', '?'))}"
        # worker ranks restart at 0 in each data-parallel engine: name the engine too
        parallel = getattr(getattr(getattr(worker, "model_runner", None), "vllm_config", None), "parallel_config", None)
        if int(getattr(parallel, "data_parallel_size", 1) or 1) > 1:
            name = f"vllm dp engine {getattr(parallel, 'data_parallel_rank', '?')} worker rank {getattr(worker, 'rank', '?')}"
        recorder = DrafterSyncRecorder(None, worker=name)
        setattr(worker, _WORKER_RECORDER_ATTR, recorder)
    return recorder


def vllm_worker_begin_sync(worker: Any) -> None:
    """Called in the vLLM worker at the start of ``update_weights_from_ipc``; never raises (a failure
    is carried to the trainer in the report, where it counts as out of sync)."""
    recorder = _worker_recorder(worker)
    recorder.start_sync()
    try:
        target, drafter, method, hf_config, quantization = _vllm_worker_parts(worker)
        recorder.speculative_method = method
        recorder.quantization = quantization
        if drafter is not None and recorder.is_mtp is None:
            recorder.is_mtp = mtp_tensor_classifier(hf_config)
        recorder.attach(drafter, target)
    except Exception as exc:  # noqa: BLE001 - carried to the trainer in the report
        recorder.fail(f"{type(exc).__name__}: {exc}")


def vllm_worker_end_sync(worker: Any) -> None:
    recorder = getattr(worker, _WORKER_RECORDER_ATTR, None)
    if recorder is None:
        return
    try:
        recorder.end_sync()
    except Exception as exc:  # noqa: BLE001 - carried to the trainer in the report
        recorder.fail(f"{type(exc).__name__}: {exc}")


def vllm_worker_drafter_report(worker: Any) -> Optional[dict]:
    """Run in each vLLM worker through ``collective_rpc(VLLM_REPORT_METHOD)``."""
    recorder = getattr(worker, _WORKER_RECORDER_ATTR, None)
    if recorder is None:
        return {
            "worker": f"vllm worker rank {getattr(worker, 'rank', '?')}",
            "error": "no weight sync was recorded in this worker (verl-mtp's worker patch is not active here)",
        }
    return recorder.report()


# --- vLLM rollout adapter (the process that streams weights to one replica) ------------------------

_ADAPTER_CHECKER_ATTR = "_verl_mtp_drafter_checker"
_UNCHECKED = object()


def _field(config: Any, name: str, default: Any = None) -> Any:
    value = config.get(name, default) if isinstance(config, Mapping) else getattr(config, name, default)
    return default if value is None else value


# vLLM's AsyncLLM client for data parallelism (DPLBAsyncMPClient) sends a utility call such as
# collective_rpc to every data-parallel engine but returns only engine 0's result.
VLLM_DP_REPORTS_NOTE = "vLLM's collective_rpc returns only data-parallel engine 0's worker results"


def vllm_worker_layout(rollout_config: Any, pd_role: Optional[str] = None) -> tuple[Optional[int], str]:
    """(how many vLLM workers serve the server a replica leader drives, how that count is formed).

    verl 0.9.1's ServerAdapter: one server per replica with tensor x pipeline x data parallel
    workers; in prefill/decode disaggregation one server per role, of that role's tensor-parallel
    size (verl runs it with PP = DP = 1). (None, reason) when the config does not say."""
    if rollout_config is None:
        return None, "the rollout config is not available"
    try:
        tp = int(_field(rollout_config, "tensor_model_parallel_size", 1))
        if pd_role is not None:
            decode_tp = _field(_field(rollout_config, "disaggregation", {}), "decode_tensor_model_parallel_size")
            size = int(decode_tp) if pd_role == "decode" and decode_tp is not None else tp
            return size, f"{pd_role} server, tensor parallel {size}"
        pp = int(_field(rollout_config, "pipeline_model_parallel_size", 1))
        dp = int(_field(rollout_config, "data_parallel_size", 1))
    except (TypeError, ValueError) as exc:
        return None, f"the rollout parallel sizes are unreadable ({exc})"
    layout = f"tensor {tp} x pipeline {pp} x data {dp} parallel"
    if dp > 1:
        layout += f"; {VLLM_DP_REPORTS_NOTE}"
    return tp * pp * dp, layout


def drafter_checker_for(adapter: Any) -> Optional[DrafterSyncChecker]:
    """The checker of a verl rollout adapter (cached on it), or None when the check is off / MTP
    speculative rollout is not enabled."""
    checker = getattr(adapter, _ADAPTER_CHECKER_ATTR, _UNCHECKED)
    if checker is not _UNCHECKED:
        return checker
    model_config = adapter.model_config
    mtp = as_extended(getattr(model_config, "mtp", None))
    checker = None
    if mtp.checks_drafter_sync:
        try:
            is_mtp = mtp_tensor_classifier(model_config.hf_config)
        except ValueError as exc:  # includes UnknownFamilyError
            raise DrafterOutOfSyncError(
                f"cannot check the MTP drafter after weight syncs: {exc}; set "
                f"{MTP_KEY_PREFIX}.drafter_sync_check=off to run without the check"
            ) from exc
        expected, layout = vllm_worker_layout(getattr(adapter, "config", None), getattr(adapter, "_pd_role", None))
        checker = DrafterSyncChecker(is_mtp, mtp.drafter_sync_check, expected, layout)
    setattr(adapter, _ADAPTER_CHECKER_ATTR, checker)
    return checker


async def vllm_adapter_update_weights(original: Callable, adapter: Any, weights, *, global_steps=None,
                                      wire_format: str = "named_tensors", **kwargs):
    """verl's vLLM ``ServerAdapter.update_weights`` plus the drafter check on the replica leader.

    The leader (the rank that owns the server handle) fingerprints the MTP tensors of the stream it
    sends (in the colocated path this is the trainer's ``get_per_tensor_param`` generator itself;
    every trainer rank exports the same full HF tensors), then asks every worker of its replica
    for its recorder's report and compares. Other ranks only send.
    """
    checker = drafter_checker_for(adapter) if getattr(adapter, "_has_server", False) else None
    adapter_only = bool(kwargs.get("peft_config")) and bool(kwargs.get("base_sync_done"))
    if checker is None or wire_format != "named_tensors" or adapter_only:
        if checker is not None:
            what = "LoRA adapter-only sync" if adapter_only else f"wire_format={wire_format!r}"
            report_loudly(
                f"WARNING: MTP drafter NOT verified after this weight sync ({what} carries no whole MTP tensors).",
                DrafterSyncWarning,
            )
        return await original(adapter, weights, global_steps=global_steps, wire_format=wire_format, **kwargs)
    result = await original(
        adapter, checker.begin(weights), global_steps=global_steps, wire_format=wire_format, **kwargs
    )
    reports = await adapter._execute_method(VLLM_REPORT_METHOD)
    metrics = checker.finish(reports)
    return metrics if result is None else result
