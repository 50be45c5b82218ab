"""``accept-eval`` agrees with vLLM's real CPU engine on the same checkpoint and the same sequences.

A tiny MiMo checkpoint written by ``export_hf_weights`` carries a *mixed* MTP head whose greedy
acceptance is about 3/4 (see ``verl_mtp/testing/vllm_accept.py``). vLLM (one draft token,
``draft_sample_method`` greedy or probabilistic) generates from 16 prompts, one engine step at a
time: a request's new tokens per step are 1 + its accepted drafts, which gives the anchors the
engine drafted from. accept-eval (``run_accept_eval``, K = 1, T = 1, per-anchor values) scores the
engine's own sequences, and the engine's drafting is replayed over its per-anchor acceptances:

- T = 0 (greedy drafts): drafts, accepted drafts and every anchor's outcome are equal, exactly.
- T = 1: the engine's accepted count is within 4.5 standard errors (sum a(1-a) over the engine's
  drafts) of accept-eval's expectation with the rule of the engine's drafting: p(argmax q) for
  greedy drafts, sum min(p, q) for probabilistic ones; and the other rule is outside that bound
  (the check can tell the rules apart).
- The T = 1 output distribution with speculation is the target's, as without speculation: the
  share of the trunk's top token among sampled tokens matches the target's probabilities (z
  score, over all tokens and over the positions drafts were verified for); without the test's
  workaround for vLLM's CPU ``expand_batch_to_tokens`` bug the acceptance falls far below it.

Runs in the engine environment (see tests/engine/test_export_drafts.py); skipped elsewhere.
"""

from __future__ import annotations

import json
import os

import pytest

from verl_mtp.testing.vllm_engine import engine_environment_missing, run_child

pytestmark = [
    pytest.mark.engine,
    pytest.mark.skipif(bool(engine_environment_missing()),
                       reason="engine tests need vllm, megatron-core and mbridge (the engine environment)"),
]

CHILD = "verl_mtp.testing.vllm_accept"
# engine child -> (draft_sample_method, runs); a run is "T" or "T:unpatched" (no workaround)
ENGINES = {
    "greedy": ("greedy", ["0", "1", "1:unpatched"]),
    "probabilistic": ("probabilistic", ["1"]),
    "plain": ("none", ["1"]),
}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Export, the three engines and one accept-eval over every run's sequences, once."""
    from verl_mtp.testing import vllm_accept

    out = tmp_path_factory.mktemp("accept_engine")
    path = json.loads(run_child(CHILD, "export", str(out)).stdout.strip().splitlines()[-1])["mixed"]
    runs = {}
    for name, (draft, phases) in ENGINES.items():
        result = out / f"{name}.json"
        run_child(CHILD, "engine", path, str(result), "--draft", draft, *(a for p in phases for a in ("--run", p)))
        runs.update({(name, phase): r for phase, r in json.loads(result.read_text()).items()})
    sequences, order = out / "sequences.jsonl", list(runs)
    with open(sequences, "w") as f:
        for key in order:
            for req in runs[key]["requests"]:
                f.write(json.dumps({"prompt_ids": req["prompt_ids"], "response_ids": req["response_ids"]}) + "\n")
    scored = out / "scores.json"
    run_child(CHILD, "score", os.path.join(out, "mixed_megatron"), str(sequences), str(scored))
    scores = json.loads(scored.read_text())
    n = vllm_accept.NUM_PROMPTS
    for k, key in enumerate(order):
        runs[key]["anchors"] = scores["report"]["anchors"][k * n:(k + 1) * n]
        runs[key]["top_prob"] = scores["top_prob"][k * n:(k + 1) * n]
    with open(out / "construction.json") as f:
        succ = json.load(f)["successor"]
    return {"runs": runs, "report": scores["report"], "successor": succ}


def _compare(run, rule):
    from verl_mtp.testing.vllm_accept import replay, within

    rep = replay(run["requests"], run["anchors"], rule)
    ok, bound = within(run["counters"]["accepted_tokens"], rep)
    return rep, ok, bound


def _line(label, run, rule, rep, bound):
    c = run["counters"]
    print(f"{label}: engine {c['accepted_tokens']:.0f}/{c['draft_tokens']:.0f} = "
          f"{c['accepted_tokens'] / c['draft_tokens']:.4f}; accept-eval {rule} over the engine's drafts "
          f"{rep['expected']:.1f}/{rep['drafts']} = {rep['expected'] / rep['drafts']:.4f}; bound +-{bound:.1f}")


def test_t0_greedy_drafts_equal_accept_eval_exactly(work):
    run = work["runs"][("greedy", "0")]
    rep, _, bound = _compare(run, "greedy")
    _line("T=0", run, "greedy", rep, bound)
    overall = work["report"]["greedy"]["positions"][0]["marginal"]
    print(f"T=0: accept-eval greedy over all anchors of all sequences: {overall:.4f}")
    c = run["counters"]
    assert c["drafts"] == c["draft_tokens"] == rep["drafts"]
    assert 0.3 < c["accepted_tokens"] / c["draft_tokens"] < 0.95, "the head must be neither right nor wrong always"
    assert c["accepted_tokens"] == rep["expected"]
    outcomes = [(engine, estimate) for engine, estimate in rep["pairs"] if engine is not None]
    assert len(outcomes) == rep["drafts"] - len(run["requests"])  # every step but each request's last
    assert all(engine == estimate for engine, estimate in outcomes)
    from verl_mtp.testing.vllm_accept import replay

    for shift in (-1, 1):  # the per-anchor comparison sees an estimate one anchor off
        off = replay(run["requests"], run["anchors"], "greedy", shift=shift, strict=False)
        wrong = sum(engine != estimate for engine, estimate in off["pairs"] if engine is not None)
        print(f"T=0: accept-eval read {shift:+d} anchor off: {wrong} of {off['drafts']} outcomes differ")
        assert wrong > 0


@pytest.mark.parametrize("engine,rule,other", [("greedy", "argmax_draft/1", "sampled/1"),
                                               ("probabilistic", "sampled/1", "argmax_draft/1")])
def test_t1_acceptance_within_sampling_error(work, engine, rule, other):
    run = work["runs"][(engine, "1")]
    rep, ok, bound = _compare(run, rule)
    _line(f"T=1 {engine} drafts", run, rule, rep, bound)
    wrong, wrong_ok, wrong_bound = _compare(run, other)
    _line(f"T=1 {engine} drafts (the other rule)", run, other, wrong, wrong_bound)
    assert run["counters"]["drafts"] == rep["drafts"]
    assert ok, f"engine accepted {run['counters']['accepted_tokens']}, accept-eval expects {rep['expected']:.1f} +- {bound:.1f}"
    assert not wrong_ok, "the bound is too loose to tell the two drafting rules apart"


def test_t1_output_distribution_with_speculation_matches_without(work):
    from verl_mtp.testing.vllm_accept import SIGMAS, top_token_test

    stats = []
    for key in [("plain", "1"), ("greedy", "1"), ("probabilistic", "1")]:
        run = work["runs"][key]
        for drafted_only in (False, True) if key[0] != "plain" else (False,):
            s = top_token_test(run["requests"], run["top_prob"], work["successor"], drafted_only=drafted_only)
            where = "at drafted positions" if drafted_only else "all tokens"
            print(f"T=1 {key[0]}, {where}: top token {s['hits']}/{s['tokens']}, target expects "
                  f"{s['expected']:.1f}, z {s['z']:+.2f}")
            stats.append(s)
    assert all(abs(s["z"]) <= SIGMAS for s in stats)


def test_without_the_cpu_workaround_speculative_sampling_is_wrong(work):
    """vLLM 0.32's CPU expand_batch_to_tokens bug, caught by the acceptance check (this documents
    why the workaround exists: it fails once vLLM's fallback is fixed, and the workaround can go).
    The bug divides by uninitialised memory, so how far the output distribution moves varies from
    run to run (|z| 4.6 to 18 measured); the acceptance falls far in every run, and is asserted."""
    from verl_mtp.testing.vllm_accept import top_token_test

    run = work["runs"][("greedy", "1:unpatched")]
    rep, ok, bound = _compare(run, "argmax_draft/1")
    _line("T=1 greedy drafts, no workaround", run, "argmax_draft/1", rep, bound)
    s = top_token_test(run["requests"], run["top_prob"], work["successor"], drafted_only=True)
    print(f"T=1 greedy, no workaround, at drafted positions: top token {s['hits']}/{s['tokens']}, "
          f"expected {s['expected']:.1f}, z {s['z']:+.2f}")
    assert not ok and run["counters"]["accepted_tokens"] < rep["expected"] - bound


def test_torch_expand_batch_to_tokens():
    import torch

    from verl_mtp.testing.vllm_accept import _expand_batch_to_tokens

    x = torch.tensor([0.5, -1.0, 2.0])
    got = _expand_batch_to_tokens(x, torch.tensor([2, 5, 6], dtype=torch.int32), 6, replace_from=-1, replace_to=1)
    assert got.tolist() == [0.5, 0.5, 1.0, 1.0, 1.0, 2.0] and got.dtype == x.dtype
