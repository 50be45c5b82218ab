"""The drafter check's engine side: what runs inside a vLLM worker process.

Imports neither verl nor verl-mtp's config: the engine may run in an environment without verl (the
vLLM CPU engine tests do: vLLM 0.32 and verl 0.9.1 need different transformers). What it needs:
the MTP name classifier (``verl_mtp.models.families``) and the recorder (torch only).

* ``vllm_worker_begin_sync`` / ``vllm_worker_end_sync`` bracket one weight load in the worker:
  the recorder wraps the drafter's ``load_weights`` (the call every in-place load path ends in:
  verl 0.9.1's ``update_weights_from_ipc`` calls it directly, vLLM's ``reload_weights`` between
  its layerwise set-up and finalisation) and digests the drafter's own parameters around it;
* ``vllm_worker_drafter_report`` answers ``collective_rpc(VLLM_REPORT_METHOD)`` with a plain dict.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from verl_mtp.rollout.drafter_sync.classifier import mtp_tensor_classifier
from verl_mtp.rollout.drafter_sync.recorder import DrafterSyncRecorder

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


def worker_recorder(worker: Any) -> DrafterSyncRecorder:
    """The worker's recorder (made on first use, kept on the worker across syncs)."""
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
    recorder = worker_recorder(worker)
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
