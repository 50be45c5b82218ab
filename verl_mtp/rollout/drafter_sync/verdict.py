"""The verdict of one sync: the trainer's MTP fingerprints against every engine worker's report."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional

from verl_mtp.rollout.drafter_sync.channel import METRIC_CHECKED_FRACTION, METRIC_IN_SYNC
from verl_mtp.rollout.drafter_sync.fingerprint import TensorFingerprint


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
        verdict.problems.extend(_report_problems(report, trainer, changed, previous_sync_index))
    return verdict


def _report_problems(
    report: Mapping,
    trainer: Mapping[str, TensorFingerprint],
    changed: Optional[set[str]],
    previous_sync_index: Optional[Mapping[str, int]],
) -> list[str]:
    """One worker's problems; the first that makes the rest meaningless ends the list."""
    worker = report.get("worker", "?")
    if report.get("error"):
        return [f"{worker}: recording failed: {report['error']}"]
    if not report.get("drafter_present"):
        if report.get("speculative_method") is None:
            return []  # speculation is off in this engine: no drafter to keep in sync
        return [f"{worker}: speculative method {report['speculative_method']!r} is configured but the "
                f"worker has no drafter model"]
    # equal, not lower: a lower counter is a restarted engine, which loads afresh
    if previous_sync_index is not None and report.get("sync_index", 0) == previous_sync_index.get(worker, -1):
        return [f"{worker}: the engine did not run a weight load for this sync (its sync counter is still "
                f"{report.get('sync_index')}); drafter is stale: {_list(trainer)}"]
    if report.get("load_calls", 0) == 0:
        return [f"{worker}: stale copy: the drafter's load_weights was not called during this sync "
                f"(only the target model was updated); stale tensors: {_list(trainer)}"]
    received = {n: TensorFingerprint.from_wire(w) for n, w in report.get("received", {}).items()}
    problems = _tensor_problems(worker, trainer, received, quantized=bool(report.get("quantization")))
    before, after = report.get("digest_before"), report.get("digest_after")
    if changed and before is not None and after is not None and tuple(before) == tuple(after):
        problems.append(
            f"{worker}: the drafter received {len(changed)} changed MTP tensor(s) but its parameters did "
            f"not change (load_weights dropped them): {_list(changed)}"
        )
    return problems


def _tensor_problems(
    worker: str, trainer: Mapping[str, TensorFingerprint], received: Mapping[str, TensorFingerprint], *, quantized: bool
) -> list[str]:
    problems = []
    missing = sorted(set(trainer) - set(received))
    if missing:
        problems.append(f"{worker}: missing on the drafter (sent, never received): {_list(missing)}")
    unexpected = sorted(set(received) - set(trainer))
    if unexpected and not quantized:  # quantisation adds scale tensors
        problems.append(f"{worker}: the drafter received MTP tensors the trainer did not send: {_list(unexpected)}")
    for name in sorted(set(trainer) & set(received)):
        if quantized and trainer[name].dtype != received[name].dtype:
            continue  # quantised on the way in: only its arrival can be checked
        diff = trainer[name].difference(received[name])
        if diff:
            problems.append(f"{worker}: mismatch in {name}: trainer vs drafter {diff}")
    return problems
