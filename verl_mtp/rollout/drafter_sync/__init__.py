"""Proof that the rollout engine's MTP drafter holds the trainer's MTP weights after each sync.

The failure this guards against: after a weight sync only the target model is updated, the
drafter's copy is lost across sleep/wake, or a sync path skips it. Outputs stay correct, so the
only symptom is acceptance collapsing. We therefore compare, after every sync, cheap fingerprints
of the MTP tensors the trainer sent with what the drafter received and holds.

The parts, each usable without a GPU or an inference engine:

* ``fingerprint`` - an exact checksum of a tensor's bits (its module doc explains the maths);
* ``classifier`` - which tensor names belong to the MTP head, per model family;
* ``recorder`` - the trainer side (``StreamFingerprints``: the MTP tensors of the stream sent) and
  the engine side (``DrafterSyncRecorder``: what the drafter received and holds);
* ``verdict`` - ``compare_drafter_sync``: the trainer's fingerprints against every worker's report;
* ``enforcement`` - what happens on a mismatch (``actor_rollout_ref.model.mtp.drafter_sync_check``:
  auto | raise | warn | off) and ``DrafterSyncChecker``, the state between one replica's syncs;
* ``channel`` - the metrics and the one explicit path they take to the driver's step metrics;
* ``worker`` - the engine side inside a vLLM worker (recorder set-up around a weight load, report);
* ``vllm`` - the trainer-side glue verl 0.9.1's vLLM rollout calls (wired by the
  ``drafter_sync_check`` patch).

The engine side (``fingerprint``, ``recorder``, ``classifier``, ``worker``, and this package) imports
without verl: an engine may run where verl is not installed. ``enforcement`` and ``vllm`` read
verl-mtp's config (which needs verl); their names are imported on first use (``__getattr__``).

With vLLM data parallelism > 1 the engine's ``collective_rpc`` returns only data-parallel engine 0's
results, so the other engines' drafters are not seen: ``raise`` is refused at config time,
``auto``/``warn`` check engine 0's workers, warn, and log ``rollout/mtp_drafter_checked_fraction``
instead of an in-sync claim (``verl_mtp.run_checks`` holds these run rules).

Not covered (and refused at config time for ``raise``, warned for ``warn``): SGLang (its engine
runs in a server process without a worker-extension hook that can report back) and
``checkpoint_engine.backend=delta_sharded`` (sparse deltas, no whole tensors). A LoRA adapter-only
sync carries no MTP tensor and is skipped with a warning. With a quantising engine (fp8 rollout) the
drafter receives quantised tensors: arrival, load calls and the digest are checked, values are not.
"""

from verl_mtp.rollout.drafter_sync.channel import (
    DRAFTER_METRICS,
    METRIC_CHECKED_FRACTION,
    METRIC_IN_SYNC,
    METRIC_WORKERS_CHECKED,
    METRIC_WORKERS_EXPECTED,
    DrafterMetricsChannel,
    latest_drafter_sync_metrics,
    pop_driver_drafter_metrics,
    record_worker_sync_results,
    take_drafter_sync_metrics,
)
from verl_mtp.rollout.drafter_sync.classifier import mtp_tensor_classifier
from verl_mtp.rollout.drafter_sync.fingerprint import (
    TensorFingerprint,
    fingerprint_pieces,
    fingerprint_tensor,
    module_digest,
    word_sums,
)
from verl_mtp.rollout.drafter_sync.recorder import DrafterSyncRecorder, StreamFingerprints
from verl_mtp.rollout.drafter_sync.verdict import SyncVerdict, compare_drafter_sync
from verl_mtp.rollout.drafter_sync.worker import (
    VLLM_REPORT_METHOD,
    vllm_worker_begin_sync,
    vllm_worker_drafter_report,
    vllm_worker_end_sync,
)

# The trainer side reads verl-mtp's config (and so verl): imported when first asked for.
_TRAINER_SIDE = {
    "verl_mtp.rollout.drafter_sync.enforcement": (
        "DrafterOutOfSyncError", "DrafterSyncChecker", "DrafterSyncWarning", "enforce_drafter_sync",
    ),
    "verl_mtp.rollout.drafter_sync.vllm": (
        "VLLM_DP_REPORTS_NOTE", "drafter_checker_for", "vllm_adapter_update_weights", "vllm_worker_layout",
    ),
}


def __getattr__(name: str):
    if name in _TRAINER_SIDE["verl_mtp.rollout.drafter_sync.enforcement"]:
        from verl_mtp.rollout.drafter_sync import enforcement as module
    elif name in _TRAINER_SIDE["verl_mtp.rollout.drafter_sync.vllm"]:
        from verl_mtp.rollout.drafter_sync import vllm as module
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(module, name)
    globals()[name] = value
    return value


__all__ = [
    "DRAFTER_METRICS",
    "METRIC_CHECKED_FRACTION",
    "METRIC_IN_SYNC",
    "METRIC_WORKERS_CHECKED",
    "METRIC_WORKERS_EXPECTED",
    "VLLM_DP_REPORTS_NOTE",
    "VLLM_REPORT_METHOD",
    "DrafterMetricsChannel",
    "DrafterOutOfSyncError",
    "DrafterSyncChecker",
    "DrafterSyncRecorder",
    "DrafterSyncWarning",
    "StreamFingerprints",
    "SyncVerdict",
    "TensorFingerprint",
    "compare_drafter_sync",
    "drafter_checker_for",
    "enforce_drafter_sync",
    "fingerprint_pieces",
    "fingerprint_tensor",
    "latest_drafter_sync_metrics",
    "module_digest",
    "mtp_tensor_classifier",
    "pop_driver_drafter_metrics",
    "record_worker_sync_results",
    "take_drafter_sync_metrics",
    "vllm_adapter_update_weights",
    "vllm_worker_begin_sync",
    "vllm_worker_drafter_report",
    "vllm_worker_end_sync",
    "vllm_worker_layout",
    "word_sums",
]


def __dir__():
    return sorted(set(globals()) | set(__all__))
