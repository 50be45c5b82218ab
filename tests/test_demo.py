"""`verl-mtp demo` on a very small budget: outputs, finiteness, and what each regime may touch.

Real parts as in the demo: a megatron-core GPT with an MTP head, verl's GRPO advantages, verl's
train_batch / engine forward / actor loss with verl-mtp's patches (CpuStandInEngine replaces the
CUDA-only engine parts). Sampling is a plain loop: there is no inference engine on CPU.
"""

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from verl_mtp.tools.demo import DemoOptions, run_demo

pytestmark = pytest.mark.megatron
REGIMES = (
    "none", "disabled", "standalone", "joint", "rl", "rl_occ", "standalone_kl", "standalone_tv", "decoupled_occ_tv",
)
HEAD_METRICS = ("mtp_ce", "draft_agreement", "accept_greedy", "accept_probabilistic")
RL_TERM = ("rl", "rl_occ", "decoupled_occ_tv")  # regimes whose MTP term is the policy loss
STEPS = 2


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    lines = []
    options = DemoOptions(
        steps=STEPS, regimes=REGIMES, warmup_steps=3, prompts_per_step=4, samples_per_prompt=2,
        micro_batch_size=4, out_dir=str(out), progress=lines.append,
    )
    return {**run_demo(options), "progress": lines, "options": options}


def _records(demo):
    with open(demo["metrics"]) as f:
        return [json.loads(line) for line in f]


def test_metrics_for_every_regime_are_finite(demo):
    records = _records(demo)
    assert [(r["regime"], r["step"]) for r in records] == [(g, s) for g in REGIMES for s in range(1, STEPS + 1)]
    for r in records:
        numbers = {k: v for k, v in r.items() if k not in ("regime", "step") and v is not None}
        assert all(math.isfinite(v) for v in numbers.values()), r
        assert 0.0 <= r["reward"] <= 1.0
        has_head = r["regime"] != "none"
        assert all((r[key] is not None) == has_head for key in HEAD_METRICS), r
        if has_head:
            assert all(0.0 <= r[key] <= 1.0 for key in ("draft_agreement", "accept_greedy", "accept_probabilistic"))
        assert (r["mtp_pg_loss"] is not None) == (r["regime"] in RL_TERM)
    coef = {r["regime"]: r["coef"] for r in records}
    assert coef["disabled"] == 0.0
    assert all(coef[g] == 0.1 for g in ("standalone", "joint", "rl", "standalone_kl", "standalone_tv"))
    # Same weights, prompts and sampling seeds: every regime's first step sees the same rollouts.
    first = {r["regime"]: r for r in records if r["step"] == 1}
    assert len({round(r["reward"], 9) for r in first.values()}) == 1
    for key in HEAD_METRICS:
        assert len({round(r[key], 9) for r in first.values() if r[key] is not None}) == 1, key


def test_figure_is_a_png(demo):
    with open(demo["figure"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(demo["figure"]) > 10_000


def test_steps_are_counted_from_1_in_metrics_progress_and_figure(demo):
    import matplotlib.pyplot as plt

    from verl_mtp.tools.demo import REGIME_LABELS, build_figure

    in_metrics = {g: [r["step"] for r in _records(demo) if r["regime"] == g] for g in REGIMES}
    in_progress = {g: [] for g in REGIMES}
    for line in demo["progress"]:
        found = re.match(r"\[(\w+) *\] step +(\d+)/(\d+) ", line)
        if found:
            assert int(found.group(3)) == STEPS
            in_progress[found.group(1)].append(int(found.group(2)))
    fig = build_figure(demo["results"])
    try:
        for ax in fig.axes:
            in_figure = {line.get_label(): [int(x) for x in line.get_xdata()] for line in ax.get_lines()}
            assert in_figure == {REGIME_LABELS[g]: in_metrics[g] for g in REGIMES}
    finally:
        plt.close(fig)
    assert in_metrics == in_progress == {g: list(range(1, STEPS + 1)) for g in REGIMES}


def test_figure_labels_every_axis_and_tells_coinciding_regimes_apart(demo):
    import matplotlib.pyplot as plt

    from verl_mtp.tools.demo import LINE_STYLES, REGIME_LABELS, build_figure

    fig = build_figure(demo["results"])
    try:
        assert len(fig.axes) == 6
        for ax in fig.axes:
            assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title()
            lines = ax.get_lines()
            assert len(lines) == len(REGIMES)
            # colour alone does not separate lines drawn exactly on top of each other (five regimes
            # share lambda = 0.1): each has its own marker and width, and a visible line style
            assert len({line.get_marker() for line in lines}) == len(lines)
            assert len({line.get_linewidth() for line in lines}) == len(lines)
            assert all(line.get_linestyle() not in ("None", "") for line in lines)
    finally:
        plt.close(fig)
    dashes = [style[1] for style in LINE_STYLES.values()]
    assert set(LINE_STYLES) == set(REGIME_LABELS) and len(set(map(str, dashes))) == len(dashes)
    assert len({style[2] for style in LINE_STYLES.values()}) == len(LINE_STYLES)  # markers


def test_sampler_log_probs_equal_verls_engine_forward(demo):
    """The demo trains on the sampler's log-probs as old log-probs: they must be what verl's actor
    forward (the engine's, with its temperature scaling) computes for the same tokens."""
    from verl_mtp.tools.demo import (
        RESPONSE_LEN, build_model, engine_log_probs, generate, load_parameters, regime_config, sample_prompts,
    )

    model = build_model(regime_config("joint"))
    load_parameters(model, demo["initial_state"])
    prompts, _ = sample_prompts(6, torch.Generator().manual_seed(3))
    for temperature in (1.0, 0.7):
        responses, sampled = generate(model, prompts, temperature, torch.Generator().manual_seed(4))
        assert responses.shape == sampled.shape == (6, RESPONSE_LEN)
        recomputed = torch.stack(engine_log_probs(model, list(prompts), list(responses), temperature))
        torch.testing.assert_close(sampled, recomputed, atol=1e-5, rtol=1e-5)


def _trunk(state):
    return {k: v for k, v in state.items() if not k.startswith("mtp.")}


def test_disabled_and_standalone_leave_the_trunk_as_a_run_without_mtp(demo):
    results, initial = demo["results"], demo["initial_state"]
    reference = _trunk(results["none"].state)  # a model built without any MTP head
    assert any(not torch.equal(v, initial[k]) for k, v in reference.items())  # the policy did learn
    for regime in ("disabled", "standalone", "standalone_kl", "standalone_tv"):
        trunk = _trunk(results[regime].state)
        assert trunk.keys() == reference.keys()
        assert all(torch.equal(trunk[k], reference[k]) for k in reference), regime
    # ...whereas joint CE and the rl regimes move the trunk (the MTP term reaches it).
    for regime in ("joint", "rl", "rl_occ", "decoupled_occ_tv"):
        trunk = _trunk(results[regime].state)
        assert any(not torch.equal(trunk[k], reference[k]) for k in reference), regime


def test_the_head_trains_except_when_disabled(demo):
    results, initial = demo["results"], demo["initial_state"]
    head = [k for k in initial if k.startswith("mtp.")]
    assert head
    assert all(torch.equal(results["disabled"].state[k], initial[k]) for k in head)
    for regime in REGIMES[2:]:
        assert any(not torch.equal(results[regime].state[k], initial[k]) for k in head), regime


def test_summary_table_lists_every_regime(demo):
    from verl_mtp.tools.demo import REGIME_LABELS, format_summary

    table = format_summary(demo["rows"])
    assert all(REGIME_LABELS[r] in table for r in REGIMES)
    assert "acc greedy" in table.splitlines()[0] and "acc prob" in table.splitlines()[0]
    with open(os.path.join(demo["options"].out_dir, "summary.json")) as f:
        summary = {row["regime"]: row for row in json.load(f)}
    records = _records(demo)
    for regime in REGIMES:  # the last-5 means of the per-step values (here: both steps)
        row = summary[REGIME_LABELS[regime]]
        for key in ("accept_greedy", "accept_probabilistic"):
            values = [r[key] for r in records if r["regime"] == regime]
            if regime == "none":
                assert row[f"{key}_last"] is None
            else:
                assert row[f"{key}_last"] == pytest.approx(sum(values) / len(values), abs=1e-12)


def _accept_eval_acceptance(state, prompts, responses, temperature):
    """accept-eval's own computation of the depth-1 acceptances, averaged over every anchor: a
    plain megatron-core GPT (not prepared by verl) with ``state``, its chained MTP layer forward one
    sequence at a time (``score_sequence``), greedy drafts p(argmax q) and probabilistic sum min(p, q)."""
    from verl_mtp.local_megatron.tiny_gpt import build_tiny_gpt
    from verl_mtp.tools.accept_eval.scoring import score_sequence
    from verl_mtp.tools.demo import VOCAB, load_parameters, model_spec

    model = build_tiny_gpt(model_spec())
    load_parameters(model, state)
    model.eval()
    greedy, probabilistic = [], []
    for prompt, response in zip(prompts.tolist(), responses.tolist()):
        scores = score_sequence(model, prompt, response, k_max=1, temperatures=[temperature], vocab_size=VOCAB)
        assert bool(scores.valid.all())
        greedy.append(scores.argmax_draft[temperature][:, 0])
        probabilistic.append(scores.sampled[temperature][:, 0])
    return torch.cat(greedy).mean().item(), torch.cat(probabilistic).mean().item()


def _first_step_rollouts(demo):
    """Step 1's rollouts, regenerated as run_regime draws them (same generators, warmed-up weights)."""
    from verl_mtp.tools.demo import build_model, generate, load_parameters, regime_config, reward, sample_prompts

    options = demo["options"]
    prompts, answers = sample_prompts(options.prompts_per_step, torch.Generator().manual_seed(options.seed))
    prompts = prompts.repeat_interleave(options.samples_per_prompt, 0)
    answers = answers.repeat_interleave(options.samples_per_prompt, 0)
    model = build_model(regime_config("disabled"))
    load_parameters(model, demo["initial_state"])
    responses, _ = generate(model, prompts, options.temperature, torch.Generator().manual_seed(options.seed + 1))
    return prompts, responses, reward(responses, answers).mean().item()


def test_acceptance_columns_equal_accept_evals_computation(demo):
    """metrics.jsonl's acceptances of step 1 (the same rollouts and weights for every regime) and
    a trained TV head's on those rollouts at another temperature equal accept-eval's own path."""
    from verl_mtp.tools.demo import build_model, load_parameters, mtp_head_on_rollouts, regime_config

    prompts, responses, step_reward = _first_step_rollouts(demo)
    first = [r for r in _records(demo) if r["step"] == 1 and r["regime"] != "none"]
    assert first[0]["reward"] == pytest.approx(step_reward, abs=1e-9)  # the same rollouts
    greedy, probabilistic = _accept_eval_acceptance(
        demo["initial_state"], prompts, responses, demo["options"].temperature
    )
    for r in first:
        assert r["accept_greedy"] == pytest.approx(greedy, abs=1e-6), r["regime"]
        assert r["accept_probabilistic"] == pytest.approx(probabilistic, abs=1e-6), r["regime"]

    trained = demo["results"]["standalone_tv"].state
    model = build_model(regime_config("standalone_tv"))
    load_parameters(model, trained)
    head = mtp_head_on_rollouts(model, prompts, responses, temperature=0.7)
    greedy, probabilistic = _accept_eval_acceptance(trained, prompts, responses, 0.7)
    assert head["accept_greedy"] == pytest.approx(greedy, abs=1e-6)
    assert head["accept_probabilistic"] == pytest.approx(probabilistic, abs=1e-6)


CLI = os.path.join(os.path.dirname(sys.executable), "verl-mtp")
CHOICES = "valid choices are " + ", ".join(REGIMES)


def _cli(*args, timeout=300):
    """``verl-mtp ARGS`` in a fresh process, as from a shell: without this process's rendezvous
    port (the demo fixture's gloo group holds it)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize(
    "regimes, message",
    [
        ("joint,sft", f"unknown demo regime(s) sft; {CHOICES}"),
        (",", f"--regimes names no regime; {CHOICES}"),
        ("", f"--regimes names no regime; {CHOICES}"),
        ("joint,rl,joint", "--regimes names joint more than once"),
    ],
)
def test_cli_rejects_a_bad_regime_list(tmp_path, regimes, message):
    out = tmp_path / "out"
    proc = _cli("demo", "--regimes", regimes, "--out", str(out))
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert not out.exists()  # rejected before anything ran


@pytest.mark.slow
def test_cli_prints_progress_lines_and_the_table_only(tmp_path):
    """The smallest CLI run end to end: no model tree, no patch chatter, no dependency warnings."""
    proc = _cli(
        "demo", "--steps", "2", "--warmup-steps", "1", "--regimes", "none,disabled,rl_occ", "--out", str(tmp_path),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    table = re.compile(r"^(regime  .*time s|-+|(no MTP head \(reference\)|disabled \(head frozen\)|rl \+ OCC) .*)$")
    allowed = [
        re.compile(r"^warm-up: 1 supervised steps"),
        re.compile(r"^\[(none|disabled|rl_occ) *\] step +[12]/2  reward \d\.\d{3}  "),
        table,
        re.compile(r"^(metrics|figure): +" + re.escape(str(tmp_path))),
        re.compile(r"^$"),
    ]
    unexpected = [line for line in proc.stdout.splitlines() if not any(p.match(line) for p in allowed)]
    assert unexpected == []
    assert "GPTModel(" not in proc.stdout and len(proc.stdout.splitlines()) < 20
    assert sum(bool(table.match(line)) for line in proc.stdout.splitlines()) == 2 + 3
    with open(tmp_path / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2] * 3
