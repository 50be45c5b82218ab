"""`verl-mtp demo` on a very small budget: outputs, finiteness, and what each regime may touch.

Real parts as in the demo: a megatron-core GPT with an MTP head, verl's GRPO advantages, verl's
train_batch / engine forward / actor loss with verl-mtp's patches (CpuStandInEngine replaces the
CUDA-only engine parts). Sampling is a plain loop: there is no inference engine on CPU.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from verl_mtp.demo import DemoOptions, run_demo

pytestmark = pytest.mark.megatron
REGIMES = ("none", "disabled", "standalone", "joint", "rl", "rl_occ")
STEPS = 2


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    options = DemoOptions(
        steps=STEPS, regimes=REGIMES, warmup_steps=3, prompts_per_step=4, samples_per_prompt=2,
        micro_batch_size=4, out_dir=str(out), progress=None,
    )
    return run_demo(options)


def test_metrics_for_every_regime_are_finite(demo):
    with open(demo["metrics"]) as f:
        records = [json.loads(line) for line in f]
    assert [(r["regime"], r["step"]) for r in records] == [(g, s) for g in REGIMES for s in range(STEPS)]
    for r in records:
        numbers = {k: v for k, v in r.items() if k not in ("regime", "step") and v is not None}
        assert all(math.isfinite(v) for v in numbers.values()), r
        assert 0.0 <= r["reward"] <= 1.0
        has_head = r["regime"] != "none"
        assert (r["mtp_ce"] is not None) == has_head and (r["draft_agreement"] is not None) == has_head
        assert (r["mtp_pg_loss"] is not None) == r["regime"].startswith("rl")
    coef = {r["regime"]: r["coef"] for r in records}
    assert coef["disabled"] == 0.0 and coef["standalone"] == coef["joint"] == coef["rl"] == 0.1
    # Same weights, prompts and sampling seeds: every regime's first step sees the same rollouts.
    first = {r["regime"]: r for r in records if r["step"] == 0}
    assert len({round(r["reward"], 9) for r in first.values()}) == 1
    assert len({round(r["draft_agreement"], 9) for r in first.values() if r["draft_agreement"] is not None}) == 1


def test_figure_is_a_png(demo):
    with open(demo["figure"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(demo["figure"]) > 10_000


def _trunk(state):
    return {k: v for k, v in state.items() if not k.startswith("mtp.")}


def test_disabled_and_standalone_leave_the_trunk_as_a_run_without_mtp(demo):
    results, initial = demo["results"], demo["initial_state"]
    reference = _trunk(results["none"].state)  # a model built without any MTP head
    assert any(not torch.equal(v, initial[k]) for k, v in reference.items())  # the policy did learn
    for regime in ("disabled", "standalone"):
        trunk = _trunk(results[regime].state)
        assert trunk.keys() == reference.keys()
        assert all(torch.equal(trunk[k], reference[k]) for k in reference), regime
    # ...whereas joint CE and the rl regimes move the trunk (the MTP term reaches it).
    for regime in ("joint", "rl", "rl_occ"):
        trunk = _trunk(results[regime].state)
        assert any(not torch.equal(trunk[k], reference[k]) for k in reference), regime


def test_the_head_trains_except_when_disabled(demo):
    results, initial = demo["results"], demo["initial_state"]
    head = [k for k in initial if k.startswith("mtp.")]
    assert head
    assert all(torch.equal(results["disabled"].state[k], initial[k]) for k in head)
    for regime in ("standalone", "joint", "rl", "rl_occ"):
        assert any(not torch.equal(results[regime].state[k], initial[k]) for k in head), regime


def test_summary_table_lists_every_regime(demo):
    from verl_mtp.demo import REGIME_LABELS, format_summary

    table = format_summary(demo["rows"])
    assert all(REGIME_LABELS[r] in table for r in REGIMES)


def test_cli_rejects_an_unknown_regime(tmp_path):
    cli = os.path.join(os.path.dirname(sys.executable), "verl-mtp")
    proc = subprocess.run([cli, "demo", "--regimes", "joint,sft", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2
    assert "unknown demo regime(s) sft; valid choices are none, disabled, standalone, joint, rl, rl_occ" in proc.stderr
