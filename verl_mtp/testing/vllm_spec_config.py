"""verl-mtp's speculative plans fed to vLLM's real config classes (a test tool; no engine is started).

``CASES`` are run configs (family, ``mtp.*`` values, ``rollout.engine_kwargs.vllm``, rollout keys)
that ``verl-mtp explain`` plans or refuses. For each one, ``check_case`` asks
``verl_mtp.rollout.spec_args`` for the plan and hands the speculative config verl would send to
``vllm.engine.arg_utils.EngineArgs(...).create_engine_config()``: the real ``ModelConfig`` of the
checkpoint, the real ``SpeculativeConfig`` (its pydantic field checks and ``__post_init__``, which
builds the draft model's config from the checkpoint) and, for a batch-size schedule, the lookup
vLLM's scheduler builds from it at start-up (``build_dynamic_sd_schedule_lookup``), which
``SpeculativeConfig`` does not check. MiMo and DeepSeek-V3 use checkpoints exported by verl-mtp's
bridges (``vllm_engine.export_checkpoints``); GLM-4.5, Qwen3-Next and Qwen3.5 need only a
config.json for these checks (nothing is loaded), so they get tiny config-only checkpoints.

The planner runs without verl (the engine environment cannot have it), on a stand-in for
``ExtendedMtpConfig`` holding verl 0.9.1's ``MtpConfig`` defaults (``mtp_settings``); a verl-leg
test checks that stand-in and ``verl-mtp explain`` (the real config class, Hydra-composed) give the
same plans, and that ``verl_merge`` is verl's own merge.

    python -m verl_mtp.testing.vllm_spec_config OUT_DIR RESULT.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace
from typing import Any, Optional

from verl_mtp.rollout.spec_control import vllm_batch_size_schedule

# verl 0.9.1's MtpConfig defaults of the fields the planner reads, plus verl-mtp's draft_sample_method.
MTP_DEFAULTS = dict(
    enable=True, enable_rollout=True, method="mtp", num_speculative_tokens=1, speculative_algorithm="EAGLE",
    speculative_num_steps=3, speculative_eagle_topk=1, speculative_num_draft_tokens=4, draft_sample_method=None,
)

EXPORTED = ("mimo", "deepseek_v3")  # written by export_hf_weights
CONFIG_ONLY = ("glm4_moe", "qwen3_next", "qwen3_5")
FAMILIES = EXPORTED + CONFIG_ONLY
ALIASES = {"mimo": "mimo_mtp", "deepseek_v3": "deepseek_mtp", "glm4_moe": "glm4_moe_mtp",
           "qwen3_next": "qwen3_next_mtp", "qwen3_5": "qwen3_5_mtp"}
MAX_NUM_SEQS = 8


def mtp_settings(**overrides: Any) -> SimpleNamespace:
    values = dict(MTP_DEFAULTS, **overrides)
    return SimpleNamespace(**values, speculative_rollout=bool(values["enable"] and values["enable_rollout"]))


@dataclass(frozen=True)
class SpecCase:
    """One run config. checkpoint: a family, or a variant below. refused: a regex of verl-mtp's error
    (None: it plans). engine: what vLLM does with what verl would send ("accepts" / "rejects").
    why: for a refusal vLLM accepts, why verl-mtp refuses it anyway."""

    name: str
    checkpoint: str
    mtp: dict = field(default_factory=dict)
    engine_kwargs: dict = field(default_factory=dict)
    rollout: dict = field(default_factory=dict)
    refused: Optional[str] = None
    engine: str = "accepts"
    why: str = ""


def _planned_cases() -> list[SpecCase]:
    out = []
    for f in FAMILIES:
        out += [
            SpecCase(f"{f}-default", f),
            SpecCase(f"{f}-k3", f, mtp=dict(num_speculative_tokens=3)),
            SpecCase(f"{f}-greedy", f, mtp=dict(draft_sample_method="greedy")),
            SpecCase(f"{f}-probabilistic", f, mtp=dict(draft_sample_method="probabilistic")),
            SpecCase(f"{f}-probabilistic-in-engine-kwargs", f,
                     engine_kwargs={"speculative_config": {"draft_sample_method": "probabilistic"}}),
            SpecCase(f"{f}-alias", f, mtp=dict(method=ALIASES[f])),
            SpecCase(f"{f}-batch-schedule", f, mtp=dict(num_speculative_tokens=2, draft_sample_method="probabilistic"),
                     engine_kwargs={"speculative_config": {
                         # as a run config holds it (lists): K = 2 below batch size 3, no drafting from 3 on
                         "num_speculative_tokens_per_batch_size": [list(e) for e in vllm_batch_size_schedule(2, 3)]}}),
        ]
    out += [
        SpecCase("mimo-2-layers-k4", "mimo_d2", mtp=dict(num_speculative_tokens=4)),
        SpecCase("qwen3_5-text-only", "qwen3_5_text"),
    ]
    return out


_ELSEWHERE = "/nonexistent/draft-model"
REFUSED = [
    SpecCase("method-eagle", "mimo", mtp=dict(method="eagle"), refused=r"mtp\.method.*'eagle'", engine="rejects"),
    SpecCase("method-ngram", "mimo", mtp=dict(method="ngram"), refused=r"mtp\.method.*'ngram'",
             why="ngram drafts by prompt lookup: the MTP head would not draft and verl's MTP weight sync "
                 "would have no drafter to feed"),
    SpecCase("other-family-alias", "mimo", mtp=dict(method="deepseek_mtp"), refused=r"names the DeepSeek-V3 drafter",
             why="vLLM rewrites every MTP alias to 'mtp' and drafts with the model's own head; the name says "
                 "the user expects another model's drafter"),
    SpecCase("k0", "mimo", mtp=dict(num_speculative_tokens=0), refused=r"num_speculative_tokens.*expected an integer >= 1",
             engine="rejects"),
    SpecCase("k3-on-2-layers", "mimo_d2", mtp=dict(num_speculative_tokens=3), refused=r"declares 2 MTP layers",
             engine="rejects"),
    SpecCase("qwen3_5-k3-on-2-layers", "qwen3_5_d2", mtp=dict(num_speculative_tokens=3),
             refused=r"declares 2 MTP layers", engine="rejects"),
    SpecCase("bad-draft-sample-method", "mimo", engine_kwargs={"speculative_config": {"draft_sample_method": "top_p"}},
             refused=r"draft_sample_method='top_p'.*greedy, probabilistic", engine="rejects"),
    SpecCase("draft-sample-method-conflict", "mimo", mtp=dict(draft_sample_method="greedy"),
             engine_kwargs={"speculative_config": {"draft_sample_method": "probabilistic"}},
             refused=r"contradicts actor_rollout_ref\.model\.mtp\.draft_sample_method='greedy'",
             why="verl's merge keeps the engine_kwargs value without a word; the two settings disagree"),
    SpecCase("schedule-not-from-1", "mimo", mtp=dict(num_speculative_tokens=2),
             engine_kwargs={"speculative_config": {"num_speculative_tokens_per_batch_size": [[2, 8, 2]]}},
             refused=r"no range covers batch size 1", engine="rejects"),
    SpecCase("schedule-overlap", "mimo", mtp=dict(num_speculative_tokens=2),
             engine_kwargs={"speculative_config": {"num_speculative_tokens_per_batch_size": [[1, 4, 2], [3, 8, 0]]}},
             refused=r"ranges overlap at batch size 3", engine="rejects"),
    SpecCase("schedule-negative-k", "mimo", mtp=dict(num_speculative_tokens=2),
             engine_kwargs={"speculative_config": {"num_speculative_tokens_per_batch_size": [[1, 8, -1]]}},
             refused=r"out of range", engine="rejects"),
    SpecCase("schedule-k-above-k", "mimo", mtp=dict(num_speculative_tokens=1),
             engine_kwargs={"speculative_config": {"num_speculative_tokens_per_batch_size": [[1, 8, 3]]}},
             refused=r"caps each k at num_speculative_tokens=1",
             why="vLLM clamps the schedule's k to num_speculative_tokens without a word: 3 would draft 1"),
    SpecCase("separate-draft-model", "mimo", engine_kwargs={"speculative_config": {"model": _ELSEWHERE}},
             refused=r"speculative_config\.model.*a separate draft model is not the MTP head", engine="rejects"),
    SpecCase("delta-sharded-weight-transfer", "mimo", rollout={"checkpoint_engine": {"backend": "delta_sharded"}},
             refused=r"delta_sharded",
             why="a weight-transfer matter, not a SpeculativeConfig one: verl 0.9.1's delta transfer raises "
                 "for a vLLM engine with a speculative config, inside the engine process"),
    SpecCase("qwen3_5-text-only-k3-on-2-layers", "qwen3_5_text_d2", mtp=dict(num_speculative_tokens=3),
             refused=r"declares 2 MTP layers", engine="rejects"),
]
CASES = _planned_cases() + REFUSED


# --- checkpoints --------------------------------------------------------------------------------------


def _config_only(family: str, depths: int = 1) -> dict:
    from verl_mtp.testing.tiny_hf import tiny_config

    # 512 positions for max_model_len 256; head_dim 32 as the CPU engine needs.
    config = tiny_config(family, depths, max_position_embeddings=512, hidden_size=128, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1024)
    if family != "deepseek_v3":
        target = config.get("text_config", config)
        target["head_dim"] = 32
    return config


def _write_config(path: str, config: dict) -> str:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    return path


def _with_depths(config: dict, depths: int) -> dict:
    config = copy.deepcopy(config)
    target = config["text_config"] if "mtp_num_hidden_layers" in config.get("text_config", {}) else config
    key = "mtp_num_hidden_layers" if "mtp_num_hidden_layers" in target else "num_nextn_predict_layers"
    target[key] = depths
    return config


def text_only_qwen3_5(config: dict) -> dict:
    """A Qwen3.5 checkpoint that ships only its text config (model_type qwen3_5_text)."""
    text = dict(config["text_config"], architectures=["Qwen3_5ForCausalLM"])
    for key in ("vocab_size", "tie_word_embeddings"):
        text.setdefault(key, config.get(key))
    return text


def make_checkpoints(out: str, export: bool = True) -> dict[str, str]:
    """checkpoint name -> directory. ``export``: MiMo and DeepSeek-V3 exported by verl-mtp's bridges
    (megatron-core + mbridge); otherwise config-only like the rest (the verl legs)."""
    paths: dict[str, str] = {}
    for family in FAMILIES:
        if export and family in EXPORTED:
            from verl_mtp.testing.vllm_engine import export_checkpoints

            paths[family] = export_checkpoints(os.path.join(out, family), family)["matched"]
        else:
            paths[family] = _write_config(os.path.join(out, family), _config_only(family))
    with open(os.path.join(paths["mimo"], "config.json")) as f:
        paths["mimo_d2"] = _write_config(os.path.join(out, "mimo_d2"), _with_depths(json.load(f), 2))
    qwen = _config_only("qwen3_5")
    paths["qwen3_5_d2"] = _write_config(os.path.join(out, "qwen3_5_d2"), _with_depths(qwen, 2))
    paths["qwen3_5_text"] = _write_config(os.path.join(out, "qwen3_5_text"), text_only_qwen3_5(qwen))
    paths["qwen3_5_text_d2"] = _write_config(os.path.join(out, "qwen3_5_text_d2"),
                                             _with_depths(text_only_qwen3_5(qwen), 2))
    return paths


# --- plans and verl's merge ---------------------------------------------------------------------------


def run_config(case: SpecCase, path: str) -> dict:
    return {"actor_rollout_ref": {
        "actor": {"strategy": "megatron"},
        "model": {"path": path},
        "rollout": {"name": "vllm", "engine_kwargs": {"vllm": copy.deepcopy(case.engine_kwargs)},
                    "max_num_seqs": MAX_NUM_SEQS, "temperature": 1.0, **case.rollout},
    }}


def plan_case(case: SpecCase, path: str) -> dict:
    """{"args": ...} or {"refused": message}: what verl-mtp makes of the case (no verl needed)."""
    from verl_mtp.errors import MtpConfigError
    from verl_mtp.rollout.spec_args import plan_speculative_rollout

    try:
        plan = plan_speculative_rollout(run_config(case, path), mtp_settings(**case.mtp))
    except MtpConfigError as exc:
        return {"refused": str(exc)}
    return {"args": plan.args, "draft_sampling": asdict(plan.draft_sampling), "family": plan.family,
            "built_for": plan.built_for}


def verl_merge(case: SpecCase) -> dict:
    """The speculative_config verl 0.9.1 sends for the case (``build_mtp_speculative_config``: mtp's
    method and token count, then the non-null engine_kwargs entries over them), with
    mtp.draft_sample_method carried into engine_kwargs as verl-mtp's driver check does (unless the
    engine_kwargs already set one)."""
    mtp = mtp_settings(**case.mtp)
    user = dict(case.engine_kwargs.get("speculative_config") or {})
    if mtp.draft_sample_method is not None:
        user.setdefault("draft_sample_method", mtp.draft_sample_method)
    return {"method": mtp.method, "num_speculative_tokens": mtp.num_speculative_tokens,
            **{k: v for k, v in user.items() if v is not None}}


# --- vLLM's verdict -----------------------------------------------------------------------------------


def _dtype(path: str) -> str:
    with open(os.path.join(path, "config.json")) as f:
        return "bfloat16" if json.load(f).get("model_type") == "deepseek_v3" else "float32"  # CPU MLA runs in bf16


def engine_verdict(path: str, speculative_config: dict) -> dict:
    """What vLLM makes of ``speculative_config`` for the checkpoint: the engine config it builds (no
    engine is started), and the scheduler's batch-size lookup when there is a schedule."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.spec_decode.dynamic.utils import build_dynamic_sd_schedule_lookup

    args = EngineArgs(model=path, skip_tokenizer_init=True, dtype=_dtype(path), max_model_len=256,
                      max_num_seqs=MAX_NUM_SEQS, seed=0, speculative_config=copy.deepcopy(speculative_config))
    try:
        spec = args.create_engine_config().speculative_config
    except Exception as exc:  # pydantic's ValidationError is a ValueError; vLLM raises others too
        return {"accepted": False, "stage": "SpeculativeConfig", "error": f"{type(exc).__name__}: {exc}"}
    out = {
        "accepted": True, "method": spec.method, "num_speculative_tokens": spec.num_speculative_tokens,
        "draft_sample_method": spec.draft_sample_method,
        "draft_model_type": spec.draft_model_config.hf_config.model_type,
        "draft_architectures": list(spec.draft_model_config.architectures),
        "schedule": [list(e) for e in spec.num_speculative_tokens_per_batch_size or []] or None,
    }
    if spec.num_speculative_tokens_per_batch_size:
        try:  # what the scheduler does with it at start-up
            out["batch_size_lookup"] = build_dynamic_sd_schedule_lookup(
                spec.num_speculative_tokens_per_batch_size, vllm_max_batch_size=MAX_NUM_SEQS,
                vllm_num_speculative_tokens=spec.num_speculative_tokens)
        except ValueError as exc:
            return {"accepted": False, "stage": "scheduler", "error": f"ValueError: {exc}"}
    return out


def unavailable_checkpoints() -> dict[str, str]:
    """Checkpoints vLLM cannot build a config for in this environment: name -> why."""
    import importlib.util

    if importlib.util.find_spec("torchvision") is not None:
        return {}
    why = ("vLLM's Qwen3.5 model module imports torchvision, which the engine environment must not have "
           "(it breaks transformers inside vLLM), so vLLM cannot inspect the architecture here")
    return {name: why for name in ("qwen3_5", "qwen3_5_d2", "qwen3_5_text", "qwen3_5_text_d2")}


def check_case(case: SpecCase, path: str) -> dict:
    """vLLM gets the plan's speculative_config (what explain prints), or for a refusal what verl would
    send without verl-mtp's check."""
    plan, sent = plan_case(case, path), verl_merge(case)
    given = plan["args"]["speculative_config"] if "args" in plan else sent
    return {"case": case.name, "plan": plan, "sent": sent, "engine": engine_verdict(path, given)}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="directory for the checkpoints")
    parser.add_argument("result", help="JSON file for the results")
    parser.add_argument("--case", action="append", help="only these cases (default: all)")
    ns = parser.parse_args(argv)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    paths = make_checkpoints(ns.out)
    cases = [c for c in CASES if not ns.case or c.name in ns.case]
    skipped = unavailable_checkpoints()
    results = [check_case(case, paths[case.checkpoint]) for case in cases if case.checkpoint not in skipped]
    with open(ns.result, "w") as f:
        json.dump({"paths": paths, "results": results, "skipped": skipped}, f, indent=1)
    print(f"{len(results)} cases -> {ns.result}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
