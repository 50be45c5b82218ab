"""Speculative-decoding engine arguments per model family and engine version (verl_mtp.rollout.spec_args).

The argument dicts are checked against the engines' own config classes when they can be imported
here (vLLM ``vllm.config.SpeculativeConfig``, SGLang ``sglang.srt.server_args.ServerArgs``), and
otherwise against ``tests/data/engine_schema.json``: the field names, types and choices of those
classes as derived from the source of vLLM 0.24.0 and SGLang 0.5.12 (the versions verl 0.9.1 pins)
by ``verl_mtp.testing.engine_schema``. CI installs neither engine, so CI runs the schema path. The
engines themselves (GPU runtimes) are never started: what the engine would do with the arguments
at start-up is what spec_args encodes from the engines' source, and is what these tests pin down.
"""

import dataclasses
import importlib.util
import json
import re
import typing
from importlib import metadata

import pytest

from verl_mtp.config import ExtendedMtpConfig, MtpConfigError
from verl_mtp.models import detect_family
from verl_mtp.testing import engine_schema
from verl_mtp.rollout.spec_args import (
    ENGINE_FACTS,
    PINNED_ENGINE_VERSIONS,
    SGLANG_MTP_ALGORITHMS,
    EngineVersion,
    detect_engine_version,
    plan_speculative_rollout,
    sglang_max_draft_tokens,
    speculative_engine_args,
    verl_keeps_vllm_drafter_on_sleep,
    vllm_method_choices,
)
from verl_mtp.run_checks import validate_mtp_run_config

SCHEMA = engine_schema.load_schema()

# config.json per family, with what detection and the checks read (released checkpoints' layout).
FAMILY_CONFIGS = {
    "mimo": {"architectures": ["MiMoForCausalLM"], "model_type": "mimo", "num_hidden_layers": 36,
             "num_nextn_predict_layers": 1},
    "deepseek_v3": {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "num_hidden_layers": 61,
                    "num_nextn_predict_layers": 1},
    "glm4_moe": {"architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe", "num_hidden_layers": 46,
                 "num_nextn_predict_layers": 1},
    "qwen3_next": {"architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next", "num_hidden_layers": 48,
                   "mtp_num_hidden_layers": 1},
    "qwen3_5": {"architectures": ["Qwen3_5MoeForConditionalGeneration"], "model_type": "qwen3_5_moe",
                "text_config": {"model_type": "qwen3_5_moe_text", "num_hidden_layers": 40, "mtp_num_hidden_layers": 1}},
}
PINNED = {engine: EngineVersion(engine, v, installed=False) for engine, v in PINNED_ENGINE_VERSIONS.items()}


def version(engine, v):
    return EngineVersion(engine, v, installed=False)


@pytest.fixture
def run(tmp_path):
    """run(family, engine, depths=None, mtp=..., engine_kwargs=..., rollout=..., config_json=...) ->
    (run config dict, ExtendedMtpConfig) for a config-only checkpoint of that family."""
    counter = iter(range(1000))

    def make(family, engine, *, depths=None, mtp=None, engine_kwargs=None, rollout=None, config_json=None):
        cfg = json.loads(json.dumps(config_json or FAMILY_CONFIGS[family]))
        if depths is not None:
            target = cfg.get("text_config", cfg)
            key = "mtp_num_hidden_layers" if "mtp_num_hidden_layers" in target else "num_nextn_predict_layers"
            target[key] = depths
        path = tmp_path / f"model{next(counter)}"
        path.mkdir()
        (path / "config.json").write_text(json.dumps(cfg))
        config = {
            "actor_rollout_ref": {
                "actor": {"strategy": "megatron"},
                "model": {"path": str(path)},
                "rollout": {"name": engine, "engine_kwargs": {engine: engine_kwargs or {}}, "max_num_seqs": 1024,
                            **(rollout or {})},
            }
        }
        return config, ExtendedMtpConfig(enable=True, enable_rollout=True, **(mtp or {}))

    return make


# --- the engines' real classes when importable, else the schema ----------------------------------------


def _literal_values(tp):
    out = []
    for arg in typing.get_args(tp):
        out += _literal_values(arg) if typing.get_args(arg) else [arg]
    return out


def vllm_problems(args):
    if importlib.util.find_spec("vllm") is None:
        return engine_schema.vllm_schema_problems(args, SCHEMA["vllm"])
    from vllm.config import SpeculativeConfig
    from vllm.config.speculative import MTPModelTypes, SpeculativeMethod

    spec = args["speculative_config"]
    names = {f.name for f in dataclasses.fields(SpeculativeConfig)}
    problems = [f"unknown SpeculativeConfig field {k!r}" for k in spec if k not in names]
    if spec["method"] not in _literal_values(SpeculativeMethod) or spec["method"] not in _literal_values(MTPModelTypes):
        problems.append(f"method {spec['method']!r} is not an MTP method")
    # Field validation runs before __post_init__, which then stops for want of a target model: an
    # error about the target model means every field was accepted.
    try:
        SpeculativeConfig(**spec)
    except ValueError as exc:
        if "target_model_config" not in str(exc):
            problems.append(str(exc))
    return problems


def sglang_problems(args):
    if importlib.util.find_spec("sglang") is None:
        return engine_schema.sglang_schema_problems(args, SCHEMA["sglang"])
    from sglang.srt.server_args import ServerArgs
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    names = {f.name for f in dataclasses.fields(ServerArgs)}
    problems = [f"unknown ServerArgs field {k!r}" for k in args if k not in names]
    algorithm = args["speculative_algorithm"].upper()
    SpeculativeAlgorithm.from_string("EAGLE" if algorithm == "NEXTN" else algorithm)  # raises when unknown
    return problems


# --- every family on both engines ---------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_vllm_defaults_per_family(family, run):
    config, mtp = run(family, "vllm")
    plan = plan_speculative_rollout(config, mtp, PINNED["vllm"])
    assert plan.family == family and plan.depths == 1
    # vLLM >= 0.11 names every MTP drafter "mtp"; verl syncs the drafter only under that name.
    assert plan.args == {"speculative_config": {"method": "mtp", "num_speculative_tokens": 1}}
    assert vllm_problems(plan.args) == []
    assert any("level 1" in n for n in plan.notes)
    assert "0.24.0" in plan.built_for


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
@pytest.mark.parametrize("steps", [1, 3])
def test_sglang_chain_per_family(family, steps, run):
    # SGLang >= 0.5.10 starts speculative decoding on the hybrid Qwen models only without radix cache
    hybrid = {"disable_radix_cache": True} if ENGINE_FACTS[family].sglang_hybrid_cache else {}
    config, mtp = run(family, "sglang", engine_kwargs=hybrid,
                      mtp={"speculative_num_steps": steps, "speculative_num_draft_tokens": steps + 1})
    plan = plan_speculative_rollout(config, mtp, PINNED["sglang"])
    assert plan.args == {
        "speculative_algorithm": "EAGLE",
        "speculative_num_steps": steps,
        "speculative_eagle_topk": 1,
        "speculative_num_draft_tokens": steps + 1,
        "enable_weights_cpu_backup": True,
        "enable_draft_weights_cpu_backup": True,
    }
    assert sglang_problems(plan.args) == []
    assert any("one layer, run for all 3 steps" in n for n in plan.notes) == (steps == 3)


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_vllm_family_alias_is_accepted_and_noted(family, run):
    alias = ENGINE_FACTS[family].vllm_alias
    config, mtp = run(family, "vllm", mtp={"method": alias, "num_speculative_tokens": 2})
    plan = plan_speculative_rollout(config, mtp, PINNED["vllm"])
    assert plan.args["speculative_config"] == {"method": alias, "num_speculative_tokens": 2}
    assert vllm_problems(plan.args) == []
    assert any(f"{alias!r} as a deprecated alias of 'mtp'" in n for n in plan.notes)
    assert any("first MTP layer (run 2 times)" in n for n in plan.notes)


def test_unknown_family_gets_the_generic_method_and_a_note(run):
    config, mtp = run(None, "vllm", config_json={"architectures": ["LlamaForCausalLM"], "model_type": "llama"})
    plan = plan_speculative_rollout(config, mtp, PINNED["vllm"])
    assert plan.family is None and plan.args["speculative_config"]["method"] == "mtp"
    assert any("model_type 'llama' is none of the MTP families" in n for n in plan.notes)
    config["actor_rollout_ref"]["model"]["path"] = "org/remote-model"  # a hub id: no config.json here
    plan = plan_speculative_rollout(config, mtp, PINNED["vllm"])
    assert any("model family not checked here (org/remote-model has no readable config.json)" in n for n in plan.notes)


# --- vLLM: impossible combinations --------------------------------------------------------------------


def test_vllm_other_family_method_is_rejected(run):
    config, mtp = run("deepseek_v3", "vllm", mtp={"method": "qwen3_next_mtp"})
    with pytest.raises(MtpConfigError) as err:
        plan_speculative_rollout(config, mtp, PINNED["vllm"])
    msg = str(err.value)
    assert "actor_rollout_ref.model.mtp.method='qwen3_next_mtp' is invalid" in msg
    assert "names the Qwen3-Next drafter but the model is DeepSeek-V3" in msg
    assert "valid choices are mtp, deepseek_mtp" in msg


@pytest.mark.parametrize("method", ["eagle", "ngram", "draft_model", "MTP"])
def test_vllm_non_mtp_method_is_rejected(method, run):
    config, mtp = run("mimo", "vllm", mtp={"method": method})
    with pytest.raises(MtpConfigError, match=rf"mtp\.method='{method}' is invalid: .*valid choices are mtp, mimo_mtp"):
        plan_speculative_rollout(config, mtp, PINNED["vllm"])


@pytest.mark.parametrize("tokens", [0, -1, True, "2", 1.5])
def test_vllm_num_speculative_tokens_must_be_a_positive_int(tokens, run):
    config, mtp = run("mimo", "vllm", mtp={"num_speculative_tokens": tokens})
    with pytest.raises(MtpConfigError, match=r"num_speculative_tokens=.* is invalid: expected an integer >= 1"):
        plan_speculative_rollout(config, mtp, PINNED["vllm"])


@pytest.mark.parametrize("tokens, ok", [(1, True), (2, True), (3, False), (4, True), (5, False), (6, True)])
def test_vllm_multi_depth_head_needs_a_multiple_beyond_its_depth(tokens, ok, run):
    config, mtp = run("deepseek_v3", "vllm", depths=2, mtp={"num_speculative_tokens": tokens})
    if ok:
        plan = plan_speculative_rollout(config, mtp, PINNED["vllm"])
        assert plan.args["speculative_config"]["num_speculative_tokens"] == tokens
        assert any("uses only MTP layer 1 of the 2" in n for n in plan.notes)
    else:
        with pytest.raises(MtpConfigError, match=r"valid choices are 1\.\.2 or a multiple of 2"):
            plan_speculative_rollout(config, mtp, PINNED["vllm"])


@pytest.mark.parametrize("family", ["qwen3_next", "qwen3_5"])
def test_vllm_no_divisibility_rule_where_vllm_reads_no_layer_count(family, run):
    # vLLM reads Qwen3-Next's n_predict from num_nextn_predict_layers, which its configs lack, and
    # Qwen3.5's from a top-level mtp_num_hidden_layers, which the multimodal configs keep under
    # text_config (vLLM 0.24.0's SpeculativeConfig accepted K=3 for both with 2 layers, on CPU).
    config, mtp = run(family, "vllm", depths=2, mtp={"num_speculative_tokens": 3})
    assert plan_speculative_rollout(config, mtp, PINNED["vllm"]).args["speculative_config"]["num_speculative_tokens"] == 3


def test_vllm_has_no_drafter_for_text_only_qwen3_5(run):
    # vLLM 0.24.0 maps only model_type qwen3_5 / qwen3_5_moe to its Qwen3.5 MTP drafter; a
    # qwen3_5_text config fails at start-up ("Model architectures ['Qwen3_5ForCausalLM'] are not supported").
    text_only = {"architectures": ["Qwen3_5ForCausalLM"], "model_type": "qwen3_5_text", "mtp_num_hidden_layers": 1}
    config, mtp = run(None, "vllm", config_json=text_only)
    with pytest.raises(MtpConfigError, match=r"model\.path='.*' is invalid: vLLM builds the Qwen3\.5 MTP drafter only "
                                             r"for configs whose model_type or first architecture is one of qwen3_5, qwen3_5_moe"):
        plan_speculative_rollout(config, mtp, PINNED["vllm"])


def test_vllm_engine_kwargs_win_and_errors_name_their_key(run):
    config, mtp = run(
        "glm4_moe", "vllm",
        engine_kwargs={"speculative_config": {"num_speculative_tokens": 3, "method": None, "draft_tensor_parallel_size": 1}},
    )
    plan = plan_speculative_rollout(config, mtp, PINNED["vllm"])
    assert plan.args == {"speculative_config": {"method": "mtp", "num_speculative_tokens": 3, "draft_tensor_parallel_size": 1}}
    assert vllm_problems(plan.args) == []

    config, mtp = run("glm4_moe", "vllm", engine_kwargs={"speculative_config": json.dumps({"num_speculative_tokens": 0})})
    with pytest.raises(MtpConfigError, match=r"engine_kwargs\.vllm\.speculative_config\.num_speculative_tokens=0 is invalid"):
        plan_speculative_rollout(config, mtp, PINNED["vllm"])

    config, mtp = run("glm4_moe", "vllm", engine_kwargs={"speculative_config": {"method": "eagle3"}})
    with pytest.raises(MtpConfigError, match=r"speculative_config\.method='eagle3' is invalid"):
        plan_speculative_rollout(config, mtp, PINNED["vllm"])

    config, mtp = run("glm4_moe", "vllm", engine_kwargs={"speculative_config": "{not json"})
    with pytest.raises(MtpConfigError, match=r"expected a mapping or a JSON object"):
        plan_speculative_rollout(config, mtp, PINNED["vllm"])


def test_vllm_separate_draft_model_is_rejected(run):
    config, mtp = run("mimo", "vllm", engine_kwargs={"speculative_config": {"model": "/elsewhere/eagle-head"}})
    with pytest.raises(MtpConfigError, match=r"speculative_config\.model='/elsewhere/eagle-head' is invalid: .*actor's own MTP head"):
        plan_speculative_rollout(config, mtp, PINNED["vllm"])
    # the actor's own checkpoint is what vLLM would load anyway
    own = config["actor_rollout_ref"]["model"]["path"]
    config["actor_rollout_ref"]["rollout"]["engine_kwargs"]["vllm"] = {"speculative_config": {"model": own}}
    assert plan_speculative_rollout(config, mtp, PINNED["vllm"]).args["speculative_config"]["model"] == own


def test_vllm_delta_weight_transfer_is_rejected(run):
    config, mtp = run("mimo", "vllm", rollout={"checkpoint_engine": {"backend": "delta_sharded"}})
    with pytest.raises(MtpConfigError, match=r"checkpoint_engine\.backend='delta_sharded' is invalid: .*does not support speculative"):
        plan_speculative_rollout(config, mtp, PINNED["vllm"])


def test_vllm_without_generic_mtp_would_never_sync_the_drafter(run):
    config, mtp = run("deepseek_v3", "vllm")
    with pytest.raises(MtpConfigError, match=r"vllm 0\.10\.2 .*never 'mtp'.*use vllm >= 0\.11\.0"):
        plan_speculative_rollout(config, mtp, version("vllm", "0.10.2"))
    assert plan_speculative_rollout(config, mtp, version("vllm", "0.11.0")).args["speculative_config"]["method"] == "mtp"


def test_vllm_versions_change_the_choices(run):
    # qwen3_5_mtp (and the Qwen3.5 drafter) arrived in vLLM 0.17.0; mimo_mtp is accepted from 0.11.0
    assert vllm_method_choices(version("vllm", "0.16.0"), "qwen3_5") == ("mtp",)
    assert vllm_method_choices(version("vllm", "0.17.0"), "qwen3_5") == ("mtp", "qwen3_5_mtp")
    assert vllm_method_choices(version("vllm", "0.10.2"), None) == ("deepseek_mtp", "qwen3_next_mtp")
    config, mtp = run("qwen3_5", "vllm")
    with pytest.raises(MtpConfigError, match=r"vllm 0\.16\.0 .*has no MTP drafter for Qwen3\.5 \(added in vLLM 0\.17\.0\)"):
        plan_speculative_rollout(config, mtp, version("vllm", "0.16.0"))
    config, mtp = run(None, "vllm", config_json={"model_type": "x"}, mtp={"method": "qwen3_5_mtp"})
    with pytest.raises(MtpConfigError, match=r"does not know it \(added in vLLM 0\.17\.0\); valid choices are mtp, "):
        plan_speculative_rollout(config, mtp, version("vllm", "0.16.0"))


def test_installed_verl_keeps_the_vllm_drafter_across_sleep(tmp_path):
    # verl 0.9.1's vLLMHttpServer._resolve_sleep_level returns 1 when mtp.enable_rollout is on
    assert verl_keeps_vllm_drafter_on_sleep() is True
    level_two = tmp_path / "server.py"
    level_two.write_text("class vLLMHttpServer:\n    def _resolve_sleep_level(self):\n        return 2\n")
    assert verl_keeps_vllm_drafter_on_sleep(str(level_two)) is False
    no_method = tmp_path / "server2.py"
    no_method.write_text("class vLLMHttpServer:\n    async def sleep(self):\n        await self.engine.sleep(level=2)\n")
    assert verl_keeps_vllm_drafter_on_sleep(str(no_method)) is False


def test_vllm_free_cache_engine_off_is_noted(run):
    config, mtp = run("mimo", "vllm", rollout={"free_cache_engine": False})
    plan = plan_speculative_rollout(config, mtp, PINNED["vllm"])
    assert any("never sleeps" in n for n in plan.notes) and not any("level 1" in n for n in plan.notes)


# --- SGLang: impossible combinations ------------------------------------------------------------------


def test_sglang_nextn_is_accepted_as_eagle(run):
    config, mtp = run("deepseek_v3", "sglang", mtp={"speculative_algorithm": "NEXTN"})
    plan = plan_speculative_rollout(config, mtp, PINNED["sglang"])
    assert plan.args["speculative_algorithm"] == "NEXTN" and sglang_problems(plan.args) == []
    assert any("NEXTN as EAGLE" in n for n in plan.notes)


@pytest.mark.parametrize("algorithm", ["EAGLE3", "STANDALONE", "NGRAM", "medusa"])
def test_sglang_non_mtp_algorithm_is_rejected(algorithm, run):
    config, mtp = run("mimo", "sglang", mtp={"speculative_algorithm": algorithm})
    with pytest.raises(MtpConfigError, match=rf"speculative_algorithm='{algorithm}' is invalid: .*valid choices are EAGLE, NEXTN"):
        plan_speculative_rollout(config, mtp, PINNED["sglang"])


def test_sglang_chain_needs_steps_plus_one_draft_tokens(run):
    config, mtp = run("mimo", "sglang", mtp={"speculative_num_steps": 1})  # verl's default draft tokens stay 4
    with pytest.raises(MtpConfigError) as err:
        plan_speculative_rollout(config, mtp, PINNED["sglang"])
    assert "mtp.speculative_num_draft_tokens=4 is invalid" in str(err.value)
    assert "valid choice is 2 (speculative_num_steps=1)" in str(err.value)


@pytest.mark.parametrize("draft, ok", [(1, False), (2, True), (8, True), (11, True), (12, False)])
def test_sglang_tree_draft_tokens_bounded_by_the_candidates(draft, ok, run):
    assert sglang_max_draft_tokens(3, 2) == 11  # root + 2 + 2 * 2**2
    config, mtp = run("deepseek_v3", "sglang", mtp={"speculative_num_steps": 3, "speculative_eagle_topk": 2,
                                                     "speculative_num_draft_tokens": draft})
    if ok:
        plan = plan_speculative_rollout(config, mtp, PINNED["sglang"])
        assert plan.args["speculative_num_draft_tokens"] == draft and sglang_problems(plan.args) == []
        assert any("overlap scheduler off" in n for n in plan.notes)
    else:
        with pytest.raises(MtpConfigError, match=r"valid choices are 2\.\.11"):
            plan_speculative_rollout(config, mtp, PINNED["sglang"])


@pytest.mark.parametrize("key", ["speculative_num_steps", "speculative_eagle_topk", "speculative_num_draft_tokens"])
def test_sglang_zero_counts_are_rejected(key, run):
    config, mtp = run("mimo", "sglang", mtp={key: 0})
    with pytest.raises(MtpConfigError, match=rf"mtp\.{key}=0 is invalid: expected an integer >= 1"):
        plan_speculative_rollout(config, mtp, PINNED["sglang"])


def test_sglang_engine_kwargs_that_verl_would_overwrite(run):
    config, mtp = run("mimo", "sglang", engine_kwargs={"speculative_num_steps": 5})
    with pytest.raises(MtpConfigError, match=r"engine_kwargs\.sglang\.speculative_num_steps=5 is invalid: verl 0\.9\.1 "
                                             r"replaces it with actor_rollout_ref\.model\.mtp\.speculative_num_steps=3"):
        plan_speculative_rollout(config, mtp, PINNED["sglang"])
    # the same value, or the alias of the same algorithm, is no conflict
    config, mtp = run("mimo", "sglang", engine_kwargs={"speculative_num_steps": 3, "speculative_algorithm": "nextn"})
    assert plan_speculative_rollout(config, mtp, PINNED["sglang"]).args["speculative_num_steps"] == 3


@pytest.mark.parametrize("key", ["enable_weights_cpu_backup", "enable_draft_weights_cpu_backup"])
def test_sglang_cpu_backup_off_would_lose_the_drafter(key, run):
    config, mtp = run("glm4_moe", "sglang", engine_kwargs={key: False})
    with pytest.raises(MtpConfigError, match=rf"sglang\.{key}=False is invalid: without the CPU backup SGLang loses"):
        plan_speculative_rollout(config, mtp, PINNED["sglang"])


def test_sglang_attention_backend_limits_on_tree_drafts(run):
    tree = {"speculative_num_steps": 2, "speculative_eagle_topk": 2, "speculative_num_draft_tokens": 4}
    config, mtp = run("mimo", "sglang", mtp=tree, engine_kwargs={"attention_backend": "trtllm_mha"})
    with pytest.raises(MtpConfigError, match=r"trtllm_mha .*only top-k 1"):
        plan_speculative_rollout(config, mtp, PINNED["sglang"])
    config, mtp = run("mimo", "sglang", mtp=tree, engine_kwargs={"attention_backend": "triton", "page_size": 16})
    with pytest.raises(MtpConfigError, match=r"page_size=16 on the triton attention backend"):
        plan_speculative_rollout(config, mtp, PINNED["sglang"])
    # verl's default backend for SGLang 0.5.12 (flashinfer) takes paged tree drafts
    config, mtp = run("mimo", "sglang", mtp=tree, engine_kwargs={"page_size": 16})
    assert plan_speculative_rollout(config, mtp, PINNED["sglang"]).args["speculative_eagle_topk"] == 2


def test_sglang_versions_and_architectures(run):
    config, mtp = run("mimo", "sglang")
    with pytest.raises(MtpConfigError, match=r"sglang 0\.5\.5 .*needs sglang >= 0\.5\.6"):
        plan_speculative_rollout(config, mtp, version("sglang", "0.5.5"))
    config, mtp = run("qwen3_5", "sglang")
    with pytest.raises(MtpConfigError, match=r"no MTP draft model for Qwen3\.5 \(added in SGLang 0\.5\.9\)"):
        plan_speculative_rollout(config, mtp, version("sglang", "0.5.8"))
    assert plan_speculative_rollout(config, mtp, version("sglang", "0.5.9")).args["speculative_algorithm"] == "EAGLE"
    text_only = {"architectures": ["Qwen3_5ForCausalLM"], "model_type": "qwen3_5_text", "mtp_num_hidden_layers": 1}
    config, mtp = run(None, "sglang", config_json=text_only)
    with pytest.raises(MtpConfigError, match=r"no MTP draft model in SGLang; SGLang drafts Qwen3\.5 only for "
                                             r"Qwen3_5ForConditionalGeneration, Qwen3_5MoeForConditionalGeneration"):
        plan_speculative_rollout(config, mtp, PINNED["sglang"])


@pytest.mark.parametrize("family", ["qwen3_next", "qwen3_5"])
def test_sglang_hybrid_models_need_the_radix_cache_off(family, run):
    # SGLang 0.5.12's ServerArgs (on CPU) raised "Speculative decoding for Qwen3NextForCausalLM is not
    # compatible with radix cache when using --mamba-scheduler-strategy no_buffer" for verl's arguments.
    config, mtp = run(family, "sglang")
    with pytest.raises(MtpConfigError) as err:
        plan_speculative_rollout(config, mtp, PINNED["sglang"])
    msg = str(err.value)
    assert "engine_kwargs.sglang.disable_radix_cache=None is invalid" in msg
    assert "valid choices are +actor_rollout_ref.rollout.engine_kwargs.sglang.disable_radix_cache=True" in msg
    # radix cache off: fine; extra_buffer: fine when its track interval covers the draft, with a note
    config, mtp = run(family, "sglang", engine_kwargs={"disable_radix_cache": True})
    assert plan_speculative_rollout(config, mtp, PINNED["sglang"]).args["speculative_algorithm"] == "EAGLE"
    config, mtp = run(family, "sglang", engine_kwargs={"mamba_scheduler_strategy": "extra_buffer"})
    assert any("SGLANG_ENABLE_SPEC_V2=1" in n for n in plan_speculative_rollout(config, mtp, PINNED["sglang"]).notes)
    config, mtp = run(family, "sglang", engine_kwargs={"mamba_scheduler_strategy": "extra_buffer", "mamba_track_interval": 2})
    with pytest.raises(MtpConfigError, match=r"mamba_track_interval=2 is invalid: .*valid choices are integers >= 4"):
        plan_speculative_rollout(config, mtp, PINNED["sglang"])
    # up to SGLang 0.5.9 the engine turned the radix cache off by itself
    config, mtp = run(family, "sglang")
    plan = plan_speculative_rollout(config, mtp, version("sglang", "0.5.9"))
    assert any("turns its radix cache off" in n for n in plan.notes)


def test_sglang_separate_draft_model_is_rejected(run):
    config, mtp = run("mimo", "sglang", engine_kwargs={"speculative_draft_model_path": "/other"})
    with pytest.raises(MtpConfigError, match=r"speculative_draft_model_path='/other' is invalid"):
        plan_speculative_rollout(config, mtp, PINNED["sglang"])


# --- wiring: validation, explain, version ---------------------------------------------------------------


def test_run_validation_fails_early_on_a_bad_combination(run):
    config, _ = run("deepseek_v3", "vllm")
    config["actor_rollout_ref"]["model"]["mtp"] = {"enable": True, "enable_rollout": True, "method": "mimo_mtp"}
    with pytest.raises(MtpConfigError, match=r"names the MiMo drafter but the model is DeepSeek-V3"):
        validate_mtp_run_config(config)


def test_off_and_non_speculative_engines(run):
    config, mtp = run("mimo", "vllm")
    off = ExtendedMtpConfig(enable=True, enable_rollout=False)
    assert plan_speculative_rollout(config, off) is None
    assert speculative_engine_args(off, "vllm") == {}
    with pytest.raises(MtpConfigError, match=r"rollout\.name='hf'; valid choices are vllm, sglang"):
        speculative_engine_args(mtp, "hf")


def test_engine_version_is_detected_or_pinned():
    for engine in ("vllm", "sglang"):
        v = detect_engine_version(engine)
        try:
            installed = metadata.version(engine)
        except metadata.PackageNotFoundError:
            installed = None
        assert v.installed == (installed is not None)
        assert v.version == (installed or PINNED_ENGINE_VERSIONS[engine])
        assert ("(installed here)" in v.describe()) == v.installed
        assert (f"verl 0.9.1's [{engine}] extra pins" in v.describe()) == (not v.installed)


def test_explain_prints_the_version_the_args_were_built_for(run):
    from verl_mtp.tools.explain import build_plan, compose_run_config, render_plan

    config, _ = run("mimo", "vllm")
    cfg = compose_run_config([
        f"actor_rollout_ref.model.path={config['actor_rollout_ref']['model']['path']}",
        "actor_rollout_ref.model.mtp.enable=True",
        "actor_rollout_ref.model.mtp.enable_rollout=True",
        "actor_rollout_ref.model.mtp.num_speculative_tokens=2",
        "actor_rollout_ref.rollout.name=vllm",
    ])
    plan = build_plan(cfg)
    assert plan.speculative_args == {"speculative_config": {"method": "mtp", "num_speculative_tokens": 2}}
    text = render_plan(plan)
    assert f"engine args for   {detect_engine_version('vllm').describe()}" in text
    assert "note: speculative rollout: vLLM drafts all 2 positions with the first MTP layer" in text


# --- the runtime facts agree with the engines' source (schema) ------------------------------------------


def test_engine_facts_match_the_pinned_sources():
    vllm, sglang = SCHEMA["vllm"], SCHEMA["sglang"]
    assert vllm["version"] == PINNED_ENGINE_VERSIONS["vllm"] and sglang["version"] == PINNED_ENGINE_VERSIONS["sglang"]
    assert vllm["mtp_aliases_rewritten_to_mtp"] and vllm["num_speculative_tokens_multiple_of_n_predict"]
    assert set(vllm_method_choices(PINNED["vllm"], None)) <= set(vllm["mtp_methods"])
    for family, facts in ENGINE_FACTS.items():
        cfg = FAMILY_CONFIGS[family]
        assert detect_family(cfg).name == family
        # vLLM maps the target's model_type or architecture to the family's MTP draft model type
        draft = vllm["mtp_draft_model_type"]
        assert facts.vllm_alias in (draft.get(cfg["model_type"]), draft.get(cfg["architectures"][0]))
        assert all(draft[target] == facts.vllm_alias for target in facts.vllm_targets)
        for arch, draft_arch in facts.sglang_draft_archs.items():
            assert sglang["mtp_draft_architecture"][arch] == draft_arch
    assert sglang["hybrid_speculation_rejects_radix_cache"]  # hence the disable_radix_cache rule
    for name in SGLANG_MTP_ALGORITHMS:
        assert sglang["speculative_algorithm_aliases"][name] == "EAGLE"
        assert sglang["speculative_algorithm_aliases"][name] in sglang["speculative_algorithms"]


def test_schema_problems_catch_bad_dicts():
    # the schema checks are the CI stand-in for the engines' classes: they must reject what those reject
    assert engine_schema.vllm_schema_problems({"speculative_config": {"method": "mtp", "num_speculative_tokens": 0}}, SCHEMA["vllm"])
    assert engine_schema.vllm_schema_problems({"speculative_config": {"method": "eagle", "num_speculative_tokens": 1}}, SCHEMA["vllm"])
    assert engine_schema.vllm_schema_problems({"speculative_config": {"method": "mtp", "num_speculative_tokens": 1, "steps": 2}}, SCHEMA["vllm"])
    good = speculative_engine_args(ExtendedMtpConfig(enable=True, enable_rollout=True), "sglang")
    assert engine_schema.sglang_schema_problems(good, SCHEMA["sglang"]) == []
    assert engine_schema.sglang_schema_problems({**good, "speculative_num_steps": "3"}, SCHEMA["sglang"])
    assert engine_schema.sglang_schema_problems({**good, "enable_draft_weights_cpu_backup": None}, SCHEMA["sglang"])
    assert engine_schema.sglang_schema_problems({**good, "speculative_algorithm": "MEDUSA"}, SCHEMA["sglang"])
    assert engine_schema.sglang_schema_problems({**good, "speculative_num_step": 3}, SCHEMA["sglang"])


def test_schema_is_derived_from_source(tmp_path):
    # A miniature of the two engines' files, in their shapes: the deriver reads fields, literals and renames.
    vllm_dir = tmp_path / "v" / "vllm" / "config"
    vllm_dir.mkdir(parents=True)
    (vllm_dir / "speculative.py").write_text(
        "from typing import Literal\n"
        "MTPModelTypes = Literal['deepseek_mtp', 'mtp']\n"
        "Eagle = Literal['eagle', MTPModelTypes]\n"
        "SpeculativeMethod = Literal['ngram', Eagle]\n"
        "class SpeculativeConfig:\n"
        "    num_speculative_tokens: int = Field(default=None, gt=0)\n"
        "    method: SpeculativeMethod | None = None\n"
        "    @staticmethod\n"
        "    def hf_config_override(hf_config):\n"
        "        if hf_config.model_type in ('deepseek_v3', 'kimi'):\n"
        "            hf_config.model_type = 'deepseek_mtp'\n"
        "        if hf_config.architectures[0] == 'MiMoForCausalLM':\n"
        "            hf_config.model_type = 'mimo_mtp'\n"
        "    def __post_init__(self):\n"
        "        logger.warning('method `%s` is deprecated and replaced with mtp.', self.method)\n"
    )
    (tmp_path / "v" / "vllm-9.9.9.dist-info").mkdir()
    (tmp_path / "v" / "vllm-9.9.9.dist-info" / "METADATA").write_text("Name: vllm\nVersion: 9.9.9\n")
    schema = engine_schema.derive_vllm_schema(str(tmp_path / "v"))
    assert schema["version"] == "9.9.9"
    assert schema["speculative_config_fields"] == ["method", "num_speculative_tokens"]
    assert schema["methods"] == ["ngram", "eagle", "deepseek_mtp", "mtp"]
    assert schema["mtp_methods"] == ["deepseek_mtp", "mtp"]
    assert schema["num_speculative_tokens_greater_than"] == 0 and schema["mtp_aliases_rewritten_to_mtp"]
    assert schema["num_speculative_tokens_multiple_of_n_predict"] is False
    assert schema["mtp_draft_model_type"] == {"MiMoForCausalLM": "mimo_mtp", "deepseek_v3": "deepseek_mtp", "kimi": "deepseek_mtp"}


# --- draft_sample_method (vLLM >= 0.24: greedy | probabilistic; SGLang: none) ---------------------------


@pytest.mark.parametrize("value", ["top_p", "Greedy", "", 1])
def test_draft_sample_method_bad_value_is_named_with_its_choices(value):
    with pytest.raises(MtpConfigError) as err:
        ExtendedMtpConfig(enable=True, enable_rollout=True, draft_sample_method=value)
    assert f"actor_rollout_ref.model.mtp.draft_sample_method={value!r}" in str(err.value)
    assert "valid choices are greedy, probabilistic, or null" in str(err.value)


def test_draft_sample_method_defaults_to_the_engines_own():
    assert ExtendedMtpConfig().draft_sample_method is None
    from verl_mtp.tools.explain import compose_run_config

    assert compose_run_config([]).actor_rollout_ref.model.mtp.draft_sample_method is None


@pytest.mark.parametrize("method", ["greedy", "probabilistic"])
def test_vllm_draft_sample_method_is_passed_and_carried_where_verl_reads(method, run):
    from verl_mtp.rollout.spec_args import carry_into_engine_kwargs

    config, mtp = run("mimo", "vllm", mtp={"draft_sample_method": method})
    plan = plan_speculative_rollout(config, mtp, version("vllm", "0.24.0"))
    spec = plan.args["speculative_config"]
    assert spec == {"method": "mtp", "num_speculative_tokens": 1, "draft_sample_method": method}
    assert vllm_problems(plan.args) == []
    assert plan.draft_sampling.method == method and plan.draft_sampling.source.endswith("mtp.draft_sample_method")
    # verl 0.9.1 reads only mtp.method / num_speculative_tokens: the driver copies the setting into
    # engine_kwargs, from where verl's own merge (run from its source) sends it.
    config["actor_rollout_ref"]["model"]["mtp"] = {"enable": True, "enable_rollout": True, "draft_sample_method": method}
    validate_mtp_run_config(config)
    user = config["actor_rollout_ref"]["rollout"]["engine_kwargs"]["vllm"]["speculative_config"]
    assert user == {"draft_sample_method": method}
    assert verl_build_mtp_speculative_config()(mtp.method, mtp.num_speculative_tokens, user) == spec
    carry_into_engine_kwargs(config, mtp)  # idempotent: the driver may validate twice
    assert plan_speculative_rollout(config, mtp, version("vllm", "0.24.0")).args == plan.args


def test_vllm_draft_sample_method_carried_into_a_composed_config():
    from verl_mtp.tools.explain import compose_run_config

    cfg = compose_run_config(["actor_rollout_ref.model.mtp.enable=True", "actor_rollout_ref.model.mtp.enable_rollout=True",
                              "actor_rollout_ref.model.mtp.draft_sample_method=probabilistic",
                              "actor_rollout_ref.rollout.name=vllm"])
    validate_mtp_run_config(cfg)
    assert cfg.actor_rollout_ref.rollout.engine_kwargs.vllm.speculative_config.draft_sample_method == "probabilistic"


def test_vllm_draft_sample_method_in_engine_kwargs_is_checked(run):
    config, mtp = run("mimo", "vllm", engine_kwargs={"speculative_config": {"draft_sample_method": "top_k"}})
    with pytest.raises(MtpConfigError, match=r"engine_kwargs\.vllm\.speculative_config\.draft_sample_method='top_k' "
                                             r"is invalid: valid choices are greedy, probabilistic"):
        plan_speculative_rollout(config, mtp)
    config, mtp = run("mimo", "vllm", mtp={"draft_sample_method": "greedy"},
                      engine_kwargs={"speculative_config": {"draft_sample_method": "probabilistic"}})
    with pytest.raises(MtpConfigError, match=r"contradicts actor_rollout_ref\.model\.mtp\.draft_sample_method='greedy'"):
        plan_speculative_rollout(config, mtp)


def test_vllm_without_draft_sample_method_refuses_it(run):
    config, mtp = run("mimo", "vllm", mtp={"draft_sample_method": "probabilistic"})
    with pytest.raises(MtpConfigError, match=r"mtp\.draft_sample_method='probabilistic' is invalid: vllm 0\.20\.0 .*has "
                                             r"no speculative_config\.draft_sample_method.*vllm >= 0\.24\.0"):
        plan_speculative_rollout(config, mtp, version("vllm", "0.20.0"))
    config, mtp = run("mimo", "vllm")  # unset: nothing is passed, any vLLM with MTP is fine
    plan = plan_speculative_rollout(config, mtp, version("vllm", "0.20.0"))
    assert "draft_sample_method" not in plan.args["speculative_config"]
    assert plan.draft_sampling.describe() == "greedy (vLLM's default): acceptance p(argmax q)"


def test_draft_sample_method_is_a_field_of_the_pinned_vllm():
    assert "draft_sample_method" in SCHEMA["vllm"]["speculative_config_fields"]
    assert "num_speculative_tokens_per_batch_size" in SCHEMA["vllm"]["speculative_config_fields"]


def test_sglang_has_no_probabilistic_drafts(run):
    config, mtp = run("mimo", "sglang", mtp={"draft_sample_method": "probabilistic"})
    with pytest.raises(MtpConfigError, match=r"draft_sample_method='probabilistic' is invalid: SGLang has no equivalent"):
        plan_speculative_rollout(config, mtp)
    for method in ("greedy", None):
        config, mtp = run("mimo", "sglang", mtp={"draft_sample_method": method})
        plan = plan_speculative_rollout(config, mtp)
        assert not any("sample" in key for key in plan.args)  # SGLang gets nothing for it
        assert sglang_problems(plan.args) == []
        assert plan.draft_sampling.method == "greedy" and "no draft_sample_method argument" in plan.draft_sampling.source


def test_greedy_drafts_at_temperature_get_the_probabilistic_recommendation(run):
    config, mtp = run("mimo", "vllm", rollout={"temperature": 1.0})
    notes = plan_speculative_rollout(config, mtp).notes
    assert any("draft_sample_method=probabilistic for such heads" in n for n in notes)
    for mtp_values, rollout in (({"draft_sample_method": "probabilistic"}, {"temperature": 1.0}), ({}, {"temperature": 0}),
                                ({"draft_sample_method": "greedy"}, {"temperature": 1.0})):  # chosen: no advice
        config, mtp = run("mimo", "vllm", mtp=mtp_values, rollout=rollout)
        assert not any("for such heads" in n for n in plan_speculative_rollout(config, mtp).notes)


def test_explain_prints_the_draft_rule_and_its_acceptance(run):
    from verl_mtp.tools.explain import build_plan, compose_run_config, render_plan

    config, _ = run("mimo", "vllm")
    base = [f"actor_rollout_ref.model.path={config['actor_rollout_ref']['model']['path']}",
            "actor_rollout_ref.model.mtp.enable=True", "actor_rollout_ref.model.mtp.enable_rollout=True",
            "actor_rollout_ref.rollout.name=vllm"]
    text = render_plan(build_plan(compose_run_config(base + ["actor_rollout_ref.model.mtp.draft_sample_method=probabilistic"])))
    assert ("draft tokens      probabilistic (actor_rollout_ref.model.mtp.draft_sample_method): acceptance "
            "sum_x min(p(x), q(x)) = 1 - TV(p, q)") in text
    assert '"draft_sample_method": "probabilistic"' in text
    text = render_plan(build_plan(compose_run_config(base)))
    assert "draft tokens      greedy (vLLM's default): acceptance p(argmax q)" in text
    assert "draft_sample_method=probabilistic for such heads" in text  # verl's rollout temperature is 1.0


# --- num_speculative_tokens_per_batch_size (vLLM >= 0.24) ------------------------------------------------


def test_spec_control_batch_size_schedule_is_planned(run):
    from verl_mtp.rollout.spec_control import vllm_batch_size_schedule

    schedule = [list(e) for e in vllm_batch_size_schedule(2, 5)]
    config, mtp = run("mimo", "vllm", mtp={"num_speculative_tokens": 2},
                      engine_kwargs={"speculative_config": {"num_speculative_tokens_per_batch_size": schedule}})
    plan = plan_speculative_rollout(config, mtp, version("vllm", "0.24.0"))
    assert plan.args["speculative_config"]["num_speculative_tokens_per_batch_size"] == schedule
    assert vllm_problems(plan.args) == []
    with pytest.raises(MtpConfigError, match=r"num_speculative_tokens_per_batch_size=.* vllm 0\.20\.0 .*has no batch-size schedule"):
        plan_speculative_rollout(config, mtp, version("vllm", "0.20.0"))


@pytest.mark.parametrize("schedule, match", [
    ([], "non-empty list"),
    ("1-4:2", "non-empty list"),
    ([[1, 4]], "is not three integers"),
    ([[1, 4, 1.5]], "is not three integers"),
    ([[0, 4, 2]], "out of range"),
    ([[3, 2, 2]], "out of range"),
    ([[1, 4, -1]], "out of range"),
    ([[2, 8, 2]], "no range covers batch size 1"),
    ([[1, 4, 2], [4, 8, 0]], "ranges overlap at batch size 4"),
    ([[1, 4, 3]], r"caps each k at num_speculative_tokens=2"),
])
def test_bad_batch_size_schedules_are_refused(schedule, match, run):
    config, mtp = run("mimo", "vllm", mtp={"num_speculative_tokens": 2},
                      engine_kwargs={"speculative_config": {"num_speculative_tokens_per_batch_size": schedule}})
    with pytest.raises(MtpConfigError, match=r"engine_kwargs\.vllm\.speculative_config\.num_speculative_tokens_per_batch_size="):
        plan_speculative_rollout(config, mtp)
    with pytest.raises(MtpConfigError, match=match):
        plan_speculative_rollout(config, mtp)


# --- the plans the engine leg feeds to vLLM's real SpeculativeConfig are explain's plans -----------------


def verl_build_mtp_speculative_config():
    """verl 0.9.1's own merge function, run from its source: its module imports vLLM at the top."""
    import ast
    from collections.abc import Mapping

    spec = importlib.util.find_spec("verl")
    path = f"{list(spec.submodule_search_locations)[0]}/workers/rollout/vllm_rollout/utils.py"
    with open(path) as f:
        tree = ast.parse(f.read())
    func = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "build_mtp_speculative_config")
    namespace = {"json": json, "Mapping": Mapping, "Any": typing.Any}
    exec(compile(ast.Module(body=[func], type_ignores=[]), path, "exec"), namespace)
    return namespace["build_mtp_speculative_config"]


def test_engine_leg_mtp_stand_in_has_verls_defaults():
    from verl_mtp.testing.vllm_spec_config import MTP_DEFAULTS, mtp_settings

    real = ExtendedMtpConfig(enable=True, enable_rollout=True)
    assert {k: getattr(real, k) for k in MTP_DEFAULTS} == MTP_DEFAULTS
    assert mtp_settings().speculative_rollout and not mtp_settings(enable_rollout=False).speculative_rollout


def test_engine_leg_cases_are_explains_plans(tmp_path):
    """For every case the engine leg checks: ``verl-mtp explain`` (Hydra-composed config, the real
    ExtendedMtpConfig, the driver's validation) plans the same arguments, or refuses with the same
    error, as the verl-free planner the engine leg runs; and what the engine leg sends for a
    refusal is verl's own merge."""
    from omegaconf import OmegaConf, open_dict

    from verl_mtp.testing.vllm_spec_config import CASES, make_checkpoints, plan_case, verl_merge
    from verl_mtp.tools.explain import build_plan, compose_run_config

    paths = make_checkpoints(str(tmp_path), export=False)
    base = compose_run_config(["actor_rollout_ref.model.mtp.enable=True", "actor_rollout_ref.model.mtp.enable_rollout=True",
                               "actor_rollout_ref.rollout.name=vllm", "actor_rollout_ref.rollout.max_num_seqs=8"])
    merge = verl_build_mtp_speculative_config()
    for case in CASES:
        cfg = copy_config(base)
        with open_dict(cfg):
            OmegaConf.update(cfg, "actor_rollout_ref.model.path", paths[case.checkpoint])
            for key, value in case.mtp.items():
                OmegaConf.update(cfg, f"actor_rollout_ref.model.mtp.{key}", value)
            OmegaConf.update(cfg, "actor_rollout_ref.rollout.engine_kwargs.vllm", case.engine_kwargs, merge=False)
            for key, value in case.rollout.items():
                OmegaConf.update(cfg, f"actor_rollout_ref.rollout.{key}", value, merge=True)
        ours = plan_case(case, paths[case.checkpoint])
        method, tokens = case.mtp.get("method", "mtp"), case.mtp.get("num_speculative_tokens", 1)
        assert verl_merge(case) == merge(method, tokens, _carried(case)), case.name
        if case.checkpoint.startswith("qwen3_5_text"):
            continue  # the pinned vLLM 0.24 (what both plan for here) has no text-only Qwen3.5 drafter
        try:
            explained = build_plan(cfg).speculative_args
        except MtpConfigError as exc:
            assert "refused" in ours, f"{case.name}: explain refused ({exc}), the engine leg's planner did not"
            assert re.search(case.refused, str(exc)), (case.name, str(exc))
            continue
        assert "args" in ours, f"{case.name}: explain planned {explained}, the engine leg's planner refused"
        assert explained == ours["args"], case.name
        # ... and is what verl sends: its own merge over the engine_kwargs the driver check left.
        user = OmegaConf.to_container(cfg.actor_rollout_ref.rollout.engine_kwargs.vllm).get("speculative_config")
        assert merge(method, tokens, user) == explained["speculative_config"], case.name


def copy_config(cfg):
    from omegaconf import OmegaConf

    return OmegaConf.create(OmegaConf.to_container(cfg))


def _carried(case):
    user = dict(case.engine_kwargs.get("speculative_config") or {})
    if case.mtp.get("draft_sample_method") is not None:
        user.setdefault("draft_sample_method", case.mtp["draft_sample_method"])
    return user
