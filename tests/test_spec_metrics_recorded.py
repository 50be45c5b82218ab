"""verl-mtp's /metrics parser on text recorded from vLLM 0.32.0's real OpenAI server (CPU engine).

Recorded by tests/engine/test_server_metrics_engine.py (data-parallel size 2, MiMo with its one
MTP layer run for 2 draft tokens, matched head, a served model name with "}", quotes and a
backslash), cut to the spec-decode and generation families plus one gauge. The engine leg checks
the same parsing live; this keeps the verl legs honest about the real text's shape.
"""

from __future__ import annotations

from verl_mtp.rollout.spec_metrics import (
    SpecCounts,
    parse_prometheus_text,
    request_counts_vllm,
    total,
    vllm_counters_from_prometheus,
)

NAME = r'tiny-mimo {dp=\"2\"} \\ verl-mtp'
RECORDED = "\n".join(line.replace("NAME", NAME) for line in r'''
# HELP vllm:spec_decode_num_drafts_total Number of spec decoding drafts.
# TYPE vllm:spec_decode_num_drafts_total counter
vllm:spec_decode_num_drafts_total{engine="0",model_name="NAME"} 33.0
vllm:spec_decode_num_drafts_total{engine="1",model_name="NAME"} 43.0
# HELP vllm:spec_decode_num_drafts_created Number of spec decoding drafts.
# TYPE vllm:spec_decode_num_drafts_created gauge
vllm:spec_decode_num_drafts_created{engine="0",model_name="NAME"} 1.7961556359880996e+09
vllm:spec_decode_num_drafts_created{engine="1",model_name="NAME"} 1.796155635988158e+09
# HELP vllm:spec_decode_num_draft_tokens_total Number of draft tokens.
# TYPE vllm:spec_decode_num_draft_tokens_total counter
vllm:spec_decode_num_draft_tokens_total{engine="0",model_name="NAME"} 66.0
vllm:spec_decode_num_draft_tokens_total{engine="1",model_name="NAME"} 86.0
# HELP vllm:spec_decode_num_accepted_tokens_total Number of accepted tokens.
# TYPE vllm:spec_decode_num_accepted_tokens_total counter
vllm:spec_decode_num_accepted_tokens_total{engine="0",model_name="NAME"} 66.0
vllm:spec_decode_num_accepted_tokens_total{engine="1",model_name="NAME"} 86.0
# HELP vllm:spec_decode_num_accepted_tokens_per_pos_total Accepted tokens per draft position.
# TYPE vllm:spec_decode_num_accepted_tokens_per_pos_total counter
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="NAME",position="0"} 33.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="NAME",position="1"} 33.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="1",model_name="NAME",position="0"} 43.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="1",model_name="NAME",position="1"} 43.0
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="NAME"} 0.0
vllm:num_requests_running{engine="1",model_name="NAME"} 0.0
# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="NAME"} 98.0
vllm:generation_tokens_total{engine="1",model_name="NAME"} 127.0
'''.splitlines())

# One request's ``response["metrics"]["speculative_decoding"]`` from the same server (21 tokens).
RECORDED_REQUEST = {"mean_acceptance_length": 3.0, "draft_acceptance_rate": 1.0, "acceptance_histogram": [0, 0, 7],
                    "num_spec_steps": 7, "num_accepted_draft_tokens": 14, "num_draft_tokens": 14,
                    "num_spec_tokens": 2, "per_step_accepted": None, "per_step_drafted": None}


def test_recorded_server_text_labels_are_unescaped():
    samples = parse_prometheus_text(RECORDED)
    lines = [line for line in RECORDED.splitlines() if line and not line.startswith("#")]
    assert len(samples) == len(lines) == 16  # every sample line, the served name's "}" notwithstanding
    assert {labels["model_name"] for _, labels, _ in samples} == {'tiny-mimo {dp="2"} \\ verl-mtp'}


def test_recorded_server_counters_per_engine_and_position():
    engines = vllm_counters_from_prometheus(RECORDED)
    assert engines == {"0": SpecCounts(33, 66, 66, (33, 33), 98), "1": SpecCounts(43, 86, 86, (43, 43), 127)}
    assert total(engines.values()) == SpecCounts(76, 152, 152, (76, 76), 225)


def test_recorded_per_request_metrics():
    assert request_counts_vllm(RECORDED_REQUEST, completion_tokens=21) == SpecCounts(7, 14, 14, (7, 7), 21)
    # histogram [5, 2, 3]: position 0 accepted in 2 + 3 steps, position 1 in 3
    partial = dict(RECORDED_REQUEST, acceptance_histogram=[5, 2, 3], num_spec_steps=10,
                   num_accepted_draft_tokens=8, num_draft_tokens=20)
    assert request_counts_vllm(partial) == SpecCounts(10, 20, 8, (5, 3))
    assert request_counts_vllm(None) is None
