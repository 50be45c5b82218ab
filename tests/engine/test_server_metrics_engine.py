"""Per-step speculative-decoding metrics read from vLLM's real OpenAI server, and the batch-size
rule verl-mtp builds, run by vLLM's real CPU engine.

The checkpoint is a tiny MiMo exported by verl-mtp's bridges (``export_checkpoints``, see
verl_mtp/testing/vllm_engine.py): with the matched head every draft token is accepted at T = 0,
with the random one none is. MiMo has one MTP layer; vLLM reuses it for 2 draft tokens
(``num_speculative_tokens`` must be a multiple of the layer count), so the per-position counters
have two positions.

- One server (``python -m vllm.entrypoints.openai.api_server``, data-parallel size 2, matched
  head, per-request spec metrics on, a served model name with braces and quotes): three "steps"
  of concurrent completions, ``/metrics`` scraped between them through verl-mtp's
  ``scrape_vllm_counters``, differenced by ``CounterDeltaTracker``. Each step's difference must
  equal the sum of the per-request counts the server returned for that step's requests, and the
  differences must add up to the engines' final counters.
- One in-process engine started with ``vllm_batch_size_schedule(2, off_from_batch_size=4)``:
  batches of 1 and 3 draft, a batch of 8 adds no drafts.

Runs in the engine environment only (see tests/engine/test_export_drafts.py); run as
``python -m pytest -ra -m engine --noconftest tests/engine/test_server_metrics_engine.py``.
"""

from __future__ import annotations

import json
import os

import pytest

from verl_mtp.rollout.spec_control import scrape_vllm_counters, vllm_batch_size_schedule
from verl_mtp.rollout.spec_metrics import (
    SOURCE_ENGINE_COUNTERS,
    CounterDeltaTracker,
    SpecCounts,
    StepSpecStats,
    aggregate_replicas,
    parse_prometheus_text,
    request_counts_vllm,
    total,
    vllm_counters_from_prometheus,
)
from verl_mtp.testing.vllm_engine import engine_environment_missing, run_child

pytestmark = [
    pytest.mark.engine,
    pytest.mark.skipif(bool(engine_environment_missing()),
                       reason="engine tests need vllm, megatron-core and mbridge (the engine environment)"),
]

K = 2  # draft tokens per step: MiMo's single MTP layer run twice
SERVED_NAME = 'tiny-mimo {dp="2"} \\ verl-mtp'  # label value with "}", quotes and a backslash
OFF_FROM = 4  # the batch-size rule's first batch size without drafting
BATCH_SIZES = (1, 3, 8)
MAX_TOKENS = 16
# Three steps of concurrent requests (prompt, max_tokens); varied lengths so counts differ.
STEPS = [
    [("The quick brown fox", 22), ("def main():", 17), ("1 2 3 4 5 6", 26), ("jumps over", 13),
     ("return x", 20), ("the brown dog", 15), ("while drafts", 24), ("Speculative", 18)],
    [("def main():", 11), ("The quick brown fox", 30), ("1 2 3", 8)],
    [("jumps over a lazy dog", 21)],
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("vllm_mimo_metrics"))
    proc = run_child("verl_mtp.testing.vllm_engine", "export", out, "--family", "mimo", timeout=600)
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def server_run(exported, tmp_path_factory):
    """Everything the server tests read: the settled /metrics text before and after each step,
    verl-mtp's scrape of it, each step's responses and the server log."""
    from verl_mtp.testing.vllm_server import VllmServer

    log = str(tmp_path_factory.mktemp("vllm_server") / "server.log")
    spec = {"method": "mtp", "num_speculative_tokens": K,
            # a data-parallel server drops this rule (checked below); turned on, it would stop
            # drafting at batch size 2
            "num_speculative_tokens_per_batch_size": vllm_batch_size_schedule(K, 2)}
    args = ["--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", "8", "--enforce-eager",
            "--seed", "0", "--data-parallel-size", "2", "--per-request-spec-decode-metrics", "summary",
            "--speculative-config", json.dumps(spec)]
    run = {"texts": [], "scrapes": [], "responses": []}
    with VllmServer(exported["matched"], args, log, served_model_name=SERVED_NAME) as server:
        run["texts"].append(server.settled_metrics_text())
        run["scrapes"].append(scrape_vllm_counters(server.address))
        for step in STEPS:
            run["responses"].append(server.complete_all(step))
            run["texts"].append(server.settled_metrics_text())
            run["scrapes"].append(scrape_vllm_counters(server.address))
        run["log"] = server.log_text()
    with open(os.path.join(os.path.dirname(log), "run.json"), "w") as f:  # for a failure's post-mortem
        json.dump({"texts": run["texts"], "responses": run["responses"]}, f)
    return run


def _request_counts(response):
    spec = (response.get("metrics") or {}).get("speculative_decoding")
    return request_counts_vllm(spec, completion_tokens=response["usage"]["completion_tokens"])


def test_real_server_counters_per_engine_and_position(server_run):
    """The parser reads the real text: two engines (data parallel), K positions, the served name
    unescaped; with the matched head every draft token is accepted at every position."""
    text = server_run["texts"][-1]
    spec_series = [(n, labels) for n, labels, _ in parse_prometheus_text(text) if n.startswith("vllm:spec_decode")]
    assert spec_series, "the server exposes no spec-decode counters"
    assert {labels["model_name"] for _, labels in spec_series} == {SERVED_NAME}
    assert {labels["engine"] for _, labels in spec_series} == {"0", "1"}
    assert {labels["position"] for n, labels in spec_series if "per_pos" in n} == {str(i) for i in range(K)}

    engines = vllm_counters_from_prometheus(text)
    assert set(engines) == {"0", "1"}
    for engine, c in engines.items():
        print(f"engine {engine}: {c}")
        assert c.num_drafts > 0, f"engine {engine} drafted nothing: the load balancer sent it no request"
        assert c.num_draft_tokens == K * c.num_drafts
        assert c.num_accepted_tokens == c.num_draft_tokens  # matched head, T = 0
        assert c.accepted_per_pos == (c.num_drafts,) * K
    assert total(engines.values()) == server_run["scrapes"][-1]  # scrape_vllm_counters sums the engines


def test_per_step_deltas_equal_the_requests_counts(server_run):
    """Each step's counter difference (summed over the two engines) is exactly what the server
    reported for that step's requests; the step's metrics follow from it."""
    tracker = CounterDeltaTracker()
    assert tracker.update({"r0": server_run["scrapes"][0]})["r0"].counts is None  # baseline
    per_engine = CounterDeltaTracker()
    per_engine.update(vllm_counters_from_prometheus(server_run["texts"][0]))
    for i, responses in enumerate(server_run["responses"]):
        deltas = tracker.update({"r0": server_run["scrapes"][i + 1]})
        counts, reporting, missing, resets = aggregate_replicas(deltas)
        requests = [_request_counts(r) for r in responses]
        assert all(r is not None for r in requests), "the server returned no per-request spec metrics"
        want = total(requests)
        print(f"step {i + 1}: {len(responses)} requests, delta {counts}")
        assert (reporting, missing, resets) == (1, 0, 0)
        assert counts == want
        engine_deltas = per_engine.update(vllm_counters_from_prometheus(server_run["texts"][i + 1]))
        assert total(d.counts for d in engine_deltas.values()) == counts

        stats = StepSpecStats(counts=counts, source=SOURCE_ENGINE_COUNTERS, replicas_reporting=1)
        m = stats.metrics()
        assert m["rollout/mtp_spec_num_drafts"] == want.num_drafts > 0
        assert m["rollout/mtp_spec_accept_rate"] == 1.0
        assert m["rollout/mtp_spec_accept_length"] == 1.0 + K
        assert [m[f"rollout/mtp_spec_accept_rate_pos{p + 1}"] for p in range(K)] == [1.0] * K


def test_step_deltas_add_up_to_the_engines_totals(server_run):
    first, last = server_run["scrapes"][0], server_run["scrapes"][-1]
    assert first == SpecCounts(0, 0, 0, (0,) * K, 0)  # a fresh server: all counters exist at 0
    tracker = CounterDeltaTracker()
    tracker.update({"r0": first})
    steps = [tracker.update({"r0": s})["r0"].counts for s in server_run["scrapes"][1:]]
    assert total(steps) == last
    assert last.generated_tokens == sum(r["usage"]["completion_tokens"] for rs in server_run["responses"] for r in rs)


def test_data_parallel_server_drops_the_batch_size_rule(server_run):
    """vLLM 0.32 turns ``num_speculative_tokens_per_batch_size`` off when data-parallel size > 1
    (ranks could pick different K); the server still drafted at every decode step of the
    8-request step, where the rule (K = 0 from batch size 2) would have stopped it."""
    assert "Dynamic speculative decoding is not supported with data parallelism" in server_run["log"]
    for response in server_run["responses"][0]:
        c = _request_counts(response)
        # every decode step after the prefill token drafted K tokens, all accepted
        assert c.num_drafts == -(-(c.generated_tokens - 1) // (K + 1))


@pytest.fixture(scope="module")
def batch_rule(exported, tmp_path_factory):
    result = str(tmp_path_factory.mktemp("batch_rule") / "result.json")
    run_child("verl_mtp.testing.vllm_server", "batch-rule", exported["random"], result,
              "--num-speculative-tokens", str(K), "--off-from", str(OFF_FROM),
              "--batch-sizes", ",".join(map(str, BATCH_SIZES)), "--max-tokens", str(MAX_TOKENS), timeout=600)
    with open(result) as f:
        return json.load(f)


def test_batch_size_rule_turns_drafting_off_for_large_batches(batch_rule):
    """Batches below the rule's threshold draft (random head: nothing accepted); a batch of 8
    adds no drafts; greedy output is the same either way."""
    assert batch_rule["rule"] == [list(r) for r in vllm_batch_size_schedule(K, OFF_FROM)]
    assert batch_rule["engine_rule"] == batch_rule["rule"]  # the engine kept it (one engine, no DP)
    tracker = CounterDeltaTracker()
    tracker.update(vllm_counters_from_prometheus(batch_rule["texts"][0]))
    for batch, text in zip(batch_rule["batches"], batch_rule["texts"][1:]):
        delta = tracker.update(vllm_counters_from_prometheus(text))["0"].counts
        size = batch["size"]
        print(f"batch {size}: {delta}")
        assert delta.generated_tokens == size * MAX_TOKENS
        assert delta == total(request_counts_vllm(spec, completion_tokens=len(ids))
                              for spec, ids in zip(batch["per_request"], batch["ids"]))
        if size < OFF_FROM:
            # every decode step drafts K tokens; the random head's are all rejected
            assert delta.num_drafts == size * (MAX_TOKENS - 1)
            assert delta.num_draft_tokens == K * delta.num_drafts
            assert delta.num_accepted_tokens == 0 and delta.accepted_per_pos == (0,) * K
        else:
            assert delta.num_drafts == delta.num_draft_tokens == 0
    for batch in batch_rule["batches"]:
        assert batch["ids"][0] == batch_rule["batches"][0]["ids"][0]  # same prompt, same greedy tokens
