"""Proof that the rollout engine's MTP drafter holds the trainer's MTP weights after each sync.

The failure this guards against (DESIGN.md section 7.1): after a weight sync only the target model
is updated, the drafter's copy is lost across sleep/wake, or a sync path skips it. Outputs stay
correct, so the only symptom is acceptance collapsing. We therefore compare, after every sync,
cheap fingerprints of the MTP tensors the trainer sent with what the drafter received and holds.

The parts, each usable without a GPU or an inference engine:

* ``fingerprint_tensor`` - an exact checksum of a tensor's bits (see "Fingerprint" below).
* Trainer side, ``StreamFingerprints`` - wraps the ``(name, tensor)`` weight stream verl hands to
  the rollout engine and fingerprints the MTP tensors as they pass (nothing is materialised).
* Engine side, ``DrafterSyncRecorder`` - runs inside the engine's worker process. It wraps the
  drafter model's ``load_weights`` and fingerprints the MTP tensors *as the drafter receives them*
  (the engine fuses qkv / gate_up and shards by TP afterwards, so received tensors are the only
  form that matches the trainer's names and layouts exactly). It also counts the drafter's
  ``load_weights`` calls per sync (a drafter that was never called holds a stale copy) and takes
  a digest of the drafter's own parameters before and after the sync (a drafter that received new
  weights but whose parameters did not change dropped them).
* ``compare_drafter_sync`` + ``enforce_drafter_sync`` - the verdict and what happens on a
  mismatch (``actor_rollout_ref.model.mtp.drafter_sync_check``: raise | warn | off).

Where it runs in verl 0.9.1 (vLLM; wired by the ``drafter_sync_check`` patch in verl_mtp.patches):

* every weight sync to a vLLM replica goes through ``ServerAdapter.update_weights`` - in the
  trainer process for colocated (``naive``) sync, where the stream is the Megatron engine's
  ``get_per_tensor_param`` generator, and in ``CheckpointEngineWorker`` for checkpoint-engine
  backends, where it is the received stream. The replica's leader rank (the one holding the server
  handle) fingerprints that stream; every trainer rank exports the same full HF tensors, so the
  leader's fingerprints stand for what each worker of the replica received;
* each vLLM worker records in ``update_weights_from_ipc`` (verl's worker extension), where verl
  calls ``load_weights`` of the target and - only when ``speculative_config.method == "mtp"`` - of
  the drafter;
* after the sync the leader calls ``collective_rpc("verl_mtp_drafter_sync_report")`` (verl's
  server is patched to return the workers' results), compares, and acts per
  ``drafter_sync_check``;
* the leader knows how many workers serve its server (tensor x pipeline x data parallel of the
  rollout config, ``vllm_worker_layout``) and counts the reports: a sync is reported in sync only
  when every one of them reported and agrees. With vLLM data parallelism > 1 the engine's
  ``collective_rpc`` returns only data-parallel engine 0's results, so the other engines' drafters
  are not seen: ``raise`` is refused at config time, ``auto``/``warn`` check engine 0's workers,
  warn, and log ``rollout/mtp_drafter_checked_fraction`` instead of an in-sync claim.

Not covered (and refused at config time for ``raise``, warned for ``warn``): SGLang (its engine
runs in a server process without a worker-extension hook that can report back) and
``checkpoint_engine.backend=delta_sharded`` (sparse deltas, no whole tensors). A LoRA adapter-only
sync carries no MTP tensor and is skipped with a warning. With a quantising engine (fp8 rollout) the
drafter receives quantised tensors: arrival, load calls and the digest are checked, values are not.

Fingerprint
-----------
The tensor's bytes are read as unsigned 16-bit words (8-bit when the byte count is odd) x_i, and
two sums are kept modulo the prime P = 2**61 - 1:  S1 = sum x_i  and  S2 = sum w(i) x_i  with a fixed
position pattern w(i) = ((i * 40503) mod 2**16) + 1. Why this choice:

* exact and order independent: integer sums give the same value on any device, with any
  reduction order, so trainer and engine fingerprints compare with ``==`` (float sums would not);
* a change confined to one element of up to 4 bytes (bf16, fp16, fp32, int8) is always detected:
  one changed word moves S1; two changed words that cancel in S1 move S2 because their weights
  differ; swapped elements move S2;
* additive over pieces: a tensor that arrives in contiguous pieces (flat byte ranges, such as row
  blocks or the byte chunks of verl's checkpoint engines) has the fingerprint of the whole when each
  piece is hashed at its word offset (``fingerprint_pieces``). Column-split (TP) shards or fused
  tensors are not contiguous pieces of the HF tensor; we avoid needing them by fingerprinting the
  tensors before the engine fuses/shards them;
* bits, not values: dtype and shape are part of the fingerprint; the same values in another dtype
  are reported as a dtype difference (verl's bucketed transfer keeps dtypes);
* cheap: one pass of integer multiply-adds on the tensor's device, in chunks of ``_CHUNK_WORDS``
  (about 0.6 GiB of int64 scratch at most), one host sync per tensor. Measured on an H200
  (torch 2.11): 22 ms for 1 GiB of bf16, 87 ms for 4 GiB; CPU and CUDA fingerprints are equal.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterable, Iterator, Mapping, Optional

import torch

logger = logging.getLogger(__name__)

# auto (default): raise where verl-mtp can verify the drafter (vLLM), and where it cannot (SGLang,
# delta_sharded) run unverified after one loud config-time warning. raise: refuse such a run.
DRAFTER_SYNC_CHECKS = ("auto", "raise", "warn", "off")
METRIC_IN_SYNC = "rollout/mtp_drafter_in_sync"
# How many engine workers' drafters a sync verified, of how many serve the replica(s): vLLM's
# collective_rpc can return fewer reports than there are workers (data parallelism > 1).
METRIC_WORKERS_CHECKED = "rollout/mtp_drafter_workers_checked"
METRIC_WORKERS_EXPECTED = "rollout/mtp_drafter_workers_expected"
METRIC_CHECKED_FRACTION = "rollout/mtp_drafter_checked_fraction"

_MODULUS = (1 << 61) - 1
_WEIGHT_MULTIPLIER = 40503  # odd: i -> i * m mod 2**16 is a permutation, so weights differ locally
_CHUNK_WORDS = 1 << 24  # products < 2**32, a chunk's sum < 2**56: no int64 overflow


class DrafterOutOfSyncError(RuntimeError):
    """The drafter's MTP weights differ from the trainer's after a weight sync."""


class DrafterSyncWarning(RuntimeWarning):
    """drafter_sync_check=warn: the drafter was found out of sync (speculation-off is requested)."""


# --- fingerprint -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorFingerprint:
    dtype: str
    shape: tuple[int, ...]
    word_sum: int
    weighted_sum: int

    def to_wire(self) -> tuple:
        """Plain tuple (RPC/pickle friendly, no torch types)."""
        return (self.dtype, tuple(self.shape), self.word_sum, self.weighted_sum)

    @classmethod
    def from_wire(cls, wire: Iterable) -> "TensorFingerprint":
        dtype, shape, s1, s2 = wire
        return cls(str(dtype), tuple(int(d) for d in shape), int(s1), int(s2))

    def difference(self, other: "TensorFingerprint") -> str:
        """What differs, for messages ('' when equal)."""
        if self.dtype != other.dtype:
            return f"dtype {self.dtype} vs {other.dtype}"
        if self.shape != other.shape:
            return f"shape {list(self.shape)} vs {list(other.shape)}"
        if self != other:
            return "values differ (checksum mismatch)"
        return ""


def _word_bytes(nbytes: int) -> int:
    return 2 if nbytes % 2 == 0 else 1


def _words(tensor: torch.Tensor, word_bytes: int) -> torch.Tensor:
    """The tensor's bytes as a flat tensor of words (int16 or uint8; read as unsigned)."""
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    raw = flat.view(torch.uint8)
    if word_bytes == 1:
        return raw
    if raw.numel() % 2:
        raise ValueError(f"a tensor of {raw.numel()} bytes cannot be read as 16-bit words")
    return raw.view(torch.int16)


def word_sums(tensor: torch.Tensor, word_offset: int = 0, word_bytes: Optional[int] = None) -> tuple[int, int]:
    """(S1, S2) of ``tensor``'s words, positions starting at ``word_offset`` (see module doc).

    ``word_bytes`` (2 or 1) defaults to 2 when the tensor's byte count is even.
    """
    nbytes = tensor.numel() * tensor.element_size()
    words = _words(tensor, word_bytes or _word_bytes(nbytes))
    mask = 0xFFFF if words.dtype == torch.int16 else 0xFF
    partial = []
    for start in range(0, words.numel(), _CHUNK_WORDS):
        chunk = words[start : start + _CHUNK_WORDS].to(torch.int64) & mask
        position = torch.arange(
            word_offset + start, word_offset + start + chunk.numel(), device=chunk.device, dtype=torch.int64
        )
        weight = ((position * _WEIGHT_MULTIPLIER) & 0xFFFF) + 1
        partial.append(torch.stack((chunk.sum(), (chunk * weight).sum())))
    if not partial:
        return 0, 0
    s1 = s2 = 0
    for chunk_s1, chunk_s2 in torch.stack(partial).cpu().tolist():  # one host sync per tensor
        s1 = (s1 + chunk_s1) % _MODULUS
        s2 = (s2 + chunk_s2) % _MODULUS
    return s1, s2


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def fingerprint_tensor(tensor: torch.Tensor) -> TensorFingerprint:
    s1, s2 = word_sums(tensor)
    return TensorFingerprint(_dtype_name(tensor.dtype), tuple(tensor.shape), s1, s2)


def fingerprint_pieces(
    pieces: Iterable[tuple[int, torch.Tensor]], *, dtype: torch.dtype, shape: Iterable[int]
) -> TensorFingerprint:
    """Fingerprint of a whole tensor that arrives as contiguous pieces ``(flat_element_offset, piece)``
    (row blocks of the HF tensor, or its flat chunks). Equals ``fingerprint_tensor(whole)``."""
    shape = tuple(int(d) for d in shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    word_bytes = _word_bytes(itemsize * torch.Size(shape).numel())
    s1 = s2 = 0
    for element_offset, piece in pieces:
        if piece.dtype != dtype:
            raise ValueError(f"piece dtype {piece.dtype} differs from the whole tensor's {dtype}")
        byte_offset = element_offset * itemsize
        if byte_offset % word_bytes:
            raise ValueError(f"a piece at element {element_offset} does not start on a {word_bytes}-byte word")
        p1, p2 = word_sums(piece, byte_offset // word_bytes, word_bytes)
        s1, s2 = (s1 + p1) % _MODULUS, (s2 + p2) % _MODULUS
    return TensorFingerprint(_dtype_name(dtype), shape, s1, s2)


def fingerprint_named(weights: Iterable[tuple[str, torch.Tensor]]) -> dict[str, TensorFingerprint]:
    return {name: fingerprint_tensor(tensor) for name, tensor in weights}


# --- which tensors belong to the MTP head ------------------------------------------------------


def _config_dict(hf_config: Any) -> dict:
    if isinstance(hf_config, Mapping):
        return dict(hf_config)
    if hasattr(hf_config, "to_dict"):
        return hf_config.to_dict()
    raise TypeError(f"expected a config.json dict or a transformers config, got {type(hf_config).__name__}")


def mtp_tensor_classifier(hf_config: Any) -> Callable[[str], bool]:
    """``is_mtp(hf_name)`` for the model family of ``hf_config`` (verl_mtp.models naming).

    Raises UnknownFamilyError for a family without MTP naming, and ValueError when the config
    declares no MTP depth (then there is no drafter to check).
    """
    from verl_mtp.models.families import detect_family, mtp_depths

    config = _config_dict(hf_config)
    depths = mtp_depths(config)
    family = detect_family(config)
    if depths <= 0:
        raise ValueError(
            f"the {family.title} config declares no MTP depth ({family.depth_key} is missing or 0): "
            f"there is no MTP drafter whose sync could be checked"
        )
    return family.naming(config, depths).is_mtp


# --- trainer side: fingerprints of the stream sent to the engine --------------------------------


class StreamFingerprints:
    """Fingerprints of the MTP tensors in a ``(name, tensor)`` weight stream, taken as it is consumed.

    ``wrap`` returns a stream of the same kind (sync or async iterator) yielding the same pairs.
    """

    def __init__(self, is_mtp: Callable[[str], bool]):
        self.is_mtp = is_mtp
        self.fingerprints: dict[str, TensorFingerprint] = {}
        self.total_tensors = 0

    def _observe(self, name: str, tensor: torch.Tensor) -> None:
        self.total_tensors += 1
        if self.is_mtp(name):
            self.fingerprints[name] = fingerprint_tensor(tensor)

    def wrap(self, weights):
        if hasattr(weights, "__aiter__"):
            return self._wrap_async(weights)
        return self._wrap_sync(weights)

    def _wrap_sync(self, weights: Iterable) -> Iterator:
        for name, tensor in weights:
            self._observe(name, tensor)
            yield name, tensor

    async def _wrap_async(self, weights: AsyncIterator) -> AsyncIterator:
        async for name, tensor in weights:
            self._observe(name, tensor)
            yield name, tensor


# --- engine side: what the drafter received and holds --------------------------------------------


def module_digest(module: torch.nn.Module, exclude: Iterable[torch.Tensor] = ()) -> tuple[int, int]:
    """One combined checksum of a module's parameters (storage shared with ``exclude`` skipped)."""
    skip = {t.data_ptr() for t in exclude}
    s1 = s2 = 0
    for index, (name, param) in enumerate(sorted(module.named_parameters(), key=lambda item: item[0])):
        if param.data_ptr() in skip:
            continue
        p1, p2 = word_sums(param.data)
        # mix the parameter's index in so that two parameters swapping contents changes the digest
        s1 = (s1 + p1 * (index + 1)) % _MODULUS
        s2 = (s2 + p2 * (index + 7)) % _MODULUS
    return s1, s2


_RECORDER_WRAPPED = "__verl_mtp_drafter_recorder__"


class DrafterSyncRecorder:
    """Runs in the engine's worker process; one per worker.

    ``begin_sync(drafter, target)`` at the start of each weight sync, ``end_sync()`` after it;
    ``report()`` is the plain dict the trainer side compares (``compare_drafter_sync``).
    """

    def __init__(
        self,
        is_mtp: Optional[Callable[[str], bool]],
        worker: str = "worker",
        speculative_method: Optional[str] = None,
        quantization: Optional[str] = None,
    ):
        self.is_mtp = is_mtp
        self.worker = worker
        self.speculative_method = speculative_method
        # the engine quantises weights before its load_weights sees them (e.g. fp8 rollout):
        # values of quantised tensors cannot match the trainer's; names, calls and the digest still count
        self.quantization = quantization
        self.sync_index = 0
        self.drafter_present = False
        self.load_calls = 0
        self.received: dict[str, TensorFingerprint] = {}
        self.digest_before: Optional[tuple[int, int]] = None
        self.digest_after: Optional[tuple[int, int]] = None
        self.error: Optional[str] = None
        self._drafter: Optional[torch.nn.Module] = None
        self._shared: list[torch.Tensor] = []

    def install(self, drafter: torch.nn.Module) -> None:
        """Wrap ``drafter.load_weights`` (instance attribute, idempotent) so each call is recorded."""
        current = drafter.load_weights
        if getattr(current, _RECORDER_WRAPPED, None) is self:
            return
        original = getattr(current, "__wrapped_load_weights__", current)
        recorder = self

        def load_weights(weights, *args, **kwargs):
            recorder.load_calls += 1
            if isinstance(weights, (list, tuple)):
                # verl hands a list; pass that very list on (a loader may iterate it twice)
                for name, tensor in weights:
                    recorder._record(name, tensor)
                return original(weights, *args, **kwargs)
            return original(recorder._observe(weights), *args, **kwargs)

        setattr(load_weights, _RECORDER_WRAPPED, self)
        load_weights.__wrapped_load_weights__ = original
        drafter.load_weights = load_weights

    def _record(self, name: str, tensor: torch.Tensor) -> None:
        if self.is_mtp(name):
            self.received[name] = fingerprint_tensor(tensor)

    def _observe(self, weights: Iterable) -> Iterator:
        for name, tensor in weights:
            self._record(name, tensor)
            yield name, tensor

    def begin_sync(self, drafter: Optional[torch.nn.Module], target: Optional[torch.nn.Module] = None) -> None:
        self.start_sync()
        self.attach(drafter, target)

    def start_sync(self) -> None:
        """A new sync: forget what the previous one received."""
        self.sync_index += 1
        self.load_calls = 0
        self.received = {}
        self.error = None
        self.digest_before = self.digest_after = None
        self.drafter_present = False
        self._drafter = None

    def attach(self, drafter: Optional[torch.nn.Module], target: Optional[torch.nn.Module] = None) -> None:
        """Record this sync's loads into ``drafter`` (None: the engine has no drafter)."""
        self._drafter = drafter
        self.drafter_present = drafter is not None
        if drafter is None:
            return
        if self.is_mtp is None:
            raise RuntimeError("DrafterSyncRecorder needs an MTP name classifier before a drafter is attached")
        # Tensors the drafter shares with the target (embedding, lm_head) change with the trunk;
        # the digest must move only when the drafter's own weights do.
        self._shared = list(target.parameters()) if target is not None else []
        self.install(drafter)
        self.digest_before = module_digest(drafter, exclude=self._shared)

    def end_sync(self) -> None:
        if self._drafter is not None:
            self.digest_after = module_digest(self._drafter, exclude=self._shared)
        self._drafter = None
        self._shared = []

    def fail(self, message: str) -> None:
        """Record that recording itself failed (reported as a problem, never dropped)."""
        self.error = message

    def report(self) -> dict:
        return {
            "worker": self.worker,
            "speculative_method": self.speculative_method,
            "quantization": self.quantization,
            "sync_index": self.sync_index,
            "drafter_present": self.drafter_present,
            "load_calls": self.load_calls,
            "received": {name: fp.to_wire() for name, fp in self.received.items()},
            "digest_before": self.digest_before,
            "digest_after": self.digest_after,
            "error": self.error,
        }


# --- the verdict ----------------------------------------------------------------------------------


@dataclass
class SyncVerdict:
    sync_index: int
    checked: list[str]
    problems: list[str] = field(default_factory=list)
    workers_seen: int = 0  # worker reports compared
    workers_expected: Optional[int] = None  # workers serving the replica (None: unknown)
    layout: str = ""  # how the expected count was formed, for messages

    @property
    def complete(self) -> bool:
        """Every worker that serves the replica reported (an unknown count is never complete)."""
        return self.workers_expected is not None and self.workers_seen >= self.workers_expected

    @property
    def in_sync(self) -> bool:
        """No problem found and every worker checked: nothing is claimed for unseen workers."""
        return not self.problems and self.complete

    def coverage(self) -> str:
        expected = "an unknown number of" if self.workers_expected is None else str(self.workers_expected)
        layout = f" ({self.layout})" if self.layout else ""
        return f"{self.workers_seen} of {expected} engine worker report(s){layout}"

    def message(self) -> str:
        head = (
            f"MTP drafter out of sync after weight sync #{self.sync_index} "
            f"({len(self.checked)} MTP tensor(s) sent by the trainer; {self.coverage()} checked):"
        )
        return "\n  - ".join([head, *self.problems])

    def incomplete_message(self) -> str:
        unseen = "" if self.workers_expected is None else f"the {self.workers_expected - self.workers_seen} other(s) "
        return (
            f"MTP drafter check after weight sync #{self.sync_index} saw {self.coverage()}: "
            f"{unseen or 'the workers it did not see '}are NOT verified, so {METRIC_IN_SYNC} is not logged "
            f"for this sync ({METRIC_CHECKED_FRACTION} shows the share checked); the workers it saw agree"
        )


# MTP-named copies of trunk tensors (DeepSeek-V3 / GLM-4.5 store the embedding and lm_head again
# per depth). Engines tie them to the target's, so they change with the trunk, not the drafter's
# own parameters: they do not count as "the drafter must have changed".
_TRUNK_COPY_SUFFIXES = (".embed_tokens.weight", ".shared_head.head.weight")


def _list(names: Iterable[str], limit: int = 20) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def compare_drafter_sync(
    trainer: Mapping[str, TensorFingerprint],
    reports: Iterable[Mapping],
    *,
    sync_index: int,
    previous_trainer: Optional[Mapping[str, TensorFingerprint]] = None,
    previous_sync_index: Optional[Mapping[str, int]] = None,
    expected_workers: Optional[int] = None,
    layout: str = "",
) -> SyncVerdict:
    """Compare the trainer's MTP fingerprints with every engine worker's report.

    A problem is recorded (naming the tensors) when the stream carried no MTP tensor, a worker has
    no drafter although speculation is configured, the drafter's ``load_weights`` was not called in
    this sync (stale copy), an MTP tensor is missing on the drafter side or differs, or the drafter
    received changed MTP tensors but its parameters did not change.
    ``previous_trainer``: the trainer's fingerprints at the previous sync (None on the first).
    ``previous_sync_index``: worker -> its sync counter at the previous check.
    ``expected_workers``: how many workers serve the replica; the verdict is ``in_sync`` only when
    that many reported and none has a problem (None: unknown, never in sync).
    """
    reports = list(reports)
    verdict = SyncVerdict(sync_index=sync_index, checked=sorted(trainer), workers_seen=len(reports),
                          workers_expected=expected_workers, layout=layout)
    if not trainer:
        verdict.problems.append(
            "the weight stream carried no MTP tensor, so the drafter cannot have been updated "
            "(is the MTP head exported? actor_rollout_ref.model.mtp.enable must be True)"
        )
    if not reports:
        verdict.problems.append("no engine worker reported (the drafter recorder is not installed in the engine)")
    changed = (
        {n for n, fp in trainer.items() if previous_trainer.get(n) != fp and not n.endswith(_TRUNK_COPY_SUFFIXES)}
        if previous_trainer is not None
        else None
    )
    for report in reports:
        worker = report.get("worker", "?")
        if report.get("error"):
            verdict.problems.append(f"{worker}: recording failed: {report['error']}")
            continue
        if not report.get("drafter_present"):
            if report.get("speculative_method") is None:
                continue  # speculation is off in this engine: no drafter to keep in sync
            verdict.problems.append(
                f"{worker}: speculative method {report['speculative_method']!r} is configured but the "
                f"worker has no drafter model"
            )
            continue
        # equal, not lower: a lower counter is a restarted engine, which loads afresh
        if previous_sync_index is not None and report.get("sync_index", 0) == previous_sync_index.get(worker, -1):
            verdict.problems.append(
                f"{worker}: the engine did not run a weight load for this sync (its sync counter is still "
                f"{report.get('sync_index')}); drafter is stale: {_list(trainer)}"
            )
            continue
        if report.get("load_calls", 0) == 0:
            verdict.problems.append(
                f"{worker}: stale copy: the drafter's load_weights was not called during this sync "
                f"(only the target model was updated); stale tensors: {_list(trainer)}"
            )
            continue
        received = {n: TensorFingerprint.from_wire(w) for n, w in report.get("received", {}).items()}
        missing = sorted(set(trainer) - set(received))
        if missing:
            verdict.problems.append(f"{worker}: missing on the drafter (sent, never received): {_list(missing)}")
        quantized = bool(report.get("quantization"))
        unexpected = sorted(set(received) - set(trainer))
        if unexpected and not quantized:  # quantisation adds scale tensors
            verdict.problems.append(f"{worker}: the drafter received MTP tensors the trainer did not send: {_list(unexpected)}")
        for name in sorted(set(trainer) & set(received)):
            if quantized and trainer[name].dtype != received[name].dtype:
                continue  # quantised on the way in: only its arrival can be checked
            diff = trainer[name].difference(received[name])
            if diff:
                verdict.problems.append(f"{worker}: mismatch in {name}: trainer vs drafter {diff}")
        before, after = report.get("digest_before"), report.get("digest_after")
        if changed and before is not None and after is not None and tuple(before) == tuple(after):
            verdict.problems.append(
                f"{worker}: the drafter received {len(changed)} changed MTP tensor(s) but its parameters did "
                f"not change (load_weights dropped them): {_list(changed)}"
            )
    return verdict


# --- what happens on a mismatch -------------------------------------------------------------------

_latest_metrics: dict[str, float] = {}


def latest_drafter_sync_metrics() -> dict[str, float]:
    """The metrics of the last check in this process (``{}`` before the first / when off).

    The check runs in the process that streams weights to a replica (trainer rank or
    CheckpointEngineWorker); the patched ``ServerAdapter.update_weights`` also returns them."""
    return dict(_latest_metrics)


def take_drafter_sync_metrics() -> dict[str, float]:
    """The last check's metrics, handed out once: the trainer worker returns them from its
    ``update_weights`` so a sync without a check (another rank, an adapter-only sync) reports nothing."""
    metrics = dict(_latest_metrics)
    _latest_metrics.clear()
    return metrics


# Driver side: verl 0.9.1's colocated (naive) sync discards what the trainer workers return, so the
# patched CheckpointEngineManager records it here and the step-metrics hook logs it.
_driver_metrics: dict[str, float] = {}


def record_worker_sync_results(results: Iterable[Any]) -> None:
    """Keep the drafter metrics the trainer workers returned from one sync (the replica leaders
    return them; every other rank returns nothing). One replica out of sync makes the step's 0;
    worker counts add up over replicas."""
    for result in results:
        if not isinstance(result, Mapping):
            continue
        if METRIC_IN_SYNC in result:
            value = float(result[METRIC_IN_SYNC])
            _driver_metrics[METRIC_IN_SYNC] = min(value, _driver_metrics.get(METRIC_IN_SYNC, value))
        for key in (METRIC_WORKERS_CHECKED, METRIC_WORKERS_EXPECTED):
            if key in result:
                _driver_metrics[key] = _driver_metrics.get(key, 0.0) + float(result[key])


def pop_driver_drafter_metrics() -> dict[str, float]:
    """The drafter metrics of the syncs since the last call (driver), for the step's metrics.

    ``in_sync`` = 1 only when every replica's check saw all its workers: a replica that saw
    fewer (it logs no ``in_sync`` itself) keeps the step's from claiming 1; a 0 stays 0."""
    metrics = dict(_driver_metrics)
    _driver_metrics.clear()
    checked, expected = metrics.get(METRIC_WORKERS_CHECKED), metrics.get(METRIC_WORKERS_EXPECTED)
    if checked is not None and expected:
        metrics[METRIC_CHECKED_FRACTION] = min(checked, expected) / expected
        if checked < expected and metrics.get(METRIC_IN_SYNC) == 1.0:
            del metrics[METRIC_IN_SYNC]
    return metrics


def _request_speculation_off(reason: str) -> str:
    """Ask verl_mtp.rollout.spec_control to turn speculation off for the next step; returns what
    really happens, for the caller's loud message."""
    try:
        from verl_mtp.rollout.spec_control import force_speculation_off, get_controller
    except ImportError as exc:
        return f"speculation could NOT be turned off (verl_mtp.rollout.spec_control is unavailable: {exc})"
    try:
        force_speculation_off(steps=1, reason=reason)
    except Exception as exc:  # noqa: BLE001 - reported by the caller, never swallowed
        return f"speculation could NOT be turned off (force_speculation_off failed: {type(exc).__name__}: {exc})"
    if get_controller().actuator is None:
        # vLLM 0.24 / SGLang 0.5.12 have no runtime switch: say so instead of claiming it is off.
        return ("speculation-off was requested for the next step, but the engine has no runtime switch, so "
                "it keeps drafting with the stale head (outputs stay correct; acceptance and throughput drop)")
    return "speculation is turned OFF for the next step"


def _loud(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
    logger.warning(message)
    warnings.warn(message, DrafterSyncWarning, stacklevel=3)


def enforce_drafter_sync(verdict: SyncVerdict, mode: str, announce_incomplete: bool = True) -> dict[str, float]:
    """Act on ``verdict`` per ``drafter_sync_check`` and return the step's metrics.

    A problem found: raise/auto: DrafterOutOfSyncError with the list of problems; warn: a loud
    error on stderr, a DrafterSyncWarning, ``rollout/mtp_drafter_in_sync`` = 0 and speculation off
    for the next step. No problem, every worker checked: ``in_sync`` = 1. No problem, but fewer
    worker reports than workers: ``in_sync`` is not logged (nothing is claimed for unseen
    workers); raise: DrafterOutOfSyncError; auto/warn: a loud warning (when
    ``announce_incomplete``). The worker counts and ``checked_fraction`` are logged whenever the
    expected count is known. off: nothing (no metric).
    """
    if mode not in DRAFTER_SYNC_CHECKS:
        raise ValueError(f"drafter_sync_check={mode!r}; valid choices are {', '.join(DRAFTER_SYNC_CHECKS)}")
    _latest_metrics.clear()
    if mode == "off":
        return {}
    if verdict.workers_expected:
        _latest_metrics[METRIC_WORKERS_CHECKED] = float(verdict.workers_seen)
        _latest_metrics[METRIC_WORKERS_EXPECTED] = float(verdict.workers_expected)
        _latest_metrics[METRIC_CHECKED_FRACTION] = min(verdict.workers_seen, verdict.workers_expected) / verdict.workers_expected
    if verdict.in_sync:
        _latest_metrics[METRIC_IN_SYNC] = 1.0
        return dict(_latest_metrics)
    if not verdict.problems:  # the workers seen agree, but not all workers were seen
        message = verdict.incomplete_message()
        if mode == "raise":
            raise DrafterOutOfSyncError(
                message + "\n(drafter_sync_check=raise requires every worker to be verified; set "
                "actor_rollout_ref.model.mtp.drafter_sync_check=auto or warn to run with the partial check and a warning)"
            )
        if announce_incomplete:
            _loud(f"[verl-mtp] WARNING: {message}.")
        return dict(_latest_metrics)
    message = verdict.message()
    if mode in ("auto", "raise"):
        raise DrafterOutOfSyncError(
            message + "\n(set actor_rollout_ref.model.mtp.drafter_sync_check=warn to continue with a loud warning "
            "and a request to turn speculation off for the next step instead)"
        )
    _latest_metrics[METRIC_IN_SYNC] = 0.0
    action = _request_speculation_off(f"drafter out of sync after weight sync #{verdict.sync_index}")
    loud = f"[verl-mtp] ERROR: {message}\n[verl-mtp] drafter_sync_check=warn: {action}."
    print(loud, file=sys.stderr, flush=True)
    logger.error(loud)
    warnings.warn(loud, DrafterSyncWarning, stacklevel=2)
    return dict(_latest_metrics)


# --- the trainer/adapter side of one sync ---------------------------------------------------------


class DrafterSyncChecker:
    """Keeps the state between syncs on the process that drives a replica's weight sync.

    ``stream = checker.begin(weights)`` before handing the stream to the engine,
    ``checker.finish(reports)`` once the engine reports; returns the metrics.
    """

    def __init__(self, is_mtp: Callable[[str], bool], mode: str, expected_workers: Optional[int], layout: str = ""):
        """``expected_workers``: how many engine workers serve the replica (each should report);
        None when unknown (then no sync is reported in sync). ``layout``: how it was formed."""
        if mode not in DRAFTER_SYNC_CHECKS:
            raise ValueError(f"drafter_sync_check={mode!r}; valid choices are {', '.join(DRAFTER_SYNC_CHECKS)}")
        self.is_mtp = is_mtp
        self.mode = mode
        self.expected_workers = expected_workers
        self.layout = layout
        self._announced_coverage: Optional[int] = None
        self.sync_index = 0
        self._stream: Optional[StreamFingerprints] = None
        self._previous: Optional[dict[str, TensorFingerprint]] = None
        self._previous_worker_syncs: dict[str, int] = {}

    def begin(self, weights):
        self.sync_index += 1
        self._stream = StreamFingerprints(self.is_mtp)
        return self._stream.wrap(weights)

    def finish(self, reports: Optional[Iterable[Mapping]]) -> dict[str, float]:
        if self._stream is None:
            raise RuntimeError("DrafterSyncChecker.finish() without begin()")
        reports = [r for r in (reports or []) if r is not None]
        verdict = compare_drafter_sync(
            self._stream.fingerprints,
            reports,
            sync_index=self.sync_index,
            previous_trainer=self._previous,
            previous_sync_index=self._previous_worker_syncs if self.sync_index > 1 else None,
            expected_workers=self.expected_workers,
            layout=self.layout,
        )
        self._previous = dict(self._stream.fingerprints)
        self._previous_worker_syncs = {r.get("worker", "?"): r.get("sync_index", 0) for r in reports}
        self._stream = None
        # an incomplete view is announced once, and again whenever the number of reports changes
        announce = verdict.complete or verdict.workers_seen != self._announced_coverage
        self._announced_coverage = None if verdict.complete else verdict.workers_seen
        return enforce_drafter_sync(verdict, self.mode, announce_incomplete=announce)


# --- vLLM worker process: verl's vLLMColocateWorkerExtension --------------------------------------

_WORKER_RECORDER_ATTR = "_verl_mtp_drafter_recorder"
# The worker-extension method (added by verl_mtp.patches) that returns vllm_worker_drafter_report.
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


def vllm_worker_begin_sync(worker: Any) -> None:
    """Called in the vLLM worker at the start of ``update_weights_from_ipc``; never raises (a failure
    is carried to the trainer in the report, where it counts as out of sync)."""
    recorder = getattr(worker, _WORKER_RECORDER_ATTR, None)
    if recorder is None:
        name = f"vllm worker rank {getattr(worker, 'rank', getattr(worker, 'local_rank', '?'))}"
        # worker ranks restart at 0 in each data-parallel engine: name the engine too
        parallel = getattr(getattr(getattr(worker, "model_runner", None), "vllm_config", None), "parallel_config", None)
        if int(getattr(parallel, "data_parallel_size", 1) or 1) > 1:
            name = f"vllm dp engine {getattr(parallel, 'data_parallel_rank', '?')} worker rank {getattr(worker, 'rank', '?')}"
        recorder = DrafterSyncRecorder(None, worker=name)
        setattr(worker, _WORKER_RECORDER_ATTR, recorder)
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
    from verl_mtp.config import MTP_KEY_PREFIX, as_extended

    model_config = adapter.model_config
    mtp = as_extended(getattr(model_config, "mtp", None))
    checker = None
    if mtp.enable and mtp.enable_rollout and mtp.drafter_sync_check != "off":
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
            message = f"[verl-mtp] WARNING: MTP drafter NOT verified after this weight sync ({what} carries no whole MTP tensors)."
            print(message, file=sys.stderr, flush=True)
            warnings.warn(message, DrafterSyncWarning, stacklevel=2)
        return await original(adapter, weights, global_steps=global_steps, wire_format=wire_format, **kwargs)
    result = await original(
        adapter, checker.begin(weights), global_steps=global_steps, wire_format=wire_format, **kwargs
    )
    reports = await adapter._execute_method(VLLM_REPORT_METHOD)
    metrics = checker.finish(reports)
    return metrics if result is None else result


# --- run config: where the check cannot be done -----------------------------------------------------


def check_drafter_sync_run_config(config: Any, mtp: Any) -> None:
    """Fail early when ``drafter_sync_check=raise`` asks for a check this rollout path cannot do;
    warn loudly for ``warn``. ``config`` is the whole run config, ``mtp`` the ExtendedMtpConfig."""
    from verl_mtp.config import MTP_KEY_PREFIX, MtpConfigError, _select

    mode = mtp.drafter_sync_check
    if mode == "off" or not (mtp.enable and mtp.enable_rollout):
        return
    engine = _select(config, "actor_rollout_ref.rollout.name")
    backend = _select(config, "actor_rollout_ref.rollout.checkpoint_engine.backend", "naive")
    data_parallel = _select(config, "actor_rollout_ref.rollout.data_parallel_size", 1)
    reason = None
    if engine != "vllm":
        reason = (
            f"the drafter sync check is implemented for vLLM only; actor_rollout_ref.rollout.name={engine!r} "
            f"has no verl-mtp engine-side recorder yet"
        )
    elif backend == "delta_sharded":
        reason = (
            "checkpoint_engine.backend='delta_sharded' sends sparse deltas, not whole tensors, so the drafter's "
            "MTP tensors cannot be fingerprinted"
        )
    elif int(data_parallel) > 1:
        # Partly checkable: the verdict covers engine 0's workers only, and says so every sync.
        partial = (
            f"actor_rollout_ref.rollout.data_parallel_size={data_parallel}: {VLLM_DP_REPORTS_NOTE} "
            f"(its DPLBAsyncMPClient), so only 1 of the {data_parallel} engines' drafters can be checked"
        )
        if mode == "raise":
            raise MtpConfigError(
                f"{MTP_KEY_PREFIX}.drafter_sync_check='raise' is invalid here: {partial}; valid choices are "
                f"{MTP_KEY_PREFIX}.drafter_sync_check=auto or warn (check engine 0's workers, never log "
                f"{METRIC_IN_SYNC}=1 for the others, warn) or off, or data_parallel_size=1"
            )
        _loud(
            f"[verl-mtp] WARNING: the MTP drafter will be verified on data-parallel engine 0 only: {partial}. "
            f"{METRIC_IN_SYNC} is not logged as 1; {METRIC_CHECKED_FRACTION} shows the share checked."
        )
        return
    if reason is None:
        return
    if mode == "raise":
        raise MtpConfigError(
            f"{MTP_KEY_PREFIX}.drafter_sync_check='raise' is invalid here: {reason}; valid choices are "
            f"{MTP_KEY_PREFIX}.drafter_sync_check=auto or warn (run unverified, with a warning) or off"
        )
    message = f"[verl-mtp] WARNING: the MTP drafter will NOT be verified after weight syncs: {reason}."
    print(message, file=sys.stderr, flush=True)
    warnings.warn(message, DrafterSyncWarning, stacklevel=2)
