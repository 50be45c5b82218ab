"""`verl-mtp explain` as a user runs it: the console script, real Hydra composition, exit codes."""

import json
import os
import re
import subprocess
import sys

import pytest

from verl_mtp.megatron.compat import expected_gradient_reach

VERL_MTP = os.path.join(os.path.dirname(sys.executable), "verl-mtp")


def explain(*args):
    return subprocess.run([VERL_MTP, "explain", *args], capture_output=True, text=True, timeout=300)


def test_console_script_is_installed():
    assert os.access(VERL_MTP, os.X_OK)


def test_readme_example(make_checkpoint):
    # The README's first example: OCC in the decoupled regime with a TV-trained drafter, drafting
    # probabilistically in vLLM, on a MiMo-style checkpoint.
    path = make_checkpoint(depths=1)
    proc = explain(
        f"actor_rollout_ref.model.path={path}",
        "actor_rollout_ref.model.mtp.mtp_training_mode=decoupled",
        "actor_rollout_ref.model.mtp.mtp_loss_type=rl",
        "actor_rollout_ref.model.mtp.mtp_coef_mode=occ",
        "actor_rollout_ref.model.mtp.mtp_drafter_loss=tv",
        "actor_rollout_ref.model.mtp.draft_sample_method=probabilistic",
        "actor_rollout_ref.model.mtp.enable_rollout=True",
        "actor_rollout_ref.rollout.name=vllm",
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "regime            decoupled (enable_train=True, detach_encoder=False)" in out
    assert f"MTP depths        1 ({path}/config.json declares 1)" in out
    assert "rl: the actor's policy loss (loss_mode=vanilla)" in out
    assert "occ: lambda_plus=1.0, eps=1e-08" in out
    assert ('"speculative_config": {"method": "mtp", "num_speculative_tokens": 1, '
            '"draft_sample_method": "probabilistic"}') in out
    assert "policy-loss term -> trunk, embedding, lm_head only; drafter loss -> MTP module only" in out
    with open(os.path.join(os.path.dirname(__file__), os.pardir, "README.md")) as f:
        readme = f.read()
    for line in out.splitlines()[:8]:  # the README shows this output (the path and megatron's version aside)
        line = re.sub(r"\s+\[megatron-core [^]]*\]$", "", line.replace(path, "/models/MiMo-7B-RL"))
        assert line in readme, line


@pytest.mark.parametrize("regime", ["disabled", "standalone", "joint"])
def test_json_plan_reports_gradient_reach_for_installed_megatron(regime, make_checkpoint):
    proc = explain(
        f"actor_rollout_ref.model.path={make_checkpoint(depths=2)}",
        "actor_rollout_ref.model.mtp.enable=True",
        f"actor_rollout_ref.model.mtp.mtp_training_mode={regime}",
        "actor_rollout_ref.model.mtp.mtp_step_weight_beta=0.5",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["regime"] == regime and plan["depths"] == 2
    assert plan["step_weights"] == [1.0, 0.5]
    assert plan["gradient_reach"] == list(expected_gradient_reach(regime))


def test_stock_config_with_plus_keys_and_sglang(make_checkpoint):
    proc = explain(
        "--config-name", "ppo_megatron_trainer",
        f"actor_rollout_ref.model.path={make_checkpoint()}",
        "+actor_rollout_ref.model.mtp.mtp_training_mode=standalone",
        "actor_rollout_ref.model.mtp.enable_rollout=True",
        "actor_rollout_ref.rollout.name=sglang",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["regime"] == "standalone"
    assert plan["speculative_args"]["speculative_algorithm"] == "EAGLE"
    assert plan["speculative_args"]["enable_draft_weights_cpu_backup"] is True


def test_unchunked_mtp_logits_are_flagged(make_checkpoint):
    path = make_checkpoint()

    def notes(*overrides):
        proc = explain(
            f"actor_rollout_ref.model.path={path}",
            "actor_rollout_ref.model.mtp.mtp_training_mode=standalone", *overrides, "--json",
        )
        assert proc.returncode == 0, proc.stderr
        return " ".join(json.loads(proc.stdout)["notes"])

    assert "mtp_logits_chunk_tokens=0" in notes("actor_rollout_ref.model.mtp.mtp_logits_chunk_tokens=0")
    assert "mtp_logits_chunk_tokens" not in notes()


def test_plus_prefix_is_accepted_with_the_wrapper():
    proc = explain("+actor_rollout_ref.model.mtp.mtp_loss_type=ce", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["enabled"] is False


def test_boolean_words_and_unset_rollout_engine(make_checkpoint):
    # `enable_train=no` is False (before, the non-empty string gave joint); verl's rollout.name
    # is mandatory (???) in a real run but unset here: say so instead of printing None.
    proc = explain(
        f"actor_rollout_ref.model.path={make_checkpoint()}", "actor_rollout_ref.model.mtp.enable=yes",
        "actor_rollout_ref.model.mtp.enable_train=no", "actor_rollout_ref.model.mtp.detach_encoder=off",
    )
    assert proc.returncode == 0, proc.stderr
    assert "regime            disabled (enable_train=False, detach_encoder=False)" in proc.stdout
    assert "rollout           engine not set (actor_rollout_ref.rollout.name, e.g. vllm or sglang); " in proc.stdout
    assert "None" not in proc.stdout


def test_mtp_off_says_verl_is_unchanged():
    proc = explain()
    assert proc.returncode == 0, proc.stderr
    assert "MTP: off" in proc.stdout


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["actor_rollout_ref.model.mtp.mtp_loss_type=rll"], "mtp_loss_type='rll' is invalid: valid choices are ce, rl"),
        (["actor_rollout_ref.model.mtp.mtp_training_mode=frozen"], "valid choices are disabled, standalone, joint"),
        (["actor_rollout_ref.model.mtp.mtp_loss_scaling_factor=-1"], "mtp_loss_scaling_factor=-1 is invalid: expected a number >= 0"),
        (["actor_rollout_ref.model.mtp.mtp_loss_type=rl"], "the RL policy loss needs the MTP head in training"),
        (["actor_rollout_ref.model.mtp.mtp_los_type=rl"],
         "unknown key(s) actor_rollout_ref.model.mtp.mtp_los_type (did you mean mtp_loss_type?)"),
        (["+actor_rollout_ref.model.mtp.occ_scal=2"], "actor_rollout_ref.model.mtp.occ_scal (did you mean occ_scale?)"),
        (["actor_rollout_ref.model.mtp.enable=True", "actor_rollout_ref.model.mtp.enable_rollout=maybe"],
         "mtp.enable_rollout='maybe' is invalid: expected a boolean: true or false (also yes/no, on/off"),
        (["actor_rollout_ref.model.mtp.mtp_logits_chunk_tokens=-5"], "mtp_logits_chunk_tokens=-5 is invalid: expected an integer >= 0"),
    ],
)
def test_bad_overrides_fail_with_clear_message(overrides, message):
    proc = explain(*overrides)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert proc.stdout == ""


def test_model_without_mtp_fails(make_checkpoint):
    proc = explain(f"actor_rollout_ref.model.path={make_checkpoint(key=None)}", "actor_rollout_ref.model.mtp.enable=True")
    assert proc.returncode == 2
    assert "the model declares no MTP layers" in proc.stderr


def test_non_megatron_strategy_fails():
    proc = explain("--config-name", "ppo_trainer", "actor_rollout_ref.model.mtp.enable=True")
    assert proc.returncode == 2
    assert "needs the Megatron engine" in proc.stderr and "strategy='fsdp'" in proc.stderr


def test_decoupled_plan_prints_which_term_reaches_which_parameters(make_checkpoint):
    path = make_checkpoint(depths=1)
    common = [f"actor_rollout_ref.model.path={path}", "actor_rollout_ref.model.mtp.mtp_loss_type=rl",
              "actor_rollout_ref.model.mtp.mtp_coef_mode=occ", "actor_rollout_ref.model.mtp.enable_rollout=True",
              "actor_rollout_ref.rollout.name=vllm", "actor_rollout_ref.rollout.temperature=1.0"]
    proc = explain(*common, "actor_rollout_ref.model.mtp.mtp_training_mode=decoupled",
                   "actor_rollout_ref.model.mtp.mtp_drafter_loss=tv")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "regime            decoupled (enable_train=True, detach_encoder=False)" in out
    assert "MTP module: tv: total variation to the main head's distribution" in out
    assert "policy-loss term -> trunk, embedding, lm_head only; drafter loss -> MTP module only" in out
    assert "mtp_drafter_loss=tv trains the head's distribution q toward the policy's p" in out  # use probabilistic drafts
    assert "one extra MTP-layer forward" in out
    assert "moves the drafter away from the policy" not in out

    joint = explain(*common, "actor_rollout_ref.model.mtp.mtp_training_mode=joint")
    assert joint.returncode == 0, joint.stderr
    assert "moves the drafter away from the policy" in joint.stdout  # the recipe advice: use decoupled

    chosen = explain(*common, "actor_rollout_ref.model.mtp.mtp_training_mode=decoupled",
                     "actor_rollout_ref.model.mtp.mtp_drafter_loss=kl",
                     "actor_rollout_ref.model.mtp.draft_sample_method=probabilistic", "--json")
    assert chosen.returncode == 0, chosen.stderr
    plan = json.loads(chosen.stdout)
    assert plan["gradient_split"] == {"policy-loss term": ["trunk", "embedding", "lm_head"], "drafter loss": ["mtp"]}
    assert plan["drafter_loss"] == "kl"
    assert not any("trains the head's distribution q" in n for n in plan["notes"])  # already probabilistic
