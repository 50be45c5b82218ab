"""Both ends of one weight sync, fingerprinted as the tensors pass.

* Trainer side, ``StreamFingerprints``: wraps the ``(name, tensor)`` weight stream verl hands to the
  rollout engine and fingerprints the MTP tensors as they pass (nothing is materialised).
* Engine side, ``DrafterSyncRecorder``: runs inside the engine's worker process. It wraps the
  drafter model's ``load_weights`` and fingerprints the MTP tensors *as the drafter receives them*
  (the engine fuses qkv / gate_up and shards by TP afterwards, so received tensors are the only
  form that matches the trainer's names and layouts exactly). It also counts the drafter's
  ``load_weights`` calls per sync (a drafter that was never called holds a stale copy) and takes
  a digest of the drafter's own parameters before and after the sync (a drafter that received new
  weights but whose parameters did not change dropped them).

Both sides count the seconds they spend (``seconds`` / ``record_seconds``): the check's cost
against the weight load it watches is measurable in the run itself.
"""

from __future__ import annotations

import time
from typing import AsyncIterator, Callable, Iterable, Iterator, Optional

import torch

from verl_mtp.rollout.drafter_sync.fingerprint import TensorFingerprint, fingerprint_tensor, module_digest


class StreamFingerprints:
    """Fingerprints of the MTP tensors in a ``(name, tensor)`` weight stream, taken as it is consumed.

    ``wrap`` returns a stream of the same kind (sync or async iterator) yielding the same pairs.
    """

    def __init__(self, is_mtp: Callable[[str], bool]):
        self.is_mtp = is_mtp
        self.fingerprints: dict[str, TensorFingerprint] = {}
        self.total_tensors = 0
        self.seconds = 0.0  # spent fingerprinting

    def _observe(self, name: str, tensor: torch.Tensor) -> None:
        self.total_tensors += 1
        if self.is_mtp(name):
            start = time.perf_counter()
            self.fingerprints[name] = fingerprint_tensor(tensor)
            self.seconds += time.perf_counter() - start

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
        self.record_seconds = 0.0  # this sync's fingerprints and digests (the check's cost in the worker)
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
            start = time.perf_counter()
            self.received[name] = fingerprint_tensor(tensor)
            self.record_seconds += time.perf_counter() - start

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
        self.record_seconds = 0.0
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
        self.digest_before = self._digest(drafter)

    def _digest(self, drafter: torch.nn.Module) -> tuple[int, int]:
        start = time.perf_counter()
        digest = module_digest(drafter, exclude=self._shared)
        self.record_seconds += time.perf_counter() - start
        return digest

    def end_sync(self) -> None:
        if self._drafter is not None:
            self.digest_after = self._digest(self._drafter)
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
            "record_seconds": self.record_seconds,
            "error": self.error,
        }
