"""``evaluate(..., per_anchor=True)``: every anchor's acceptances, consistent with the report's means
and with ``score_sequence`` (the engine test replays vLLM's drafting over these values)."""

from __future__ import annotations

import pytest
import torch

from verl_mtp.tools.accept_eval.run import evaluate
from verl_mtp.tools.accept_eval.samples import Sample
from verl_mtp.tools.accept_eval.scoring import score_sequence


@pytest.fixture(scope="module")
def model():
    from verl_mtp.local_megatron.tiny_gpt import TinyGPTSpec, build_tiny_gpt

    return build_tiny_gpt(TinyGPTSpec(mtp_num_layers=1, seed=5)).eval()


def _samples():
    g = torch.Generator().manual_seed(3)
    return [Sample(torch.randint(0, 64, (p,), generator=g).tolist(), torch.randint(0, 64, (r,), generator=g).tolist(), i + 1)
            for i, (p, r) in enumerate([(4, 9), (3, 1), (5, 12)])]  # the 1-token response is skipped


def test_per_anchor_rows_are_the_anchors_and_average_to_the_report(model):
    samples = _samples()
    report = evaluate(model, samples, k_max=2, temperatures=(0.7,), per_anchor=True)
    assert [a["line"] for a in report.anchors] == [1, 3]
    for entry, sample in zip(report.anchors, [samples[0], samples[2]]):
        scores = score_sequence(model, sample.prompt_ids, sample.response_ids, k_max=2, temperatures=[0.7])
        assert entry["first_anchor"] == len(sample.prompt_ids) - 1
        assert len(entry["greedy"]) == len(sample.prompt_ids) + len(sample.response_ids) - 2 - entry["first_anchor"]
        assert entry["greedy"] == scores.greedy.tolist() and entry["valid"] == scores.valid.tolist()
        assert entry["sampled"]["0.7"] == scores.sampled[0.7].tolist()
        assert entry["argmax_draft"]["0.7"] == scores.argmax_draft[0.7].tolist()
    for rule, summary in [("greedy", report.greedy), ("sampled", report.sampled["0.7"]),
                          ("argmax_draft", report.argmax_draft["0.7"])]:
        for j in range(2):
            values = [row[j] for e in report.anchors for row, ok in zip(e[rule] if rule == "greedy" else e[rule]["0.7"],
                                                                        e["valid"]) if ok[j]]
            assert len(values) == summary["positions"][j]["anchors"]
            assert sum(values) / len(values) == pytest.approx(summary["positions"][j]["marginal"], abs=1e-12)


def test_per_anchor_is_off_by_default(model):
    assert evaluate(model, _samples()[:1], k_max=1, temperatures=(1.0,)).anchors is None
