"""accept-eval's acceptance by context length (``report.by_context``): drafted tokens bucketed by
their index in prompt+response, the mean and standard errors per bucket and draft position checked
against a plain-Python reference, a constructed collapse at long context, the real scoring's layout
through ``evaluate`` on a tiny megatron-core GPT, and the ``--context-buckets`` checks."""

from __future__ import annotations

import math
import random
import statistics

import pytest
import torch

from verl_mtp.tools.accept_eval.context import ContextAccumulator, context_summary
from verl_mtp.tools.accept_eval.options import (
    DEFAULT_CONTEXT_BUCKETS,
    AcceptEvalError,
    check_context_buckets,
    parse_context_buckets,
)
from verl_mtp.tools.accept_eval.report import render_report
from verl_mtp.tools.accept_eval.run import AcceptEvalReport, _Totals, evaluate
from verl_mtp.tools.accept_eval.samples import Sample
from verl_mtp.tools.accept_eval.scoring import SequenceScores, first_anchor

# --- a plain-Python reference --------------------------------------------------------------------


def _reference(sequences, edges, k):
    """{(bucket, j): (n, G, mean, se_iid, se_clustered)} by loops over every drafted token.

    ``sequences``: (prompt_len, length, values[anchor][j]) with anchors from the last prompt token;
    the anchor at index i drafts token i + j + 1 at position j (1-based), kept while inside the
    sequence.
    """
    cells = {}
    for seq_no, (prompt_len, length, values) in enumerate(sequences):
        for r, row in enumerate(values):
            anchor = prompt_len - 1 + r
            for j in range(1, k + 1):
                token = anchor + j + 1
                if token >= length:
                    continue
                bucket = max(b for b, e in enumerate(edges) if e <= token)
                cells.setdefault((bucket, j), {}).setdefault(seq_no, []).append(row[j - 1])
    out = {}
    for key, per_seq in cells.items():
        flat = [v for vs in per_seq.values() for v in vs]
        n, g, m = len(flat), len(per_seq), statistics.fmean(flat)
        iid = statistics.stdev(flat) / math.sqrt(n) if n > 1 else None
        clustered = None
        if g > 1:
            clustered = math.sqrt(g / (g - 1) * sum((sum(vs) - len(vs) * m) ** 2 for vs in per_seq.values())) / n
        out[key] = (n, g, m, iid, clustered)
    return out


def _scores(values, length, prompt_len, k):
    """SequenceScores of hand-built per-anchor values (valid where the drafted token exists)."""
    rows = len(values)
    anchor = torch.arange(rows).unsqueeze(1) + prompt_len - 1
    valid = anchor + torch.arange(1, k + 1) + 1 <= length - 1
    accept = torch.tensor(values, dtype=torch.float64)
    return SequenceScores(greedy=(accept > 0.5).double(), valid=valid, sampled={0.7: accept}, argmax_draft={0.7: accept * 0.5})


def _random_sequences(rng, k, specs):
    out = []
    for prompt_len, length in specs:
        rows = length - 2 - (prompt_len - 1)  # anchors prompt_len-1 .. length-3
        out.append((prompt_len, length, [[rng.random() for _ in range(k)] for _ in range(rows)]))
    return out


def test_bucket_means_and_errors_match_the_reference():
    rng, k, edges = random.Random(7), 3, (0, 8, 20, 21, 40, 64)
    sequences = _random_sequences(rng, k, [(5, 30), (1, 12), (18, 50), (9, 70), (30, 33), (3, 6)])
    acc = ContextAccumulator(edges, k)
    for prompt_len, length, values in sequences:
        acc.add(torch.tensor(values, dtype=torch.float64), _scores(values, length, prompt_len, k).valid,
                first_anchor(prompt_len))
    ref = _reference(sequences, edges, k)
    assert {b for b, _ in ref} == set(range(len(edges)))  # every bucket is used, [20, 21) included
    for b in range(len(edges)):
        for j in range(1, k + 1):
            stats = acc.stats(b, j - 1)
            n, g, m, iid, clustered = ref.get((b, j), (0, 0, None, None, None))
            assert (int(acc.n[b, j - 1]), int(acc.g[b, j - 1])) == (n, g), (b, j)
            if n == 0:
                assert stats == {"mean": None, "stderr": None, "stderr_iid": None, "stderr_clustered": None}
                continue
            assert stats["mean"] == pytest.approx(m, abs=1e-12)
            for name, want in (("stderr_iid", iid), ("stderr_clustered", clustered)):
                assert (stats[name] is None) == (want is None) and (want is None or stats[name] == pytest.approx(want, rel=1e-9))
            assert stats["stderr"] == pytest.approx(max(e for e in (iid, clustered) if e is not None), rel=1e-9)


def test_summary_keeps_every_rule_and_reports_empty_buckets_as_empty():
    k, edges = 2, (0, 4, 100, 1000)
    values = [[1.0, 0.2]] * 5  # prompt 4 tokens, length 10: anchors 3..7, drafted tokens 5..9
    scores = _scores(values, 10, 4, k)
    totals = _Totals(k, (0.7,), edges)
    totals.add(scores, 6, anchor0=first_anchor(4))
    summary = totals.context_report()
    assert summary["edges"] == [0, 4, 100, 1000]
    first, used, middle, last = summary["buckets"]
    assert (first["start"], first["end"], last["end"]) == (0, 4, None)
    for empty in (first, middle, last):
        assert empty["tokens"] == [0, 0] and empty["sequences"] == [0, 0]
        assert empty["greedy"][0]["mean"] is None and empty["sampled"]["0.7"][1]["mean"] is None
    assert used["tokens"] == [5, 4]  # position 1 drafts 5..9, position 2 drafts 6..9
    assert used["greedy"][0]["mean"] == 1.0 and used["greedy"][1]["mean"] == 0.0
    assert used["sampled"]["0.7"][1]["mean"] == pytest.approx(0.2)
    assert used["argmax_draft"]["0.7"][0]["mean"] == pytest.approx(0.5)
    # one sequence: no clustered error, the iid one (0 here: all values equal) is the error
    assert used["sampled"]["0.7"][0]["stderr_clustered"] is None and used["sampled"]["0.7"][0]["stderr"] == 0.0


# --- a collapse at long context, constructed ------------------------------------------------------


def _truth(t):
    """Acceptance of a token with t tokens of context: 0.935 up to 4k, 0.72 to 32k, 0 beyond."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return torch.where(t < 4096, 0.935, torch.where(t < 32768, 0.72, 0.0))


def _report_of(totals, k):
    """The report ``evaluate`` would build from these totals (no model behind the constructed scores)."""
    return AcceptEvalReport(
        checkpoint="constructed", data="constructed", family=None, device="cpu", dtype="float32", mtp_layers=1,
        num_speculative_tokens=k, layer_for_position=[0] * k, temperatures=[0.7], sequences=totals.sequences,
        skipped_short=0, response_tokens=totals.tokens, greedy=totals.greedy.summary(),
        sampled={"0.7": totals.sampled[0.7].summary()}, argmax_draft={"0.7": totals.argmax_draft[0.7].summary()},
        by_context=totals.context_report(),
    )


def test_acceptance_falling_with_context_shows_in_the_buckets():
    g, k = torch.Generator().manual_seed(0), 2
    totals = _Totals(k, (0.7,), DEFAULT_CONTEXT_BUCKETS)
    for prompt_len, length in [(20, 9000), (6000, 20000), (30000, 36000), (31000, 34000)]:
        rows = length - 1 - prompt_len
        token = first_anchor(prompt_len) + 1 + torch.arange(rows).unsqueeze(1) + torch.arange(1, k + 1)
        p = _truth(token)
        drawn = (torch.rand(p.shape, generator=g, dtype=torch.float64) < p).double()  # greedy: 0/1 draws
        valid = token <= length - 1
        totals.add(SequenceScores(greedy=drawn, valid=valid, sampled={0.7: p}, argmax_draft={0.7: p}),
                   length - prompt_len, anchor0=first_anchor(prompt_len))
    summary = totals.context_report()
    by_start = {b["start"]: b for b in summary["buckets"]}
    for start, bucket in by_start.items():
        for j in range(k):
            if start >= 65536:
                assert bucket["tokens"][j] == 0 and bucket["greedy"][j]["mean"] is None
                continue
            stats = bucket["greedy"][j]
            assert bucket["tokens"][j] > 100
            assert abs(stats["mean"] - float(_truth(start))) < 5 * stats["stderr"] + 1e-12, (start, j, stats)
            assert bucket["sampled"]["0.7"][j]["mean"] == pytest.approx(float(_truth(start)))  # exact: p itself
    for j in range(k):
        before, after = by_start[2048]["greedy"][j], by_start[4096]["greedy"][j]
        # the real drop is many errors wide; the flat neighbours differ by noise only
        assert before["mean"] - after["mean"] > 8 * math.hypot(before["stderr"], after["stderr"])
        flat_a, flat_b = by_start[8192]["greedy"][j], by_start[16384]["greedy"][j]
        assert abs(flat_a["mean"] - flat_b["mean"]) < 4 * math.hypot(flat_a["stderr"], flat_b["stderr"])
        assert by_start[32768]["greedy"][j]["mean"] == 0.0 and by_start[32768]["tokens"][j] > 0

    text = render_report(_report_of(totals, k))
    rows = {tuple(line.split()[:3]): line.split() for line in text.splitlines() if line.strip().startswith("[")}
    assert rows[("[2k,", "4k)", "1")][5] == f"{by_start[2048]['greedy'][0]['mean']:.3f}"
    # only the 9000-token sequence reaches [2k, 4k): its error is the iid one, marked
    assert rows[("[2k,", "4k)", "1")][4] == "1" and rows[("[2k,", "4k)", "1")][6].endswith("*")
    assert "* one sequence in the bucket" in text and not rows[("[4k,", "8k)", "1")][6].endswith("*")
    assert rows[("[32k,", "64k)", "2")][5:7] == ["0.000", "+-0.000"]  # tokens there, all rejected
    assert "no drafted tokens at context >= 64k (2 empty buckets not shown)" in text


def test_sequence_to_sequence_variation_widens_the_clustered_error():
    """Sequences with their own acceptance level: the iid error ignores it, the clustered one not."""
    g, k, rates = torch.Generator().manual_seed(1), 1, [0.2, 0.9, 0.5, 0.95, 0.1, 0.6]
    acc = ContextAccumulator((0,), k)
    for rate in rates:
        values = (torch.rand(400, k, generator=g, dtype=torch.float64) < rate).double()
        acc.add(values, torch.ones(400, k, dtype=torch.bool), 0)
    stats = acc.stats(0, 0)
    assert stats["stderr_clustered"] > 3 * stats["stderr_iid"] and stats["stderr"] == stats["stderr_clustered"]
    # the clustered error is of the order of the spread of the sequence means over sqrt(G)
    assert stats["stderr_clustered"] == pytest.approx(statistics.stdev(rates) / math.sqrt(len(rates)), rel=0.3)


# --- the real scoring layout through evaluate ----------------------------------------------------


@pytest.fixture(scope="module")
def model():
    from verl_mtp.local_megatron.tiny_gpt import TinyGPTSpec, build_tiny_gpt

    return build_tiny_gpt(TinyGPTSpec(mtp_num_layers=1, seed=11)).eval()


def test_evaluate_buckets_follow_the_scoring_layout(model):
    g = torch.Generator().manual_seed(4)
    shapes = [(6, 14), (2, 9), (25, 5)]  # (prompt, response) tokens
    samples = [Sample(torch.randint(0, 64, (p,), generator=g).tolist(), torch.randint(0, 64, (r,), generator=g).tolist(),
                      i + 1) for i, (p, r) in enumerate(shapes)]
    k = 3
    one_per_token = tuple(range(0, 40))  # a bucket for every index
    report = evaluate(model, samples, k_max=k, temperatures=(0.7,), per_anchor=True, context_buckets=one_per_token)
    buckets = report.by_context["buckets"]
    # scoring's own validity decides which tokens are drafted: position j drafts the response
    # tokens from index prompt + j on (the first response token comes from prefill)
    for j in range(1, k + 1):
        for t, bucket in enumerate(buckets):
            expected = sum(1 for p, r in shapes if p + j <= t < p + r)
            assert bucket["tokens"][j - 1] == expected, (t, j)
    # the means per token index are the per-anchor values moved to the token they draft
    per_anchor = [(e["first_anchor"], e, len(s.prompt_ids) + len(s.response_ids))
                  for e, s in zip(report.anchors, samples)]
    rules = [("greedy", lambda e: e["greedy"], lambda b: b["greedy"]),
             ("sampled", lambda e: e["sampled"]["0.7"], lambda b: b["sampled"]["0.7"]),
             ("argmax_draft", lambda e: e["argmax_draft"]["0.7"], lambda b: b["argmax_draft"]["0.7"])]
    for name, rows_of, stats_of in rules:
        ref = _reference([(a0 + 1, length, rows_of(e)) for a0, e, length in per_anchor], one_per_token, k)
        for (b, j), (n, _, m, _, _) in ref.items():
            assert stats_of(buckets[b])[j - 1]["mean"] == pytest.approx(m, abs=1e-12), (name, b, j)
            assert buckets[b]["tokens"][j - 1] == n
    # the token counts add up to the report's anchors per position
    for j in range(k):
        assert sum(b["tokens"][j] for b in buckets) == report.greedy["positions"][j]["anchors"]

    text = render_report(evaluate(model, samples, k_max=k, temperatures=(0.7,), context_buckets=(0, 2, 16, 32, 64)))
    table = text[text.index("acceptance by context length"):].splitlines()
    assert table[2].split()[:5] == ["[0,", "2)", "-", "0", "0"] and table[2].split()[5:] == ["empty"] * 3
    assert "no drafted tokens at context >= 32 (2 empty buckets not shown)" in text


def test_default_buckets_are_in_every_report(model):
    report = evaluate(model, [Sample([1, 2, 3], [4, 5, 6, 7], 1)], k_max=1, temperatures=(1.0,))
    assert report.by_context["edges"] == list(DEFAULT_CONTEXT_BUCKETS)
    assert report.by_context["buckets"][0]["tokens"] == [3] and report.by_context["buckets"][-1]["end"] is None
    assert report.as_dict()["by_context"]["buckets"][1]["greedy"][0]["mean"] is None


# --- --context-buckets -----------------------------------------------------------------------------


def test_parse_context_buckets():
    assert parse_context_buckets("0,1024,4k, 32K") == (0, 1024, 4096, 32768)
    assert parse_context_buckets("0") == (0,)
    assert DEFAULT_CONTEXT_BUCKETS == (0, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)


@pytest.mark.parametrize("text, message", [
    ("0,1024,512", "'0,1024,512': 512 follows 1024 (not increasing)"),
    ("0,256,256", "256 follows 256 (not increasing)"),
    ("1024,4096", "the first bucket starts at 1024, not 0"),
    ("0,abc", "'abc' is not a token count"),
    ("0,-5", "'-5' is not a token count"),
    ("0,1.5k", "'1.5k' is not a token count"),
    ("", "'' is not a token count"),
    ("0,,8", "'' is not a token count"),
])
def test_bad_context_buckets_name_the_flag_the_value_and_the_expectation(text, message):
    with pytest.raises(AcceptEvalError) as err:
        parse_context_buckets(text)
    assert str(err.value).startswith(f"--context-buckets {text!r}:") and message in str(err.value)
    assert "expected" in str(err.value) and "0," in str(err.value)  # what is expected, with an example


@pytest.mark.parametrize("edges, message", [
    ((), "expected increasing token counts starting at 0"),
    ((0, 8.0), "8.0 is not an integer >= 0"),
    ((0, True), "True is not an integer >= 0"),
    ("0,8", "expected increasing token counts"),
    ((0, 9, 3), "3 follows 9"),
])
def test_bad_edges_are_refused_before_anything_runs(edges, message):
    with pytest.raises(AcceptEvalError, match="--context-buckets") as err:
        check_context_buckets(edges)
    assert message in str(err.value)
    # evaluate checks them before it looks at the model (None here)
    with pytest.raises(AcceptEvalError, match=message.split(" ")[0]):
        evaluate(None, [], k_max=1, context_buckets=edges)


def test_cli_refuses_bad_buckets_before_loading(tmp_path, capsys):
    from verl_mtp.cli import main

    code = main(["accept-eval", str(tmp_path / "no_checkpoint"), str(tmp_path / "no.jsonl"), "--context-buckets", "0,9,3"])
    err = capsys.readouterr().err
    assert code == 2 and "--context-buckets '0,9,3': 3 follows 9 (not increasing)" in err
    assert "not a directory" not in err  # the flag is checked first
