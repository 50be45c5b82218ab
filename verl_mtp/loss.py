"""The actor loss with the MTP policy-loss term (``mtp_loss_type=rl``).

    loss = ppo_loss(main head)  +  sum_k  lambda_k * beta**(k-1) * PG(q_k)

PG is the policy-loss function verl's registry returns for ``actor.policy_loss.loss_mode``
(vanilla clip, dual-clip, GSPO, ...), called with the same old log-probs, advantages,
``loss_agg_mode`` and rollout-IS weights as the main term, with the depth-k MTP head's
log-probs q_k in place of the policy's. The main term is verl's own ``ppo_loss``, untouched,
so entropy and KL terms are kept and lambda = 0 reproduces stock verl exactly.

The forward delivers, next to ``log_probs`` and un-packed the same way, in megatron's own indexing,
the entries named in ``verl_mtp.megatron.keys``:
    model_output["mtp_log_probs"]  [tokens, K]: [t, k-1] = log q_k(input_ids[t+k+1])
    model_output["mtp_valid"]      [tokens, K]: that label lies inside the sequence
    model_output["mtp_agree"]      [tokens, K]: depth k's argmax is that label (both loss types)
``verl_mtp.align`` shifts them onto the main head's positions per sequence. Tokens without a
valid prediction leave the depth's mask; they are never zero-filled into a mean.

OCC with ``occ_scope=mini_batch``: before a mini-batch's update, the engine runs one no-grad
forward of the whole mini-batch (``run_occ_prepass``, hooked into the engine's ``train_batch``)
whose loss function only accumulates OCC's sums; lambda is then fixed for every micro-batch of
that update. With ``micro_batch`` each micro-batch's sums (over all DP ranks) give its lambda.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from verl_mtp.align import align_mtp_to_main_head
from verl_mtp.config import as_extended
from verl_mtp.errors import VerlMtpError
from verl_mtp.megatron.keys import MTP_AGREE_KEY, MTP_LOG_PROBS_KEY, MTP_VALID_KEY
from verl_mtp.occ import OccCoefficient, UpdateSchedule, all_reduce_sums, calibrate, occ_partial_sums


class MtpLossError(VerlMtpError, RuntimeError):
    """The MTP term cannot be computed as configured (a patch it relies on is not active, OCC state
    that does not fit this run)."""


def _depth_metric_name(name: str, depth: int) -> str:
    # verl's pg metrics are named "actor/pg_clipfrac", "actor/ppo_kl", ...
    base = name[len("actor/"):] if name.startswith("actor/") else name
    return f"actor/mtp_{depth}/{base}"


@dataclass
class ActorState:
    """What the loss keeps for one actor between calls.

    verl binds each actor's config once (``partial(ppo_loss, config=actor_config)``) and passes that
    same object on every call, so the config object is the actor's identity. The state lives as
    long as the ``MtpPolicyLoss`` holding it (for the installed loss: the worker process); it keeps
    its config alive so that the ``id`` it is filed under never names another object.
    """

    config: Any
    schedule: UpdateSchedule = field(default_factory=UpdateSchedule)  # which mini-batch is on-policy
    coefficients: Optional[list[OccCoefficient]] = None  # OCC, one per depth, built at first use
    prepass_sums: Optional[torch.Tensor] = None  # occ_scope=mini_batch: the running pre-pass's sums
    frozen: Optional[list[float]] = None  # occ_scope=mini_batch: lambdas of the mini-batch in training
    patches_checked: bool = False


class MtpPolicyLoss:
    """Callable with ``ppo_loss``'s signature; owns the OCC state of this worker's actors.

    All per-actor state sits in one ``ActorState`` per actor config (``actor(config)``); the
    methods below are the only way in or out of it.
    """

    def __init__(self, stock_loss: Callable):
        self.stock_loss = stock_loss
        self._actors: dict[int, ActorState] = {}
        # OCC state read from a checkpoint before the first OCC step builds the coefficients.
        self._occ_restore: Optional[list[dict]] = None

    def actor(self, config: Any) -> ActorState:
        """The state of the actor whose config is ``config`` (created empty on first use)."""
        state = self._actors.get(id(config))
        if state is None:
            state = self._actors[id(config)] = ActorState(config)
        return state

    # --- verl's update schedule (which mini-batch is on-policy) ------------------------------

    def schedule(self, config: Any) -> UpdateSchedule:
        return self.actor(config).schedule

    def begin_update_step(self, config: Any) -> None:
        """verl's worker starts a step's mini-batch loop (``TrainingWorker.train_mini_batch``)."""
        self.schedule(config).begin_step()

    def end_update_step(self, config: Any) -> None:
        self.schedule(config).end_step()

    def begin_mini_batch(self, config: Any) -> None:
        """The engine starts training one mini-batch (``BaseEngine.train_batch``)."""
        self.schedule(config).begin_mini_batch()

    def on_policy(self, config: Any) -> bool:
        """Whether the mini-batch being trained is the step's first (pi_theta == pi_old)."""
        on_policy = self.schedule(config).on_policy
        if on_policy is None:
            raise MtpLossError(
                "mtp_coef_mode=occ but this actor update ran outside verl's mini-batch loop, so OCC cannot "
                "tell the on-policy first mini-batch of a step from the others: the update_schedule patch "
                "(TrainingWorker.train_mini_batch, BaseEngine.train_batch) is not active in this worker"
            )
        return on_policy

    def occ_coefficients(self, config: Any, mtp, depths: int) -> list[OccCoefficient]:
        state = self.actor(config)
        coefs = state.coefficients
        if coefs is None or len(coefs) != depths:
            coefs = [OccCoefficient.from_config(mtp) for _ in range(depths)]
            if self._occ_restore is not None:
                _load_occ(coefs, self._occ_restore)
                self._occ_restore = None
            state.coefficients = coefs
        return coefs

    # --- checkpointing (verl_mtp.ckpt.mtp_manifest) ------------------------------------------

    def _occ_holder(self) -> Optional[list[OccCoefficient]]:
        holders = [state.coefficients for state in self._actors.values() if state.coefficients is not None]
        if len(holders) > 1:
            raise MtpLossError(f"{len(holders)} actor configs hold OCC state; a checkpoint can carry one")
        return holders[0] if holders else None

    def occ_state_dict(self) -> Optional[list[dict]]:
        """Per-depth OCC state of this worker's actor, or None before OCC first ran."""
        coefs = self._occ_holder()
        if coefs is None:
            return self._occ_restore  # restored but not used yet: still the state to carry on
        return [coef.state_dict() for coef in coefs]

    def load_occ_state_dict(self, state: list[dict]) -> None:
        """Resume OCC from ``state`` (applied now, or when the first OCC step builds its coefficients)."""
        coefs = self._occ_holder()
        if coefs is None:
            self._occ_restore = [dict(one) for one in state]
        else:
            _load_occ(coefs, state)

    def __call__(self, config, model_output, data, dp_group=None):
        mtp = as_extended(getattr(getattr(config, "model_config", None), "mtp", None))
        if mtp.enable_train and not self.actor(config).patches_checked:
            # Once per actor; besides the engine's initialisation, in case the patch that hooks
            # that (mtp_forward) is the one that failed.
            from verl_mtp.patches.core import require_patches

            require_patches(mtp, "the actor loss")
            self.actor(config).patches_checked = True
        loss, metrics = self.stock_loss(config, model_output, data, dp_group)
        if not mtp.enable_train:
            return loss, metrics
        if MTP_AGREE_KEY in model_output:
            metrics.update(agreement_metrics(config, model_output, data))
        if mtp.mtp_loss_type != "rl":
            return loss, metrics
        term, mtp_metrics = self.mtp_term(config, mtp, model_output, data, dp_group)
        metrics.update(mtp_metrics)
        return loss + term, metrics

    # --- occ_scope=mini_batch --------------------------------------------------------------

    def occ_prepass_loss(self, config, model_output, data, dp_group=None):
        """Loss function of the pre-pass: accumulates this rank's OCC sums, trains nothing."""
        log_prob, q, old_log_prob, masks = _occ_inputs(model_output, data)
        partial = torch.stack([occ_partial_sums(log_prob, x, old_log_prob, m) for x, m in zip(q, masks)])
        state = self.actor(config)
        state.prepass_sums = partial if state.prepass_sums is None else state.prepass_sums + partial
        return log_prob.new_zeros(()), {}

    def run_occ_prepass(self, engine, data, config) -> Optional[list[float]]:
        """One no-grad forward of the mini-batch ``data`` on ``engine``; fixes lambda for it.

        Runs in eval mode, as verl computes the old log-probs. With pipeline parallelism only the
        last stage runs the loss function, so only there are sums gathered and lambda fixed (the
        other stages only pass activations on, and use no lambda); they return None.
        """
        state = self.actor(config)
        state.prepass_sums = None
        _forward_only_in_eval(engine, data, functools.partial(self.occ_prepass_loss, config=config))
        partial, state.prepass_sums = state.prepass_sums, None
        if partial is None:
            if not _is_last_pipeline_stage():
                return None
            raise MtpLossError("the OCC pre-pass ran no micro-batch through its loss function")
        total = all_reduce_sums(partial, group=engine.get_data_parallel_group())
        occ = self.occ_coefficients(config, as_extended(config.model_config.mtp), total.shape[0])
        on_policy = self.on_policy(config)
        state.frozen = [coef.update(sums, on_policy=on_policy) for coef, sums in zip(occ, total)]
        return state.frozen

    def end_occ_mini_batch(self, config) -> None:
        self.actor(config).frozen = None

    # --- the MTP policy-loss term ------------------------------------------------------------

    def _coefficients(self, config, mtp, log_prob, q, old_log_prob, masks, dp_group):
        """(OCC coefficients or None, lambda per depth) for this micro-batch."""
        if not mtp.uses_occ:
            return None, [mtp.mtp_loss_scaling_factor] * len(q)
        occ = self.occ_coefficients(config, mtp, len(q))
        if not mtp.needs_occ_prepass:
            on_policy = self.on_policy(config)
            detached = [x.detach() for x in q]
            return occ, calibrate(occ, log_prob, detached, old_log_prob, masks, group=dp_group, on_policy=on_policy)
        frozen = self.actor(config).frozen
        if frozen is None:
            raise MtpLossError(
                "occ_scope=mini_batch but no OCC pre-pass ran for this mini-batch: the engine "
                "train_batch patch (occ_update_schedule) is not active in this worker (check the "
                "[verl-mtp] lines in its log); set actor_rollout_ref.model.mtp.occ_scope=micro_batch "
                "to calibrate per micro-batch instead"
            )
        return occ, frozen

    def mtp_term(self, config, mtp, model_output, data, dp_group=None) -> tuple[torch.Tensor, dict]:
        from verl.trainer.ppo.core_algos import get_policy_loss_fn

        log_prob, q, old_log_prob, masks = _occ_inputs(model_output, data, with_grad=True, main=mtp.occ_per_micro_batch)
        depths = len(q)
        padded = _padded(data, ["advantages"] + (["rollout_is_weights"] if "rollout_is_weights" in data else []))
        occ, coefs = self._coefficients(config, mtp, log_prob, q, old_log_prob, masks, dp_group)

        policy_loss_fn = get_policy_loss_fn(config.policy_loss.get("loss_mode", "vanilla"))
        summed = _global_info_set(config, data)
        term = old_log_prob.new_zeros(())
        metrics: dict[str, Any] = {}
        for k, (weight, coef) in enumerate(zip(mtp.step_weights(depths), coefs), start=1):
            pg_loss, pg_metrics = policy_loss_fn(
                old_log_prob=old_log_prob,
                log_prob=q[k - 1],
                advantages=padded["advantages"],
                response_mask=masks[k - 1],
                loss_agg_mode=config.loss_agg_mode,
                config=config,
                rollout_is_weights=padded.get("rollout_is_weights", None),
            )
            term = term + (coef * weight) * pg_loss
            metrics.update(_depth_metrics(k, pg_loss, pg_metrics, coef, weight, occ, summed))
        return term, metrics


def _load_occ(coefs: list[OccCoefficient], state: list[dict]) -> None:
    if len(state) != len(coefs):
        raise MtpLossError(f"the checkpoint's OCC state covers {len(state)} MTP depth(s), this run has {len(coefs)}")
    for coef, one in zip(coefs, state):
        coef.load_state_dict(one)


def _depth_metrics(k: int, pg_loss, pg_metrics: dict, coef, weight, occ, summed: bool) -> dict:
    """Depth ``k``'s metrics: its policy-loss metrics, lambda, step weight and OCC's measurement."""
    from verl.utils.metric import AggregationType, Metric

    metrics: dict[str, Any] = {
        _depth_metric_name(name, k): Metric(value=value, aggregation=AggregationType.MEAN)
        for name, value in pg_metrics.items()
    }
    aggregation = AggregationType.SUM if summed else AggregationType.MEAN
    metrics[f"actor/mtp_{k}/pg_loss"] = Metric(value=pg_loss.detach(), aggregation=aggregation)
    metrics[f"actor/mtp_{k}/coef"] = float(coef)
    metrics[f"actor/mtp_{k}/step_weight"] = float(weight)
    if occ is not None:
        last = occ[k - 1].last
        for name in ("numerator", "denominator", "on_policy", "delta_rl_rms"):
            metrics[f"actor/mtp_{k}/occ_{name}"] = last[name]
    return metrics


def _forward_only_in_eval(engine, data, loss_function) -> None:
    """``engine``'s forward-only pass over ``data`` in eval mode, MTP heads scored without grad."""
    from verl_mtp.megatron.mtp_forward import score_mtp_without_grad

    modules = engine.module if isinstance(engine.module, (list, tuple)) else [engine.module]
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        with torch.no_grad(), score_mtp_without_grad():
            engine.forward_backward_batch(data, loss_function, forward_only=True)
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


def _is_last_pipeline_stage() -> bool:
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return True
    return parallel_state.is_pipeline_last_stage(ignore_virtual=True)


def _global_info_set(config, data) -> bool:
    # Same rule as verl's ppo_loss for how pg_loss metrics aggregate across micro-batches.
    return (
        data["dp_size"] > 1
        or data["batch_num_tokens"] is not None
        or data["global_batch_size"] is not None
        or config.loss_scale_factor is not None
    )


def _padded(data, fields: list[str]):
    return data.select("response_mask", "old_log_probs", *fields).to_padded_tensor()


def _aligned_padded(model_output, data, key: str):
    """``model_output[key]`` [tokens, K] on response positions: padded [B, R, K] and its validity."""
    from verl.workers.utils.padding import no_padding_2_padding

    values, valid = model_output[key], model_output[MTP_VALID_KEY]
    aligned, aligned_valid = align_mtp_to_main_head(values, valid)
    return no_padding_2_padding(aligned, data), no_padding_2_padding(aligned_valid, data).bool()


def _occ_inputs(model_output, data, with_grad: bool = False, main: bool = True):
    """Main log-probs (None unless ``main``), per-depth MTP log-probs, old log-probs and per-depth
    masks, padded [B, R]; the MTP log-probs keep their gradient only ``with_grad``.

    A depth's mask is the response mask minus positions with no valid prediction. Those positions
    get the old log-prob (ratio 1, no gradient) besides leaving the mask: verl aggregates with
    mask multiplication, where NaN * 0 = NaN.
    """
    from verl.workers.utils.padding import no_padding_2_padding

    missing = [k for k in (MTP_LOG_PROBS_KEY, MTP_VALID_KEY) if k not in model_output]
    if missing:
        raise MtpLossError(
            f"mtp_loss_type=rl but the model forward delivered no {', '.join(missing)}; the MTP "
            f"forward patch is not active in this worker (check the [verl-mtp] lines in its log)"
        )
    mtp_log_probs, mtp_valid = _aligned_padded(model_output, data, MTP_LOG_PROBS_KEY)
    padded = _padded(data, [])
    response_mask = padded["response_mask"].bool()
    old_log_prob = padded["old_log_probs"]
    masks = [response_mask & mtp_valid[..., k] for k in range(mtp_log_probs.shape[-1])]
    q = [torch.where(m, mtp_log_probs[..., k], old_log_prob.detach()) for k, m in enumerate(masks)]
    log_prob = no_padding_2_padding(model_output["log_probs"], data).detach() if main else None
    return log_prob, (q if with_grad else [x.detach() for x in q]), old_log_prob, masks


def agreement_metrics(config, model_output, data) -> dict:
    """actor/mtp_{k}/draft_agreement: fraction of response tokens whose depth-k argmax is the sampled token.

    Positions without a depth-k prediction count as disagreement. Aggregated like verl's token-mean
    losses: each micro-batch contributes count / (response tokens of the global mini-batch) and
    the values are summed, so the result is exact over all micro-batches and DP ranks.
    """
    from verl.utils.metric import AggregationType, Metric

    agree, valid = _aligned_padded(model_output, data, MTP_AGREE_KEY)
    response_mask = _padded(data, [])["response_mask"].bool()
    global_tokens = data["batch_num_tokens"] if "batch_num_tokens" in data.keys() else None
    metrics = {}
    for k in range(agree.shape[-1]):
        count = (response_mask & valid[..., k] & agree[..., k].bool()).sum().float()
        if global_tokens:
            value, how = count * data["dp_size"] / global_tokens, AggregationType.SUM
        else:
            value, how = count / response_mask.sum().clamp(min=1), AggregationType.MEAN
        metrics[f"actor/mtp_{k + 1}/draft_agreement"] = Metric(value=value, aggregation=how)
    return metrics


# The one MtpPolicyLoss of this process: the mtp_policy_loss patch puts it in place of verl's
# ppo_loss (engine_workers binds it; the distillation loss calls it inside), so each actor's OCC
# state exists once. It lives until the process ends, or until the patch wraps another stock loss.
_installed: Optional[MtpPolicyLoss] = None


def installed_policy_loss(stock_loss: Callable) -> MtpPolicyLoss:
    """This process's MtpPolicyLoss around ``stock_loss`` (made on first use)."""
    global _installed
    if _installed is None or _installed.stock_loss is not stock_loss:
        _installed = MtpPolicyLoss(stock_loss)
    return _installed


def current_policy_loss() -> Optional[MtpPolicyLoss]:
    """This process's installed MtpPolicyLoss, or None when the plugin installed none here."""
    return _installed


def bound_actor(loss_function) -> Optional[tuple[MtpPolicyLoss, Any]]:
    """(MtpPolicyLoss, actor config) of the loss function verl hands its engine, or None.

    verl's ``TrainingWorker`` binds its loss once as ``functools.partial(ppo_loss, config=actor_config)``
    (or ``partial(distillation_ppo_loss, config=..., distillation_config=...)``, which calls
    ``ppo_loss`` inside). This is the one place verl-mtp reads such a partial back: the loss is the
    bound function when that is an MtpPolicyLoss, else this process's installed one.
    """
    if not isinstance(loss_function, functools.partial):
        return None
    config = loss_function.keywords.get("config")
    policy_loss = loss_function.func if isinstance(loss_function.func, MtpPolicyLoss) else _installed
    if policy_loss is None or config is None:
        return None
    return policy_loss, config


def occ_target(loss_function) -> Optional[tuple[MtpPolicyLoss, Any, Any]]:
    """(installed loss, actor config, its MTP config) if ``loss_function`` trains an rl+OCC actor."""
    bound = bound_actor(loss_function)
    if bound is None:
        return None
    policy_loss, config = bound
    mtp = as_extended(getattr(getattr(config, "model_config", None), "mtp", None))
    return (policy_loss, config, mtp) if mtp.uses_occ else None


@contextlib.contextmanager
def actor_update_step(loss_function):
    """One training step's mini-batch loop with ``loss_function`` (verl's ``partial(ppo_loss, config=...)``):
    inside it OCC knows its schedule, and the first mini-batch the engine trains is the on-policy
    one. verl's ``TrainingWorker.train_mini_batch`` runs in it (patch ``occ_update_schedule``);
    code that drives ``BaseEngine.train_batch`` itself (the demo, the benchmark) opens it per step."""
    target = occ_target(loss_function)
    if target is None:
        yield
        return
    policy_loss, config, _ = target
    policy_loss.begin_update_step(config)
    try:
        yield
    finally:
        policy_loss.end_update_step(config)


def train_batch_with_occ(engine, data, loss_function, run: Callable[[], Any]) -> Any:
    """One mini-batch's ``BaseEngine.train_batch`` with OCC's bookkeeping around ``run``: advance
    the update schedule and, with ``occ_scope=mini_batch``, fix lambda from a pre-pass first."""
    target = occ_target(loss_function)
    if target is None:
        return run()
    policy_loss, config, mtp = target
    policy_loss.begin_mini_batch(config)
    if not mtp.needs_occ_prepass:
        return run()
    policy_loss.run_occ_prepass(engine, data, config)
    try:
        return run()
    finally:
        policy_loss.end_occ_mini_batch(config)
