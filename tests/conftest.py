"""Shared fixtures. Never `import tests...`: the verl wheel owns a top-level package named tests."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

import verl  # noqa: F401 - activates the verl-mtp plugin, as in every verl process

# A DeepSeek-V3-layout config small enough for transformers to parse instantly.
TINY_DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "vocab_size": 64,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "moe_intermediate_size": 16,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "first_k_dense_replace": 1,
    "kv_lora_rank": 8,
    "q_lora_rank": 8,
    "qk_rope_head_dim": 4,
    "qk_nope_head_dim": 4,
    "v_head_dim": 8,
}


@pytest.fixture
def make_checkpoint(tmp_path):
    """Write a config-only checkpoint dir; ``depths`` goes under ``key`` (None = no MTP key)."""

    def make(depths=1, key="num_nextn_predict_layers", text_config=False, name="model"):
        config = dict(TINY_DEEPSEEK_V3)
        if key is not None:
            if text_config:
                config["text_config"] = {key: depths}
            else:
                config[key] = depths
        path = tmp_path / name
        path.mkdir()
        (path / "config.json").write_text(json.dumps(config))
        return str(path)

    return make


@pytest.fixture
def run_python():
    """Run a Python snippet in a fresh interpreter; returns the CompletedProcess."""

    def run(code, env=None, timeout=300, args=()):
        full_env = dict(os.environ)
        full_env.update(env or {})
        return subprocess.run(
            [sys.executable, *args, "-c", textwrap.dedent(code)],
            capture_output=True,
            text=True,
            env=full_env,
            timeout=timeout,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        )

    return run
