"""``verl-mtp explain``: compose a run's config, validate it, print the resolved MTP plan."""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from verl_mtp.config import ExtendedMtpConfig

# verl_mtp.config (and so verl) is imported by the functions that need it: the CLI reads
# WRAPPER_CONFIG_NAME while building its parser, which must stay cheap.

WRAPPER_CONFIG_MODULE = "verl_mtp.conf"
WRAPPER_CONFIG_NAME = "ppo_megatron_mtp"
VERL_CONFIG_MODULE = "verl.trainer.config"

GROUP_LABELS = {"mtp": "MTP module", "trunk": "trunk", "embedding": "embedding", "lm_head": "lm_head"}


@dataclass
class MtpPlan:
    enabled: bool
    regime: str
    enable_train: bool
    detach_encoder: bool
    loss_type: str
    policy_loss_mode: Optional[str]
    coef_mode: str
    coef: dict[str, Any]
    depths: Optional[int]
    depths_source: str
    step_weights: Optional[list[float]]
    megatron_core: Optional[str]
    mtp_api: Optional[str]
    gradient_reach: Optional[list[str]]
    rollout_engine: Optional[str]
    speculative_args: dict[str, Any]
    # decoupled: MTP term -> the parameter groups it alone reaches
    gradient_split: Optional[dict[str, list[str]]] = None
    drafter_loss: Optional[str] = None  # the MTP module's own loss (standalone ce, decoupled)
    # The engine version the speculative arguments were checked against, and where it came from.
    speculative_built_for: Optional[str] = None
    # How the drafter picks draft tokens and the acceptance probability that implies.
    draft_sampling: Optional[str] = None
    notes: list[str] = field(default_factory=list)


def normalize_overrides(overrides: list[str], config_name: str) -> list[str]:
    """Let users paste the overrides they give stock ``main_ppo``.

    The wrapper config declares verl-mtp's keys, so ``+actor_rollout_ref.model.mtp.KEY=...`` (needed
    on stock verl) would fail there with "already exists"; drop the ``+`` for those keys.
    """
    if config_name != WRAPPER_CONFIG_NAME:
        return list(overrides)
    from verl_mtp.config import MTP_KEY_PREFIX, PLUGIN_MTP_FIELDS

    declared = {f"+{MTP_KEY_PREFIX}.{name}=" for name in PLUGIN_MTP_FIELDS}
    return [o[1:] if any(o.startswith(prefix) for prefix in declared) else o for o in overrides]


def _check_mtp_override_keys(overrides: list[str]) -> None:
    """A misspelt ``mtp.*`` key fails here with the closest valid key, not as Hydra's "not in struct"."""
    from verl_mtp.config import MTP_FIELDS, MTP_KEY_PREFIX, unknown_keys_error

    prefix = f"{MTP_KEY_PREFIX}."
    unknown = set()
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key.startswith(prefix) and key[len(prefix):].split(".", 1)[0] not in MTP_FIELDS:
            unknown.add(key[len(prefix):].split(".", 1)[0])
    if unknown:
        raise unknown_keys_error(unknown, MTP_FIELDS)


def compose_run_config(overrides: list[str], config_name: str = WRAPPER_CONFIG_NAME):
    """Compose a verl run config with Hydra exactly as ``main_ppo`` would (no Ray, no model load)."""
    import verl  # noqa: F401 - activates the plugin, as in a real run
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    _check_mtp_override_keys(overrides)
    module = WRAPPER_CONFIG_MODULE if config_name == WRAPPER_CONFIG_NAME else VERL_CONFIG_MODULE
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module=module, version_base=None):
        return compose(config_name=config_name, overrides=normalize_overrides(overrides, config_name))


def _coef_summary(mtp: ExtendedMtpConfig) -> dict[str, Any]:
    if mtp.mtp_coef_mode == "fixed":
        return {"lambda": mtp.mtp_loss_scaling_factor}
    return {
        "lambda_plus": mtp.occ_scale,
        "eps": mtp.occ_eps,
        "ema_decay": mtp.occ_ema_decay,
        "clip": [mtp.occ_coef_min, mtp.occ_coef_max],
        "on_policy": mtp.occ_on_policy_coef,
        "scope": mtp.occ_scope,
    }


def build_plan(config) -> MtpPlan:
    """Validate ``config`` (raises MtpConfigError) and resolve what the run will do with MTP."""
    from verl_mtp.run_checks import resolve_run_depths, validate_mtp_run_config
    from verl_mtp.megatron.compat import DECOUPLED_SPLIT, expected_gradient_reach, megatron_core_version, mtp_api
    from verl_mtp.rollout.spec_args import plan_speculative_rollout

    mtp = validate_mtp_run_config(config)
    notes: list[str] = []

    depths, source = resolve_run_depths(config, mtp)

    with warnings.catch_warnings():  # megatron-core warns about missing TE/Apex on import
        warnings.simplefilter("ignore")
        api = mtp_api()
    reach = expected_gradient_reach(mtp.mtp_training_mode, api) if mtp.enable else ()
    if api is None:
        notes.append("megatron-core is not installed here, so the gradient reach is unknown")
    elif mtp.enable and not mtp.is_decoupled:  # stock verl has no decoupled regime to compare with
        stock = expected_gradient_reach(mtp.mtp_training_mode, api, stock_verl=True)
        if set(stock) != set(reach):
            notes.append(
                f"stock verl on this megatron-core would send MTP gradient to "
                f"{', '.join(GROUP_LABELS[g] for g in stock)}; verl-mtp's MTP forward makes the regime hold"
            )
    if mtp.needs_occ_prepass:
        notes.append("OCC over the whole mini-batch: one extra no-grad forward per mini-batch (occ_scope=micro_batch avoids it)")
    if mtp.is_training and mtp.mtp_logits_chunk_tokens == 0:
        notes.append(
            "mtp_logits_chunk_tokens=0: each MTP depth keeps whole-micro-batch vocabulary logits until "
            "backward (memory grows with context length); the default 2048 bounds them"
        )
    if mtp.uses_occ and mtp.mtp_training_mode == "standalone":
        notes.append(
            "OCC with standalone: the MTP term reaches no shared parameter, and Adam divides the head's gradient "
            "by its running scale, so rescaling lambda changes the head's update little; its sign does"
        )
    # decoupled: a negative lambda reaches only the shared parameters, the head trains on its drafter loss
    if mtp.uses_occ and not mtp.is_decoupled and (mtp.occ_coef_min is None or mtp.occ_coef_min < 0):
        notes.append(
            "OCC lambda may go negative (occ_coef_min unset, as in the paper): the MTP term then trains the head "
            "away from the policy at Adam's full step size; occ_coef_min=0 prevents it"
        )

    notes += _drafter_notes(config, mtp)

    policy_loss_mode = None
    if mtp.uses_rl_loss:
        policy_loss_mode = str(config.actor_rollout_ref.actor.policy_loss.get("loss_mode", "vanilla"))

    engine = config.actor_rollout_ref.rollout.get("name")
    spec = plan_speculative_rollout(config, mtp)
    if spec is not None:
        notes += [f"speculative rollout: {n}" for n in spec.notes]
    return MtpPlan(
        enabled=mtp.enable,
        regime=mtp.mtp_training_mode,
        enable_train=mtp.enable_train,
        detach_encoder=mtp.detach_encoder,
        loss_type=mtp.mtp_loss_type,
        policy_loss_mode=policy_loss_mode,
        coef_mode=mtp.mtp_coef_mode,
        coef=_coef_summary(mtp),
        depths=depths,
        depths_source=source,
        step_weights=mtp.step_weights(depths) if depths else None,
        megatron_core=megatron_core_version(),
        mtp_api=api,
        gradient_reach=list(reach) if reach is not None else None,
        gradient_split={term: list(groups) for term, groups in DECOUPLED_SPLIT.items()} if mtp.is_decoupled else None,
        drafter_loss=mtp.mtp_drafter_loss if mtp.trains_drafter_loss else None,
        rollout_engine=engine,
        speculative_args=spec.args if spec is not None else {},
        speculative_built_for=spec.built_for if spec is not None else None,
        draft_sampling=spec.draft_sampling.describe() if spec is not None and spec.draft_sampling else None,
        notes=notes,
    )


DRAFTER_LOSS_LABELS = {
    "ce": "ce: cross-entropy on the sampled token (megatron's MTP loss)",
    "kl": "kl: forward KL to the main head's distribution at the rollout temperature",
    "tv": "tv: total variation to the main head's distribution at the rollout temperature (1 - acceptance of probabilistic drafts)",
}


def _drafter_notes(config, mtp: ExtendedMtpConfig) -> list[str]:
    """Advice on pairing the MTP head's training with speculative rollout."""
    from verl_mtp.config_base import select

    notes = []
    temperature = select(config, "actor_rollout_ref.rollout.temperature", None)
    sampling = temperature is None or temperature > 0
    if mtp.trains_drafter_loss and mtp.mtp_drafter_loss != "ce" and mtp.speculative_rollout and sampling \
            and mtp.draft_sample_method != "probabilistic":
        notes.append(
            f"mtp_drafter_loss={mtp.mtp_drafter_loss} trains the head's distribution q toward the policy's p at the "
            f"rollout temperature, which drives sum min(p, q) = 1 - TV(p, q), the acceptance of drafts sampled from q, "
            f"to 1; greedy drafts are accepted with p(argmax q) <= max p: set mtp.draft_sample_method=probabilistic "
            f"(vLLM; SGLang has no such setting, it drafts greedily)"
        )
    if mtp.is_decoupled:
        notes.append(
            "decoupled: the MTP block runs twice per micro-batch (policy pass with the MTP module frozen, drafter "
            "pass with its inputs detached): one extra MTP-layer forward and its activations, no extra backward work"
        )
    if mtp.uses_rl_loss and mtp.mtp_training_mode == "joint" and mtp.speculative_rollout:
        notes.append(
            "joint rl with speculative rollout: the policy-loss term also trains the MTP module, with lambda "
            "(OCC's can reach 0 or go negative) and Adam's full step size, which moves the drafter away from the "
            "policy it drafts for; mtp_training_mode=decoupled keeps lambda on the shared parameters and trains "
            "the MTP module with mtp_drafter_loss"
        )
    return notes


def _loss_line(plan: MtpPlan) -> str:
    if plan.loss_type == "ce":
        return DRAFTER_LOSS_LABELS[plan.drafter_loss or "ce"]
    policy = f"rl: the actor's policy loss (loss_mode={plan.policy_loss_mode}) on the MTP head's log-probs"
    if plan.gradient_split:
        return f"{policy}; MTP module: {DRAFTER_LOSS_LABELS[plan.drafter_loss]}"
    return policy


def _reach_line(plan: MtpPlan) -> str:
    if plan.gradient_reach is None:
        return "unknown (megatron-core not installed)"
    if not plan.gradient_reach:
        return "nothing (the head is loaded and saved, not trained)"
    if plan.gradient_split:  # decoupled
        return "; ".join(f"{term} -> {', '.join(GROUP_LABELS[g] for g in groups)} only"
                         for term, groups in plan.gradient_split.items())
    return ", ".join(GROUP_LABELS[g] for g in plan.gradient_reach)


def render_plan(plan: MtpPlan) -> str:
    if not plan.enabled:
        return "MTP: off (actor_rollout_ref.model.mtp.enable=False): verl runs exactly as without verl-mtp.\n"
    loss = _loss_line(plan)
    coef = ", ".join(f"{k}={v}" for k, v in plan.coef.items())
    reach = _reach_line(plan)
    mcore = f"megatron-core {plan.megatron_core} ({plan.mtp_api} MTP API)" if plan.megatron_core else "no megatron-core"
    spec = json.dumps(plan.speculative_args) if plan.speculative_args else "off (mtp.enable_rollout=False)"
    # verl's rollout.name defaults to ??? (mandatory): explain runs fine without it, main_ppo does not.
    engine = plan.rollout_engine or "engine not set (actor_rollout_ref.rollout.name, e.g. vllm or sglang)"
    lines = [
        "MTP plan",
        f"  regime            {plan.regime} (enable_train={plan.enable_train}, detach_encoder={plan.detach_encoder})",
        f"  MTP depths        {plan.depths if plan.depths is not None else '?'} ({plan.depths_source})",
        f"  loss              {loss}",
        f"  coefficient       {plan.coef_mode}: {coef}",
        f"  depth weights     {plan.step_weights if plan.step_weights else '-'}",
        f"  MTP gradient to   {reach}   [{mcore}]",
        f"  rollout           {engine}; speculative decoding: {spec}",
    ]
    if plan.speculative_built_for:
        lines.append(f"  engine args for   {plan.speculative_built_for}")
    if plan.draft_sampling:
        # p: the policy's next-token distribution, q: the MTP head's (both at the request's temperature).
        lines.append(f"  draft tokens      {plan.draft_sampling}   [p: policy, q: MTP head]")
    lines += [f"  note: {n}" for n in plan.notes]
    return "\n".join(lines) + "\n"


def plan_as_json(plan: MtpPlan) -> str:
    return json.dumps(asdict(plan), indent=2, sort_keys=True)
