"""Per-step speculative-decoding metrics, exact and aggregated over every rollout replica.

What verl 0.9.1 already logs (``compute_spec_decode_metrics`` in ``verl/trainer/ppo/ray_trainer.py``):
``rollout/spec_accept_rate`` and ``rollout/spec_accept_length`` from the per-request fields its
rollout servers write (``spec_num_draft_tokens``, ``spec_num_accepted_tokens``,
``spec_num_verify_steps``). They are per step (only this step's requests) and cover all replicas,
but each request counts equally, whatever its length (a 10-token answer weighs as much as a
4000-token one). Where those fields come from:

* vLLM: ``RequestOutput.metrics.request_spec_decode_stats``. Neither vLLM 0.24.0 (the version verl
  0.9.1 pins) nor 0.33.0 has that attribute, so verl warns once and logs nothing. vLLM 0.32.0 has
  per-request counts under another name (``CompletionOutput.spec_decode_metrics``, in the OpenAI
  response as ``metrics.speculative_decoding``, opt-in with ``--per-request-spec-decode-metrics``),
  which verl 0.9.1 does not read; ``request_counts_vllm`` reads them.
* SGLang: verl reads ``meta_info["spec_draft_token_num"]`` / ``["spec_accept_token_num"]``, which
  SGLang 0.5.12 (pinned) and 0.5.23 do not emit; their per-request keys are ``spec_verify_ct``,
  ``spec_num_proposed_drafts``, ``spec_num_correct_drafts`` and
  ``spec_correct_drafts_histogram``. verl therefore logs a constant draft count and zero accepts.

This module computes token-weighted metrics (sum of accepted / sum of drafted over the step, the
same totals a single big engine would report) from three shapes of input:

1. engine cumulative counters per replica, differenced per step (``CounterDeltaTracker``): vLLM v1's
   Prometheus counters ``vllm:spec_decode_num_drafts``, ``..._num_draft_tokens``,
   ``..._num_accepted_tokens``, ``..._num_accepted_tokens_per_pos`` and ``vllm:generation_tokens``
   (``vllm/v1/spec_decode/metrics.py`` and ``vllm/v1/metrics/loggers.py`` at 0.24.0; exposed on the
   server's ``/metrics`` only when ``rollout.disable_log_stats=False``). Read from vLLM 0.32.0's
   real OpenAI server on CPU (``tests/engine/test_server_metrics_engine.py``): every series carries
   ``model_name`` (the served name: free text, escaped, may hold "}" or quotes) and ``engine`` (the
   data-parallel engine index, "0".."N-1" on one server); the per-position counter adds
   ``position`` "0".."K-1"; all exist with value 0 from start; each counter also has a
   ``_created`` gauge, which is skipped. One server's engines are summed (``scrape_vllm_counters``);
2. per-request counts shaped like verl's extra fields, vLLM 0.32's per-request metrics, or
   SGLang's ``meta_info``;
3. nothing: ``rollout/mtp_spec_stats_available`` is 0 and a one-time warning says how to get stats.

SGLang's server-level ``avg_spec_accept_length`` (``/get_server_info``) is a lifetime ratio without
its counts, so it cannot be turned into a per-step value; it is not used.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence

logger = logging.getLogger(__name__)

METRIC_PREFIX = "rollout/mtp_spec_"


@dataclass(frozen=True)
class SpecCounts:
    """Speculative-decoding counts over some interval (one request, one replica-step, a step).

    num_drafts: verify steps that carried at least one draft token (vLLM "drafts",
        SGLang ``spec_verify_ct``).
    num_draft_tokens: draft tokens proposed. num_accepted_tokens: draft tokens accepted (the bonus
        token the target adds at every verify step is not counted).
    accepted_per_pos: drafts whose token at position i was accepted, i = 0..K-1 (empty when the
        source does not report positions).
    generated_tokens: tokens the engine produced, when the source reports it (else None).
    """

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: tuple[int, ...] = ()
    generated_tokens: Optional[int] = None

    def __add__(self, other: "SpecCounts") -> "SpecCounts":
        width = max(len(self.accepted_per_pos), len(other.accepted_per_pos))
        pos = tuple(_at(self.accepted_per_pos, i) + _at(other.accepted_per_pos, i) for i in range(width))
        if self.generated_tokens is None or other.generated_tokens is None:
            generated = self.generated_tokens if other.generated_tokens is None else other.generated_tokens
        else:
            generated = self.generated_tokens + other.generated_tokens
        return SpecCounts(
            self.num_drafts + other.num_drafts,
            self.num_draft_tokens + other.num_draft_tokens,
            self.num_accepted_tokens + other.num_accepted_tokens,
            pos,
            generated,
        )

    def minus(self, earlier: "SpecCounts") -> Optional["SpecCounts"]:
        """``self - earlier`` for cumulative counters; None when any counter went down (a reset)."""
        pairs = [
            (self.num_drafts, earlier.num_drafts),
            (self.num_draft_tokens, earlier.num_draft_tokens),
            (self.num_accepted_tokens, earlier.num_accepted_tokens),
        ]
        width = max(len(self.accepted_per_pos), len(earlier.accepted_per_pos))
        pairs += [(_at(self.accepted_per_pos, i), _at(earlier.accepted_per_pos, i)) for i in range(width)]
        if self.generated_tokens is not None and earlier.generated_tokens is not None:
            pairs.append((self.generated_tokens, earlier.generated_tokens))
        if any(now < before for now, before in pairs):
            return None
        generated = None
        if self.generated_tokens is not None and earlier.generated_tokens is not None:
            generated = self.generated_tokens - earlier.generated_tokens
        return SpecCounts(
            self.num_drafts - earlier.num_drafts,
            self.num_draft_tokens - earlier.num_draft_tokens,
            self.num_accepted_tokens - earlier.num_accepted_tokens,
            tuple(_at(self.accepted_per_pos, i) - _at(earlier.accepted_per_pos, i) for i in range(width)),
            generated,
        )


def _at(values: Sequence[int], i: int) -> int:
    return values[i] if i < len(values) else 0


def total(counts: Iterable[SpecCounts]) -> SpecCounts:
    result = SpecCounts()
    for c in counts:
        result = result + c
    return result


# --- source 1: engine cumulative counters ---------------------------------------------------------

# vLLM v1 counter names; the text exposition appends "_total" to counters.
VLLM_DRAFTS = "vllm:spec_decode_num_drafts"
VLLM_DRAFT_TOKENS = "vllm:spec_decode_num_draft_tokens"
VLLM_ACCEPTED = "vllm:spec_decode_num_accepted_tokens"
VLLM_ACCEPTED_PER_POS = "vllm:spec_decode_num_accepted_tokens_per_pos"
VLLM_GENERATION_TOKENS = "vllm:generation_tokens"

# A label value is a quoted string that may hold "}" and escaped quotes (a served model name is free
# text), so the label block is matched quoted-string-aware, not up to the first "}".
_QUOTED = r'"(?:[^"\\]|\\.)*"'
_SAMPLE = re.compile(
    r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)'
    r'(?:\{(?P<labels>(?:[^"}]|' + _QUOTED + r')*)\})?'
    r'\s+(?P<value>\S+)'
)
_LABEL = re.compile(r'(?P<key>[a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"(?P<value>(?:[^"\\]|\\.)*)"')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


def _unescape(value: str) -> str:
    return re.sub(r'\\[\\"n]', lambda m: _UNESCAPE[m.group(0)], value)


def parse_prometheus_text(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Samples ``(name, labels, value)`` of a Prometheus text exposition (comments skipped,
    label values unescaped)."""
    samples = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match is None:
            continue
        labels = {m["key"]: _unescape(m["value"]) for m in _LABEL.finditer(match["labels"] or "")}
        try:
            value = float(match["value"])
        except ValueError:
            continue  # not a sample line this parser understands; never fatal for a scrape
        samples.append((match["name"], labels, value))
    return samples


def vllm_counters_from_prometheus(text: str) -> dict[str, SpecCounts]:
    """Cumulative spec-decode counters of one vLLM server, per engine (``engine`` label).

    A data-parallel server has one series per engine index; ``model_name`` is the same on all of
    a server's series (one served model per server), so the engine index is the key. Empty when
    the server exposes no spec-decode counters (speculation off, or log stats disabled).
    """
    per_engine: dict[str, dict[str, Any]] = {}

    def slot(labels: Mapping[str, str]) -> dict[str, Any]:
        return per_engine.setdefault(labels.get("engine", "0"), {"pos": {}})

    for name, labels, value in parse_prometheus_text(text):
        base = name[: -len("_total")] if name.endswith("_total") else name
        if base == VLLM_ACCEPTED_PER_POS:
            slot(labels)["pos"][int(labels.get("position", 0))] = int(value)
        elif base in (VLLM_DRAFTS, VLLM_DRAFT_TOKENS, VLLM_ACCEPTED, VLLM_GENERATION_TOKENS):
            slot(labels)[base] = int(value)
    result = {}
    for engine, found in per_engine.items():
        if VLLM_DRAFTS not in found:
            continue  # generation tokens alone: this engine does not speculate
        pos = found["pos"]
        result[engine] = SpecCounts(
            num_drafts=found[VLLM_DRAFTS],
            num_draft_tokens=found.get(VLLM_DRAFT_TOKENS, 0),
            num_accepted_tokens=found.get(VLLM_ACCEPTED, 0),
            accepted_per_pos=tuple(pos.get(i, 0) for i in range(max(pos) + 1)) if pos else (),
            generated_tokens=found.get(VLLM_GENERATION_TOKENS),
        )
    return result


@dataclass
class ReplicaDelta:
    counts: Optional[SpecCounts]  # None: the replica reported nothing this step
    reset: bool = False  # a counter went down (engine restarted); counts is what it logged since


class CounterDeltaTracker:
    """Turns per-replica cumulative counters into per-interval differences.

    ``update`` returns, for every replica seen now, what it counted since the previous ``update``.
    A counter that went down means the engine restarted: its current values are what it counted
    since the restart, so they are the delta (counts from before the restart that were not read are
    lost, and ``reset`` says so). A replica seen for the first time has no baseline: its first
    snapshot only sets one (call ``update`` once before the first step).
    """

    def __init__(self) -> None:
        self._last: dict[str, SpecCounts] = {}

    def update(self, snapshots: Mapping[str, Optional[SpecCounts]]) -> dict[str, ReplicaDelta]:
        deltas = {}
        for replica, now in snapshots.items():
            if now is None:
                deltas[replica] = ReplicaDelta(None)
                continue
            before = self._last.get(replica)
            self._last[replica] = now
            if before is None:
                deltas[replica] = ReplicaDelta(None)
                continue
            diff = now.minus(before)
            deltas[replica] = ReplicaDelta(now, reset=True) if diff is None else ReplicaDelta(diff)
        return deltas


# --- source 2: per-request counts -----------------------------------------------------------------


def request_counts_verl(extra: Mapping[str, Any]) -> Optional[SpecCounts]:
    """One request's counts from verl's rollout extra fields (vLLM's ``request_spec_decode_stats``
    re-keyed by verl 0.9.1). None when the request carries no spec fields."""
    if extra is None or "spec_num_draft_tokens" not in extra:
        return None
    return SpecCounts(
        num_drafts=int(extra.get("spec_num_verify_steps") or 0),
        num_draft_tokens=int(extra.get("spec_num_draft_tokens") or 0),
        num_accepted_tokens=int(extra.get("spec_num_accepted_tokens") or 0),
    )


def request_counts_sglang(meta_info: Mapping[str, Any]) -> SpecCounts:
    """One request's counts from SGLang's ``meta_info`` (SGLang 0.5.12 / 0.5.23 key names).

    SGLang writes the spec keys only for requests with at least one verify step; others (e.g. a
    one-token answer) count as zero drafts. ``spec_correct_drafts_histogram[k]`` is the number of
    verify steps that accepted exactly k drafts, so position i was accepted in sum_{k>i} hist[k]
    drafts.
    """
    completion = meta_info.get("completion_tokens")
    generated = int(completion) if completion is not None else None
    verify = int(meta_info.get("spec_verify_ct") or 0)
    if verify == 0:
        return SpecCounts(generated_tokens=generated)
    accepted = meta_info.get("spec_num_correct_drafts", meta_info.get("spec_accepted_drafts", 0))
    proposed = meta_info.get("spec_num_proposed_drafts", meta_info.get("spec_proposed_drafts", 0))
    hist = list(meta_info.get("spec_correct_drafts_histogram") or meta_info.get("spec_accept_histogram") or [])
    return SpecCounts(verify, int(proposed or 0), int(accepted or 0), _positions_from_histogram(hist), generated)


def _positions_from_histogram(hist: Sequence[int]) -> tuple[int, ...]:
    """hist[k]: verify steps that accepted exactly k drafts -> drafts whose position i was accepted
    (sum over k > i), i = 0..len(hist)-2."""
    return tuple(sum(int(hist[k]) for k in range(i + 1, len(hist))) for i in range(max(len(hist) - 1, 0)))


def request_counts_vllm(spec: Optional[Mapping[str, Any]], completion_tokens: Optional[int] = None) -> Optional[SpecCounts]:
    """One request's counts from vLLM's per-request spec-decode metrics, or None without them.

    ``spec`` is the OpenAI server's ``response["metrics"]["speculative_decoding"]`` or, in
    process, ``RequestOutput.outputs[0].spec_decode_metrics.to_dict()`` (vLLM 0.32.0, opt-in with
    ``--per-request-spec-decode-metrics summary``; only for requests with n = 1). Its
    ``acceptance_histogram[j]`` counts the verify steps that accepted exactly j drafts, which
    gives the same per-position counts as the server's counters.
    """
    if not spec:
        return None
    hist = [int(h) for h in spec.get("acceptance_histogram") or []]
    return SpecCounts(
        num_drafts=int(spec.get("num_spec_steps", sum(hist))),
        num_draft_tokens=int(spec.get("num_draft_tokens") or 0),
        num_accepted_tokens=int(spec.get("num_accepted_draft_tokens", sum(j * h for j, h in enumerate(hist)))),
        accepted_per_pos=_positions_from_histogram(hist),
        generated_tokens=None if completion_tokens is None else int(completion_tokens),
    )


# --- the step's metrics ---------------------------------------------------------------------------

SOURCE_ENGINE_COUNTERS = "engine_counters"
SOURCE_REQUESTS = "requests"
SOURCE_NONE = "none"
SOURCE_CODES = {SOURCE_NONE: 0, SOURCE_REQUESTS: 1, SOURCE_ENGINE_COUNTERS: 2}


@dataclass
class StepSpecStats:
    """What one rollout step measured, summed over replicas (token-weighted by construction)."""

    counts: Optional[SpecCounts]
    source: str = SOURCE_NONE
    replicas_reporting: int = 0
    replicas_without_stats: int = 0
    counter_resets: int = 0
    generated_tokens: Optional[int] = None
    gen_seconds: Optional[float] = None
    num_requests: int = 0
    num_replicas: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def available(self) -> bool:
        return self.counts is not None

    @property
    def accept_rate(self) -> Optional[float]:
        c = self.counts
        return c.num_accepted_tokens / c.num_draft_tokens if c is not None and c.num_draft_tokens > 0 else None

    @property
    def accept_length(self) -> Optional[float]:
        """Tokens per verify step, bonus token included (vLLM's and SGLang's convention)."""
        c = self.counts
        return 1.0 + c.num_accepted_tokens / c.num_drafts if c is not None and c.num_drafts > 0 else None

    @property
    def accept_rate_per_pos(self) -> tuple[float, ...]:
        c = self.counts
        if c is None or c.num_drafts == 0:
            return ()
        return tuple(a / c.num_drafts for a in c.accepted_per_pos)

    @property
    def throughput(self) -> Optional[float]:
        """Generated tokens per second of rollout wall time."""
        if self.generated_tokens is None or not self.gen_seconds or self.gen_seconds <= 0:
            return None
        return self.generated_tokens / self.gen_seconds

    @property
    def requests_per_replica(self) -> Optional[float]:
        return self.num_requests / self.num_replicas if self.num_replicas > 0 and self.num_requests else None

    def metrics(self) -> dict[str, float]:
        m: dict[str, float] = {
            f"{METRIC_PREFIX}stats_available": float(self.available),
            f"{METRIC_PREFIX}stats_source": float(SOURCE_CODES[self.source]),
            f"{METRIC_PREFIX}replicas_reporting": float(self.replicas_reporting),
            f"{METRIC_PREFIX}replicas_without_stats": float(self.replicas_without_stats),
            f"{METRIC_PREFIX}counter_resets": float(self.counter_resets),
        }
        c = self.counts
        if c is not None:
            m[f"{METRIC_PREFIX}num_drafts"] = float(c.num_drafts)
            m[f"{METRIC_PREFIX}draft_tokens"] = float(c.num_draft_tokens)
            m[f"{METRIC_PREFIX}accepted_tokens"] = float(c.num_accepted_tokens)
            if self.accept_rate is not None:
                m[f"{METRIC_PREFIX}accept_rate"] = self.accept_rate
            if self.accept_length is not None:
                m[f"{METRIC_PREFIX}accept_length"] = self.accept_length
            for i, rate in enumerate(self.accept_rate_per_pos):
                m[f"{METRIC_PREFIX}accept_rate_pos{i + 1}"] = rate
        if self.generated_tokens is not None:
            m["rollout/mtp_gen_tokens"] = float(self.generated_tokens)
        if self.gen_seconds is not None:
            m["rollout/mtp_gen_seconds"] = float(self.gen_seconds)
        if self.throughput is not None:
            m["rollout/mtp_gen_throughput"] = self.throughput
        if self.requests_per_replica is not None:
            m["rollout/mtp_requests_per_replica"] = self.requests_per_replica
        return m


def aggregate_replicas(deltas: Mapping[str, ReplicaDelta]) -> tuple[Optional[SpecCounts], int, int, int]:
    """(sum of reported deltas or None, replicas reporting, replicas without stats, resets)."""
    reported = [d.counts for d in deltas.values() if d.counts is not None]
    missing = sum(1 for d in deltas.values() if d.counts is None)
    resets = sum(1 for d in deltas.values() if d.reset)
    return (total(reported) if reported else None), len(reported), missing, resets


def aggregate_requests(per_request: Iterable[Optional[SpecCounts]]) -> tuple[Optional[SpecCounts], int]:
    """(sum over requests that carry stats or None when none does, number without stats)."""
    found, missing = [], 0
    for c in per_request:
        if c is None:
            missing += 1
        else:
            found.append(c)
    return (total(found) if found else None), missing


class MissingStatsWarning:
    """Warns once per process and reason that an engine gives no speculative-decoding stats."""

    def __init__(self) -> None:
        self._warned: set[str] = set()

    def warn(self, reason: str) -> bool:
        if reason in self._warned:
            return False
        self._warned.add(reason)
        logger.warning("verl-mtp: no speculative-decoding stats this step (%s); "
                       "rollout/mtp_spec_stats_available=0 until the engine reports them", reason)
        return True

