"""The drafter check wired into verl 0.9.1's vLLM rollout (the ``drafter_sync_check`` patch calls these);
this module is the trainer side (it reads verl-mtp's config), ``worker`` the engine side.

* every weight sync to a vLLM replica goes through ``ServerAdapter.update_weights`` - in the
  trainer process for colocated (``naive``) sync, where the stream is the Megatron engine's
  ``get_per_tensor_param`` generator, and in ``CheckpointEngineWorker`` for checkpoint-engine
  backends, where it is the received stream. The replica's leader rank (the one holding the server
  handle) fingerprints that stream; every trainer rank exports the same full HF tensors, so the
  leader's fingerprints stand for what each worker of the replica received;
* each vLLM worker records in ``update_weights_from_ipc`` (verl's worker extension), where verl
  calls ``load_weights`` of the target and - only when ``speculative_config.method == "mtp"`` - of
  the drafter (``worker.vllm_worker_begin_sync`` / ``vllm_worker_end_sync``);
* after the sync the leader calls ``collective_rpc(VLLM_REPORT_METHOD)`` (verl's server is patched
  to return the workers' results), compares, and acts per ``drafter_sync_check``;
* the leader knows how many workers serve its server (tensor x pipeline x data parallel of the
  rollout config, ``vllm_worker_layout``) and counts the reports: a sync is reported in sync only
  when every one of them reported and agrees.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

from verl_mtp.config import MTP_KEY_PREFIX, as_extended
from verl_mtp.errors import report_loudly
from verl_mtp.rollout.drafter_sync.classifier import mtp_tensor_classifier
from verl_mtp.rollout.drafter_sync.enforcement import DrafterOutOfSyncError, DrafterSyncChecker, DrafterSyncWarning
from verl_mtp.rollout.drafter_sync.worker import VLLM_REPORT_METHOD

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
