"""Every recipe in recipes/ dry-runs as a user runs it: bash, DRY_RUN, real Hydra composition and checks.

Recipes are found by glob, so a new one is covered as soon as it exists; it needs a family below
(matched on its file name) and a regime in its name ("standalone" or "rl_occ").
"""

import glob
import json
import os
import re
import subprocess
import sys

import pytest

from verl_mtp.megatron.compat import expected_gradient_reach

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES_DIR = os.path.join(REPO, "recipes")
COMMON = os.path.join(RECIPES_DIR, "common.sh")
RECIPES = sorted(
    os.path.basename(p) for p in glob.glob(os.path.join(RECIPES_DIR, "*.sh")) if os.path.basename(p) != "common.sh"
)

# config.json of each family, as small as the dry run needs: what explain reads for the MTP depth
# count (num_nextn_predict_layers, or mtp_num_hidden_layers, for Qwen3.5 under text_config) and
# what the layout check reads (layers, heads, experts), with the released checkpoints' values.
FAMILIES = {
    "mimo_": {
        "architectures": ["MiMoForCausalLM"], "model_type": "mimo",
        "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
        "num_nextn_predict_layers": 1,
    },
    "glm45": {
        "architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe",
        "num_hidden_layers": 46, "num_attention_heads": 96, "num_key_value_heads": 8, "n_routed_experts": 128,
        "num_nextn_predict_layers": 1,
    },
    "qwen3_next": {
        "architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next",
        "num_hidden_layers": 48, "num_attention_heads": 16, "num_key_value_heads": 2, "num_experts": 512,
        "mtp_num_hidden_layers": 1,
    },
    "deepseek_v3": {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128, "n_routed_experts": 256,
        "num_nextn_predict_layers": 1,
    },
    "qwen35_dense": {
        "architectures": ["Qwen3_5ForConditionalGeneration"], "model_type": "qwen3_5",
        "text_config": {
            "model_type": "qwen3_5_text", "num_hidden_layers": 64, "num_attention_heads": 24,
            "num_key_value_heads": 4, "mtp_num_hidden_layers": 1,
        },
    },
    "qwen35_moe": {
        "architectures": ["Qwen3_5MoeForConditionalGeneration"], "model_type": "qwen3_5_moe",
        "text_config": {
            "model_type": "qwen3_5_moe_text", "num_hidden_layers": 40, "num_attention_heads": 16,
            "num_key_value_heads": 2, "num_experts": 256, "mtp_num_hidden_layers": 1,
        },
    },
}

# What the regime in a recipe's file name means in verl-mtp's keys.
REGIMES = {
    "standalone": {"regime": "standalone", "loss_type": "ce", "coef_mode": "fixed"},
    # decoupled by default: OCC's lambda on the shared parameters, a TV-trained drafter (MTP_REGIME, DRAFTER_LOSS)
    "rl_occ": {"regime": "decoupled", "loss_type": "rl", "coef_mode": "occ", "drafter_loss": "tv"},
}


def family_of(recipe):
    matches = [prefix for prefix in FAMILIES if recipe.startswith(prefix)]
    assert len(matches) == 1, f"{recipe}: add its model family's config.json to FAMILIES in this test"
    return matches[0]


def regime_of(recipe):
    matches = [REGIMES[key] for key in REGIMES if key in recipe]
    assert len(matches) == 1, f"{recipe}: its name should say its regime, one of {', '.join(REGIMES)}"
    return matches[0]


def depth_of(config):
    for cfg in (config, config.get("text_config", {})):
        for key in ("num_nextn_predict_layers", "mtp_num_hidden_layers"):
            if key in cfg:
                return cfg[key]
    raise AssertionError("family config without an MTP depth key")


def recipe_knobs():
    """Every environment variable common.sh or a recipe reads with a default (${VAR:=...}, ${VAR:-...})."""
    names = set()
    for path in [COMMON, *(os.path.join(RECIPES_DIR, r) for r in RECIPES)]:
        with open(path) as f:
            names |= set(re.findall(r"\$\{([A-Z][A-Z0-9_]*):[=\-?]", f.read()))
    return names


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One config-only checkpoint directory per family."""
    root = tmp_path_factory.mktemp("recipe_models")
    paths = {}
    for prefix, config in FAMILIES.items():
        path = root / prefix.strip("_")
        path.mkdir()
        (path / "config.json").write_text(json.dumps(config))
        paths[prefix] = str(path)
    return paths


def run_recipe(recipe, cwd, env=None, args=()):
    full_env = {k: v for k, v in os.environ.items() if k not in recipe_knobs()}  # the caller's settings stay out
    # verl-mtp and verl from the environment running the tests
    full_env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + full_env.get("PATH", "")
    full_env["PYTHON"] = sys.executable
    full_env["HOME"] = str(cwd)
    full_env.update(env or {})
    return subprocess.run(
        ["bash", os.path.join(RECIPES_DIR, recipe), *args],
        capture_output=True, text=True, env=full_env, cwd=cwd, timeout=300,
    )


def test_recipes_exist_and_share_common():
    assert len(RECIPES) >= 7
    for recipe in RECIPES:
        path = os.path.join(RECIPES_DIR, recipe)
        with open(path) as f:
            text = f.read()
        assert os.access(path, os.X_OK), f"{recipe} is not executable"
        assert text.startswith("#!/usr/bin/env bash\n"), recipe
        assert "set -euo pipefail" in text, recipe
        assert 'source "$(dirname "${BASH_SOURCE[0]}")/common.sh"' in text, recipe
        # the user's arguments come last, so they override the recipe
        assert re.search(r'run_verl "\$\{COMMON_ARGS\[@\]\}".*\n\s+"\$@"\n*$', text, re.S), recipe
        family_of(recipe), regime_of(recipe)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["vllm", "sglang"])
@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_dry_run(recipe, engine, checkpoints, tmp_path):
    family = family_of(recipe)
    expected = regime_of(recipe)
    proc = run_recipe(recipe, tmp_path, env={"DRY_RUN": "json", "ROLLOUT": engine, "MODEL_PATH": checkpoints[family]})
    assert proc.returncode == 0, proc.stderr[-4000:]
    plan = json.loads(proc.stdout)

    assert plan["enabled"] is True
    for key, value in expected.items():
        assert plan[key] == value, (key, plan[key])
    assert plan["depths"] == depth_of(FAMILIES[family])
    assert f"{checkpoints[family]}/config.json declares" in plan["depths_source"]
    assert plan["gradient_reach"] == list(expected_gradient_reach(expected["regime"]))
    if expected["coef_mode"] == "occ":
        assert plan["coef"]["lambda_plus"] == 1.0 and plan["coef"]["clip"] == [None, None]
        assert plan["policy_loss_mode"] == "vanilla"
    else:
        assert plan["coef"] == {"lambda": 0.1}

    # SPEC=1 (the default): the MTP head drafts in the chosen engine
    assert plan["rollout_engine"] == engine
    if engine == "vllm":
        spec = {"method": "mtp", "num_speculative_tokens": 1}
        if expected["regime"] == "decoupled":  # a TV-trained head drafts by sampling from its distribution
            spec["draft_sample_method"] = "probabilistic"
        assert plan["speculative_args"] == {"speculative_config": spec}
    else:
        spec = plan["speculative_args"]
        assert spec["speculative_algorithm"] == "EAGLE"
        chain = (spec["speculative_num_steps"], spec["speculative_eagle_topk"], spec["speculative_num_draft_tokens"])
        assert chain == (1, 1, 2)
        assert spec["enable_draft_weights_cpu_backup"] is True

    # the launch command it would have run, and verl's own checks after verl-mtp's
    assert "--config-path=pkg://verl_mtp.conf --config-name=ppo_megatron_mtp" in proc.stderr
    assert f"actor_rollout_ref.rollout.name={engine}" in proc.stderr
    assert "[validate_config] All configuration checks passed successfully!" in proc.stderr
    assert "dry run: all checks passed; nothing was launched" in proc.stderr


@pytest.mark.slow
def test_spec_off_and_arguments_override_the_recipe(checkpoints, tmp_path):
    proc = run_recipe(
        "mimo_7b_rl_dapo_rl_occ.sh", tmp_path,
        env={"DRY_RUN": "json", "SPEC": "0", "MODEL_PATH": checkpoints["mimo_"]},
        args=["actor_rollout_ref.model.mtp.occ_scale=0.5"],
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    plan = json.loads(proc.stdout)
    assert plan["speculative_args"] == {}
    assert plan["coef"]["lambda_plus"] == 0.5


@pytest.mark.slow
def test_the_papers_joint_regime_runs_without_speculation_only(checkpoints, tmp_path):
    env = {"DRY_RUN": "json", "MODEL_PATH": checkpoints["mimo_"], "MTP_REGIME": "joint"}
    refused = run_recipe("mimo_7b_rl_dapo_rl_occ.sh", tmp_path, env=env)
    assert refused.returncode == 2
    assert "MTP_REGIME=joint with SPEC=1" in refused.stderr and "set SPEC=0 or MTP_REGIME=decoupled" in refused.stderr
    proc = run_recipe("mimo_7b_rl_dapo_rl_occ.sh", tmp_path, env={**env, "SPEC": "0"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    plan = json.loads(proc.stdout)
    assert (plan["regime"], plan["loss_type"], plan["coef_mode"], plan["drafter_loss"]) == ("joint", "rl", "occ", None)
    assert plan["speculative_args"] == {}
    kl = run_recipe("mimo_7b_rl_dapo_rl_occ.sh", tmp_path, env={**env, "MTP_REGIME": "decoupled", "DRAFTER_LOSS": "kl"})
    assert kl.returncode == 0, kl.stderr[-4000:]
    assert json.loads(kl.stdout)["drafter_loss"] == "kl"


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra, message",
    [
        # a misspelled key: verl-mtp names the closest valid one
        (
            "actor_rollout_ref.model.mtp.mtp_los_type=rl",
            "verl-mtp: invalid MTP config: unknown key(s) actor_rollout_ref.model.mtp.mtp_los_type "
            "(did you mean mtp_loss_type?)",
        ),
        # a misspelled value: verl-mtp's validation names the key, the value and the choices
        (
            "actor_rollout_ref.model.mtp.mtp_coef_mode=occc",
            "verl-mtp: invalid MTP config: actor_rollout_ref.model.mtp.mtp_coef_mode='occc' is invalid: "
            "valid choices are fixed, occ",
        ),
    ],
    ids=["typo-key", "typo-value"],
)
def test_typo_fails_the_dry_run(extra, message, checkpoints, tmp_path):
    proc = run_recipe(
        "mimo_7b_rl_dapo_rl_occ.sh", tmp_path, env={"DRY_RUN": "1", "MODEL_PATH": checkpoints["mimo_"]}, args=[extra]
    )
    assert proc.returncode == 2
    assert message in proc.stderr
    assert proc.stdout == ""


@pytest.mark.slow
def test_layout_that_megatron_would_refuse_fails_the_dry_run(checkpoints, tmp_path):
    # GLM-4.5-Air's 46 layers do not split over 4 pipeline stages.
    proc = run_recipe(
        "glm45_air_dapo_rl_occ.sh", tmp_path,
        env={"DRY_RUN": "1", "MODEL_PATH": checkpoints["glm45"], "ACTOR_PP": "4", "ACTOR_EP": "8"},
    )
    assert proc.returncode == 2
    assert "dry run: the config would fail at start-up" in proc.stderr
    assert "46 layers cannot be split evenly over PP=4 pipeline stages" in proc.stderr


@pytest.mark.parametrize(
    "env, message",
    [
        ({"ROLLOUT": "tgi"}, "ROLLOUT='tgi' is invalid: valid choices are vllm, sglang"),
        ({"SPEC": "yes"}, "SPEC='yes' is invalid: valid choices are 1, 0"),
        ({"DRY_RUN": "true"}, "DRY_RUN='true' is invalid: valid choices are 0, 1, json"),
        ({"NNODES": "two"}, "NNODES='two' is invalid: expected a positive integer"),
        ({"OFFLOAD": "yes"}, "OFFLOAD='yes' is invalid: valid choices are True, False"),
        ({"MAX_RESPONSE_LEN": "2048"}, "OVERLONG_BUFFER_LEN=4096 is invalid: expected less than MAX_RESPONSE_LEN=2048"),
        ({"MTP_REGIME": "standalone"}, "MTP_REGIME='standalone' is invalid: valid choices are decoupled, joint"),
        ({"DRAFTER_LOSS": "js"}, "DRAFTER_LOSS='js' is invalid: valid choices are tv, kl, ce"),
    ],
    ids=["rollout", "spec", "dry-run", "nnodes", "offload", "overlong", "mtp-regime", "drafter-loss"],
)
def test_bad_environment_is_refused_before_python_starts(env, message, tmp_path):
    proc = run_recipe("mimo_7b_rl_dapo_standalone.sh", tmp_path, env={"DRY_RUN": "1", **env})
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"mimo_7b_rl_dapo_standalone.sh: {message}"
    assert proc.stdout == ""
