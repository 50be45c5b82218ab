"""Per-step speculative-decoding metrics (verl_mtp.rollout.spec_metrics / spec_control).

No inference engine can run here (no GPU), so engine stats are *recorded shapes*:

* vLLM 0.24.0 (the version verl 0.9.1 pins): the Prometheus text a server's ``/metrics`` returns,
  produced with the real ``prometheus_client`` using vLLM's counter names and labels
  (``vllm:spec_decode_num_drafts`` / ``_num_draft_tokens`` / ``_num_accepted_tokens`` with labels
  ``model_name, engine``; ``vllm:spec_decode_num_accepted_tokens_per_pos`` with an extra
  ``position`` label; ``vllm:generation_tokens``), as in ``vllm/v1/spec_decode/metrics.py`` and
  ``vllm/v1/metrics/loggers.py`` at 0.24.0.
* verl 0.9.1's per-request extra fields (``spec_num_draft_tokens``, ``spec_num_accepted_tokens``,
  ``spec_num_verify_steps``), which its vLLM server fills from ``request_spec_decode_stats``.
* SGLang 0.5.12 per-request ``meta_info`` (``spec_verify_ct``, ``spec_num_proposed_drafts``,
  ``spec_num_correct_drafts``, ``spec_correct_drafts_histogram``, ``completion_tokens``; no spec
  keys at all for a request without a verify step), as written by
  ``TokenizerManager._calculate_spec_decoding_metrics`` at 0.5.12.

Every expected number is a hand sum over the recorded stats.
"""

from __future__ import annotations

import http.server
import logging
import threading

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry, Counter, generate_latest

from verl_mtp.config import ExtendedMtpConfig
from verl_mtp.rollout import spec_control
from verl_mtp.rollout.spec_control import SpecStepMonitor, SpeculationController, scrape_vllm_counters
from verl_mtp.rollout.spec_metrics import (
    CounterDeltaTracker,
    SpecCounts,
    StepSpecStats,
    aggregate_replicas,
    aggregate_requests,
    parse_prometheus_text,
    request_counts_sglang,
    request_counts_verl,
    vllm_counters_from_prometheus,
)


class FakeVllmServer:
    """The counters of one vLLM 0.24.0 API server (one or more engines), in a real prometheus registry.

    A fake only because the engine itself cannot run here; the exposition text is real."""

    def __init__(self, engines=(0,), k=3, model="m"):
        self.registry = CollectorRegistry()
        labels = ["model_name", "engine"]
        self.drafts = Counter("vllm:spec_decode_num_drafts", "d", labels, registry=self.registry)
        self.draft_tokens = Counter("vllm:spec_decode_num_draft_tokens", "d", labels, registry=self.registry)
        self.accepted = Counter("vllm:spec_decode_num_accepted_tokens", "d", labels, registry=self.registry)
        self.per_pos = Counter(
            "vllm:spec_decode_num_accepted_tokens_per_pos", "d", labels + ["position"], registry=self.registry
        )
        self.generated = Counter("vllm:generation_tokens", "d", labels, registry=self.registry)
        self.engines, self.k, self.model = engines, k, model
        for engine in engines:  # vLLM creates every engine's labelled counters at start (value 0)
            lv = (model, str(engine))
            for counter in (self.drafts, self.draft_tokens, self.accepted, self.generated):
                counter.labels(*lv)
            for pos in range(k):
                self.per_pos.labels(*lv, str(pos))

    def observe(self, engine, drafts, accepted_per_draft):
        """``drafts`` verify steps of k draft tokens; accepted_per_draft[j] drafts accepted j+1 tokens."""
        lv = (self.model, str(engine))
        accepted = sum((j + 1) * n for j, n in enumerate(accepted_per_draft))
        self.drafts.labels(*lv).inc(drafts)
        self.draft_tokens.labels(*lv).inc(drafts * self.k)
        self.accepted.labels(*lv).inc(accepted)
        for pos in range(self.k):
            self.per_pos.labels(*lv, str(pos)).inc(sum(accepted_per_draft[pos:]))
        self.generated.labels(*lv).inc(drafts + accepted)

    def text(self):
        return generate_latest(self.registry).decode()


def test_prometheus_text_parses_labels_and_skips_comments():
    server = FakeVllmServer(k=2)
    server.observe(0, drafts=10, accepted_per_draft=[3, 2])
    samples = parse_prometheus_text(server.text())
    names = {name for name, _, _ in samples}
    assert "vllm:spec_decode_num_drafts_total" in names
    by_pos = {labels["position"]: v for name, labels, v in samples if name.endswith("per_pos_total")}
    assert by_pos == {"0": 5.0, "1": 2.0}


def test_vllm_counters_per_engine_from_a_real_exposition():
    server = FakeVllmServer(engines=(0, 1), k=3)
    server.observe(0, drafts=10, accepted_per_draft=[4, 2, 1])  # accepted = 4 + 4 + 3 = 11
    server.observe(1, drafts=5, accepted_per_draft=[1, 1, 0])  # accepted = 1 + 2 = 3
    counters = vllm_counters_from_prometheus(server.text())
    assert counters["0"] == SpecCounts(10, 30, 11, (7, 3, 1), generated_tokens=21)
    assert counters["1"] == SpecCounts(5, 15, 3, (2, 1, 0), generated_tokens=8)


def test_no_spec_counters_means_no_stats():
    registry = CollectorRegistry()
    Counter("vllm:generation_tokens", "d", ["model_name", "engine"], registry=registry).labels("m", "0").inc(7)
    assert vllm_counters_from_prometheus(generate_latest(registry).decode()) == {}


def test_delta_tracker_several_replicas_missing_replica_and_reset():
    tracker = CounterDeltaTracker()
    base = {"a": SpecCounts(10, 30, 12, (8, 3, 1), 40), "b": SpecCounts(0, 0, 0, (0, 0, 0), 0)}
    first = tracker.update(base)
    assert all(d.counts is None for d in first.values())  # first sight only sets the baseline

    step1 = tracker.update({
        "a": SpecCounts(20, 60, 30, (16, 9, 5), 90),
        "b": SpecCounts(4, 12, 2, (2, 0, 0), 10),
        "c": SpecCounts(7, 21, 7, (5, 2, 0), 20),  # new replica: no baseline yet
    })
    assert step1["a"].counts == SpecCounts(10, 30, 18, (8, 6, 4), 50)
    assert step1["b"].counts == SpecCounts(4, 12, 2, (2, 0, 0), 10)
    assert step1["c"].counts is None
    total, reporting, missing, resets = aggregate_replicas(step1)
    assert total == SpecCounts(14, 42, 20, (10, 6, 4), 60)
    assert (reporting, missing, resets) == (2, 1, 0)

    step2 = tracker.update({
        "a": SpecCounts(3, 9, 4, (3, 1, 0), 12),  # engine restarted: counters went down
        "b": None,  # replica reported nothing
        "c": SpecCounts(9, 27, 8, (6, 2, 0), 26),
    })
    assert step2["a"].reset and step2["a"].counts == SpecCounts(3, 9, 4, (3, 1, 0), 12)
    assert step2["b"].counts is None
    assert step2["c"].counts == SpecCounts(2, 6, 1, (1, 0, 0), 6)
    total, reporting, missing, resets = aggregate_replicas(step2)
    assert total == SpecCounts(5, 15, 5, (4, 1, 0), 18)
    assert (reporting, missing, resets) == (2, 1, 1)

    # after the reset the restarted counters are the new baseline
    step3 = tracker.update({"a": SpecCounts(5, 15, 6, (4, 2, 0), 20)})
    assert step3["a"].counts == SpecCounts(2, 6, 2, (1, 1, 0), 8) and not step3["a"].reset


def test_token_weighted_aggregation_differs_from_verls_per_request_mean():
    from verl.trainer.ppo.ray_trainer import compute_spec_decode_metrics

    # verl 0.9.1 extra fields of three requests; the third had no drafts (a one-token answer).
    extras = [
        {"spec_num_draft_tokens": 300, "spec_num_accepted_tokens": 240, "spec_num_verify_steps": 100},
        {"spec_num_draft_tokens": 6, "spec_num_accepted_tokens": 0, "spec_num_verify_steps": 2},
        {"spec_num_draft_tokens": 0, "spec_num_accepted_tokens": 0, "spec_num_verify_steps": 0},
        {},  # a request without spec fields
    ]
    counts, missing = aggregate_requests(request_counts_verl(e) for e in extras)
    assert missing == 1
    assert counts == SpecCounts(102, 306, 240)
    stats = StepSpecStats(counts=counts, source="requests")
    assert stats.accept_rate == pytest.approx(240 / 306)
    assert stats.accept_length == pytest.approx(1 + 240 / 102)

    verl = compute_spec_decode_metrics(*(np.array([e[k] for e in extras[:3]]) for k in (
        "spec_num_draft_tokens", "spec_num_accepted_tokens", "spec_num_verify_steps")))
    assert verl["rollout/spec_accept_rate"] == pytest.approx((0.8 + 0 + 0) / 3)  # each request counts once
    assert verl["rollout/spec_accept_rate"] != pytest.approx(stats.accept_rate)


def test_sglang_meta_info_shapes():
    with_spec = {
        "completion_tokens": 40, "spec_verify_ct": 10, "spec_num_proposed_drafts": 30,
        "spec_num_correct_drafts": 20, "spec_accept_rate": 20 / 30, "spec_accept_length": 4.0,
        # verify steps that accepted exactly 0, 1, 2, 3 drafts
        "spec_correct_drafts_histogram": [1, 2, 3, 4],
    }
    c = request_counts_sglang(with_spec)
    assert c == SpecCounts(10, 30, 20, (9, 7, 4), 40)  # pos1: 2+3+4, pos2: 3+4, pos3: 4
    assert sum(c.accepted_per_pos) == c.num_accepted_tokens

    no_verify = {"completion_tokens": 1}  # SGLang writes no spec keys for such a request
    assert request_counts_sglang(no_verify) == SpecCounts(generated_tokens=1)

    old_alias = {"completion_tokens": 8, "spec_verify_ct": 2, "spec_proposed_drafts": 6, "spec_accepted_drafts": 4}
    assert request_counts_sglang(old_alias) == SpecCounts(2, 6, 4, (), 8)

    total, _ = aggregate_requests([request_counts_sglang(m) for m in (with_spec, no_verify, old_alias)])
    assert total == SpecCounts(12, 36, 24, (9, 7, 4), 49)


def test_step_metrics_names_and_per_position():
    stats = StepSpecStats(
        counts=SpecCounts(14, 42, 20, (10, 6, 4), 60), source="engine_counters",
        replicas_reporting=2, replicas_without_stats=1, generated_tokens=600, gen_seconds=4.0,
        num_requests=64, num_replicas=2,
    )
    m = stats.metrics()
    assert m["rollout/mtp_spec_stats_available"] == 1.0
    assert m["rollout/mtp_spec_accept_rate"] == pytest.approx(20 / 42)
    assert m["rollout/mtp_spec_accept_length"] == pytest.approx(1 + 20 / 14)
    assert [m[f"rollout/mtp_spec_accept_rate_pos{i}"] for i in (1, 2, 3)] == pytest.approx([10 / 14, 6 / 14, 4 / 14])
    assert m["rollout/mtp_gen_throughput"] == pytest.approx(150.0)
    assert m["rollout/mtp_requests_per_replica"] == 32.0
    assert m["rollout/mtp_spec_replicas_without_stats"] == 1.0


def _monitor(engine="vllm", **mtp_kwargs):
    mtp = ExtendedMtpConfig(enable=True, enable_rollout=True, **mtp_kwargs)
    return SpecStepMonitor(mtp, engine=engine, controller=SpeculationController())


def test_monitor_engine_counters_over_steps():
    servers = {"r0": FakeVllmServer(engines=(0, 1)), "r1": FakeVllmServer(), "r2": None}
    monitor = _monitor()
    monitor.read_counters = lambda addr: scrape_text(servers[addr])
    servers["r0"].observe(0, 3, [1, 0, 0])  # before the run: must not count
    monitor.register_servers(["r0", "r1", "r2"])

    servers["r0"].observe(0, 10, [4, 2, 1])
    servers["r0"].observe(1, 5, [1, 1, 0])
    servers["r1"].observe(0, 20, [10, 5, 0])
    monitor.record_generation(generated_tokens=500, gen_seconds=2.0, num_requests=30)
    m = monitor.finish_step(per_request=None)
    drafts, draft_tokens, accepted = 35, 105, 11 + 3 + 20
    assert m["rollout/mtp_spec_stats_source"] == 2.0
    assert m["rollout/mtp_spec_num_drafts"] == drafts
    assert m["rollout/mtp_spec_draft_tokens"] == draft_tokens
    assert m["rollout/mtp_spec_accepted_tokens"] == accepted
    assert m["rollout/mtp_spec_accept_rate"] == pytest.approx(accepted / draft_tokens)
    assert m["rollout/mtp_spec_accept_rate_pos1"] == pytest.approx((7 + 2 + 15) / drafts)
    assert m["rollout/mtp_spec_replicas_reporting"] == 2 and m["rollout/mtp_spec_replicas_without_stats"] == 1
    assert m["rollout/mtp_gen_throughput"] == pytest.approx(250.0)
    assert m["rollout/mtp_requests_per_replica"] == 10.0
    assert m["rollout/mtp_spec_enabled"] == 1.0 and m["rollout/mtp_spec_actuated"] == 0.0

    servers["r1"].observe(0, 4, [0, 0, 0])  # step 2: only r1 drafted, nothing accepted
    m2 = monitor.finish_step(per_request=None)
    assert m2["rollout/mtp_spec_num_drafts"] == 4 and m2["rollout/mtp_spec_accept_rate"] == 0.0
    assert "rollout/mtp_gen_throughput" not in m2  # no generation recorded for this step


def scrape_text(server):
    if server is None:
        return None
    engines = vllm_counters_from_prometheus(server.text())
    total = SpecCounts()
    for c in engines.values():
        total = total + c
    return total if engines else None


def test_monitor_falls_back_to_requests_then_reports_missing_stats_once(caplog):
    monitor = _monitor()
    monitor.read_counters = lambda addr: None  # disable_log_stats=True: no counters
    monitor.register_servers(["r0"])
    m = monitor.finish_step([SpecCounts(4, 12, 6), SpecCounts(0, 0, 0)])
    assert m["rollout/mtp_spec_stats_source"] == 1.0
    assert m["rollout/mtp_spec_accept_rate"] == pytest.approx(0.5)

    with caplog.at_level(logging.WARNING):
        m1 = monitor.finish_step(None)
        m2 = monitor.finish_step(None)
    assert m1["rollout/mtp_spec_stats_available"] == 0.0 and m2["rollout/mtp_spec_stats_available"] == 0.0
    assert "rollout/mtp_spec_accept_rate" not in m1
    warnings = [r for r in caplog.records if "no speculative-decoding stats" in r.getMessage()]
    assert len(warnings) == 1 and "disable_log_stats=False" in warnings[0].getMessage()


def test_sglang_monitor_ignores_verls_placeholder_fields(caplog):
    """verl 0.9.1 + SGLang 0.5.12 writes a constant draft count and zero accepts; they are not stats."""
    monitor = _monitor(engine="sglang")
    monitor.register_servers(["r0"])
    with caplog.at_level(logging.WARNING):
        m = monitor.finish_step([SpecCounts(7, 4, 0), SpecCounts(9, 4, 0)])
    assert m["rollout/mtp_spec_stats_available"] == 0.0
    assert any("spec_accept_token_num" in r.getMessage() for r in caplog.records)


class _MetricsHandler(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self):  # noqa: N802
        if self.path != "/metrics":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


def test_scrape_over_http_and_unreachable_replica():
    server = FakeVllmServer(engines=(0, 1))
    server.observe(0, 10, [4, 2, 1])
    server.observe(1, 5, [1, 1, 0])
    _MetricsHandler.body = server.text().encode()
    httpd = http.server.HTTPServer(("127.0.0.1", 0), _MetricsHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        counts = scrape_vllm_counters(f"127.0.0.1:{httpd.server_port}")
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert counts == SpecCounts(15, 45, 14, (9, 4, 1), generated_tokens=29)
    assert scrape_vllm_counters(f"127.0.0.1:{httpd.server_port}", timeout=0.5) is None


def test_patch_wraps_verls_metric_functions_and_registers_servers():
    from omegaconf import OmegaConf

    import verl.trainer.ppo.ray_trainer as ray_trainer
    import verl.workers.rollout.llm_server as llm_server
    from verl import DataProto
    from verl_mtp.patches.catalog import SPEC_STEP_METRICS

    assert SPEC_STEP_METRICS.applied
    assert ray_trainer.compute_spec_decode_metrics.__verl_mtp_original__.__module__ == "verl.trainer.ppo.ray_trainer"
    assert hasattr(llm_server.LLMServerManager._init_global_load_balancer, "__verl_mtp_original__")

    config = OmegaConf.create({"actor_rollout_ref": {
        "model": {"mtp": {"enable": True, "enable_rollout": True}}, "rollout": {"name": "vllm"}}})
    manager = type("Manager", (), {"config": config, "server_addresses": ["r0", "r1"]})()
    spec_control.set_monitor(None)
    try:
        monitor = spec_control.register_server_manager(manager)
        assert monitor is spec_control.get_monitor() and monitor.addresses == ["r0", "r1"]
        monitor.read_counters = lambda addr: None

        response_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
        batch = DataProto.from_dict(tensors={
            "responses": torch.zeros(2, 4, dtype=torch.long), "response_mask": response_mask,
            "attention_mask": torch.cat([torch.ones(2, 3, dtype=torch.long), response_mask], dim=1),
        }, meta_info={"global_token_num": [6, 5]})
        ray_trainer.compute_throughout_metrics(batch=batch, timing_raw={"gen": 0.5, "step": 1.0}, n_gpus=1)
        out = ray_trainer.compute_spec_decode_metrics(np.array([9, 3]), np.array([6, 0]), np.array([3, 1]))
        assert out["rollout/spec_accept_rate"] == pytest.approx((6 / 9 + 0) / 2)  # verl's own metric kept
        assert out["rollout/mtp_spec_accept_rate"] == pytest.approx(6 / 12)
        assert out["rollout/mtp_gen_tokens"] == 5 and out["rollout/mtp_gen_throughput"] == pytest.approx(10.0)
        assert out["rollout/mtp_spec_enabled"] == 1.0
    finally:
        spec_control.set_monitor(None)

    SPEC_STEP_METRICS.undo()
    try:
        assert not hasattr(ray_trainer.compute_spec_decode_metrics, "__verl_mtp_original__")
        assert not hasattr(llm_server.LLMServerManager._init_global_load_balancer, "__verl_mtp_original__")
    finally:
        SPEC_STEP_METRICS.apply()
    assert hasattr(ray_trainer.compute_spec_decode_metrics, "__verl_mtp_original__")


def test_no_monitor_without_speculative_rollout():
    from omegaconf import OmegaConf

    config = OmegaConf.create({"actor_rollout_ref": {"model": {"mtp": {"enable": False}}, "rollout": {"name": "vllm"}}})
    manager = type("Manager", (), {"config": config, "server_addresses": ["r0"]})()
    spec_control.set_monitor(None)
    assert spec_control.register_server_manager(manager) is None and spec_control.get_monitor() is None
