"""The actor loss with the MTP policy-loss term (``mtp_loss_type=rl``).

    loss = ppo_loss(main head)  +  sum_k  lambda_k * beta**(k-1) * PG(q_k)

PG is the policy-loss function verl's registry returns for ``actor.policy_loss.loss_mode``
(vanilla clip, dual-clip, GSPO, ...), called with the same old log-probs, advantages,
``loss_agg_mode`` and rollout-IS weights as the main term, with the depth-k MTP head's
log-probs q_k in place of the policy's. The main term is verl's own ``ppo_loss``, untouched,
so entropy and KL terms are kept and lambda = 0 reproduces stock verl exactly.

The forward delivers, next to ``log_probs`` and un-packed the same way, in megatron's own indexing:
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
from typing import Any, Callable, Optional

import torch

from verl_mtp.align import align_mtp_to_main_head
from verl_mtp.config import as_extended
from verl_mtp.occ import OccCoefficient, UpdateSchedule, all_reduce_sums, calibrate, occ_partial_sums

MTP_LOG_PROBS_KEY = "mtp_log_probs"
MTP_VALID_KEY = "mtp_valid"
MTP_AGREE_KEY = "mtp_agree"


class MtpLossError(RuntimeError):
    pass


def _depth_metric_name(name: str, depth: int) -> str:
    # verl's pg metrics are named "actor/pg_clipfrac", "actor/ppo_kl", ...
    base = name[len("actor/"):] if name.startswith("actor/") else name
    return f"actor/mtp_{depth}/{base}"


class MtpPolicyLoss:
    """Callable with ``ppo_loss``'s signature; holds the OCC state of this worker's actor."""

    def __init__(self, stock_loss: Callable):
        self.stock_loss = stock_loss
        self._occ: dict[int, list[OccCoefficient]] = {}
        # occ_scope=mini_batch, keyed by id(actor config): sums of the running pre-pass, and the
        # lambdas fixed for the mini-batch being trained.
        self._occ_pending: dict[int, torch.Tensor] = {}
        self._occ_frozen: dict[int, list[float]] = {}
        # OCC state read from a checkpoint before the first OCC step builds the coefficients.
        self._occ_restore: Optional[list[dict]] = None
        # Where each actor is in verl's update loop (keyed like the OCC state).
        self._schedules: dict[int, UpdateSchedule] = {}
        self._patches_checked: set[int] = set()

    # --- verl's update schedule (which mini-batch is on-policy) ------------------------------

    def schedule(self, config: Any) -> UpdateSchedule:
        return self._schedules.setdefault(id(config), UpdateSchedule())

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
        coefs = self._occ.get(id(config))
        if coefs is None or len(coefs) != depths:
            coefs = [OccCoefficient.from_config(mtp) for _ in range(depths)]
            if self._occ_restore is not None:
                if len(self._occ_restore) != depths:
                    raise MtpLossError(
                        f"the checkpoint's OCC state covers {len(self._occ_restore)} MTP depth(s), this run has {depths}"
                    )
                for coef, state in zip(coefs, self._occ_restore):
                    coef.load_state_dict(state)
                self._occ_restore = None
            self._occ[id(config)] = coefs
        return coefs

    # --- checkpointing (verl_mtp.ckpt.mtp_manifest) ------------------------------------------

    def occ_state_dict(self) -> Optional[list[dict]]:
        """Per-depth OCC state of this worker's actor, or None before OCC first ran."""
        if not self._occ:
            return self._occ_restore  # restored but not used yet: still the state to carry on
        if len(self._occ) > 1:
            raise MtpLossError(f"{len(self._occ)} actor configs hold OCC state; a checkpoint can carry one")
        return [coef.state_dict() for coef in next(iter(self._occ.values()))]

    def load_occ_state_dict(self, state: list[dict]) -> None:
        """Resume OCC from ``state`` (applied now, or when the first OCC step builds its coefficients)."""
        if len(self._occ) > 1:
            raise MtpLossError(f"{len(self._occ)} actor configs hold OCC state; a checkpoint can carry one")
        for coefs in self._occ.values():
            if len(coefs) != len(state):
                raise MtpLossError(f"the checkpoint's OCC state covers {len(state)} MTP depth(s), this run has {len(coefs)}")
            for coef, one in zip(coefs, state):
                coef.load_state_dict(one)
            return
        self._occ_restore = [dict(one) for one in state]

    def __call__(self, config, model_output, data, dp_group=None):
        mtp = as_extended(getattr(getattr(config, "model_config", None), "mtp", None))
        if mtp.enable_train and id(config) not in self._patches_checked:
            # Once per actor; besides the engine's initialisation, in case the patch that hooks
            # that (mtp_forward) is the one that failed.
            from verl_mtp.plugin import require_patches

            require_patches(mtp, "the actor loss")
            self._patches_checked.add(id(config))
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
        running = self._occ_pending.get(id(config))
        self._occ_pending[id(config)] = partial if running is None else running + partial
        return log_prob.new_zeros(()), {}

    def run_occ_prepass(self, engine, data, config) -> Optional[list[float]]:
        """One no-grad forward of the mini-batch ``data`` on ``engine``; fixes lambda for it.

        Runs in eval mode, as verl computes the old log-probs. With pipeline parallelism only the
        last stage runs the loss function, so only there are sums gathered and lambda fixed (the
        other stages only pass activations on, and use no lambda); they return None.
        """
        self._occ_pending.pop(id(config), None)
        modules = engine.module if isinstance(engine.module, (list, tuple)) else [engine.module]
        modes = [m.training for m in modules]
        for m in modules:
            m.eval()
        from verl_mtp.megatron.mtp_forward import score_mtp_without_grad

        try:
            with torch.no_grad(), score_mtp_without_grad():
                engine.forward_backward_batch(data, functools.partial(self.occ_prepass_loss, config=config), forward_only=True)
        finally:
            for m, mode in zip(modules, modes):
                m.train(mode)
        partial = self._occ_pending.pop(id(config), None)
        if partial is None:
            if not _is_last_pipeline_stage():
                return None
            raise MtpLossError("the OCC pre-pass ran no micro-batch through its loss function")
        total = all_reduce_sums(partial, group=engine.get_data_parallel_group())
        mtp = as_extended(config.model_config.mtp)
        occ = self.occ_coefficients(config, mtp, total.shape[0])
        on_policy = self.on_policy(config)
        self._occ_frozen[id(config)] = [coef.update(sums, on_policy=on_policy) for coef, sums in zip(occ, total)]
        return self._occ_frozen[id(config)]

    def end_occ_mini_batch(self, config) -> None:
        self._occ_frozen.pop(id(config), None)

    def mtp_term(self, config, mtp, model_output, data, dp_group=None) -> tuple[torch.Tensor, dict]:
        from verl.trainer.ppo.core_algos import get_policy_loss_fn
        from verl.utils.metric import AggregationType, Metric

        per_micro_batch_occ = mtp.mtp_coef_mode == "occ" and mtp.occ_scope == "micro_batch"
        log_prob, q, old_log_prob, masks = _occ_inputs(model_output, data, with_grad=True, main=per_micro_batch_occ)
        depths = len(q)
        padded = _padded(data, ["advantages"] + (["rollout_is_weights"] if "rollout_is_weights" in data else []))

        if mtp.mtp_coef_mode == "occ":
            occ = self.occ_coefficients(config, mtp, depths)
            if mtp.occ_scope == "mini_batch":
                coefs = self._occ_frozen.get(id(config))
                if coefs is None:
                    raise MtpLossError(
                        "occ_scope=mini_batch but no OCC pre-pass ran for this mini-batch: the engine "
                        "train_batch patch (occ_update_schedule) is not active in this worker (check the "
                        "[verl-mtp] lines in its log); set actor_rollout_ref.model.mtp.occ_scope=micro_batch "
                        "to calibrate per micro-batch instead"
                    )
            else:
                coefs = calibrate(
                    occ, log_prob, [x.detach() for x in q], old_log_prob, masks, group=dp_group,
                    on_policy=self.on_policy(config),
                )
        else:
            occ, coefs = None, [mtp.mtp_loss_scaling_factor] * depths

        policy_loss_fn = get_policy_loss_fn(config.policy_loss.get("loss_mode", "vanilla"))
        aggregation = AggregationType.SUM if _global_info_set(config, data) else AggregationType.MEAN
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
            for name, value in pg_metrics.items():
                metrics[_depth_metric_name(name, k)] = Metric(value=value, aggregation=AggregationType.MEAN)
            metrics[f"actor/mtp_{k}/pg_loss"] = Metric(value=pg_loss.detach(), aggregation=aggregation)
            metrics[f"actor/mtp_{k}/coef"] = float(coef)
            metrics[f"actor/mtp_{k}/step_weight"] = float(weight)
            if occ is not None:
                last = occ[k - 1].last
                metrics[f"actor/mtp_{k}/occ_numerator"] = last["numerator"]
                metrics[f"actor/mtp_{k}/occ_denominator"] = last["denominator"]
                metrics[f"actor/mtp_{k}/occ_on_policy"] = last["on_policy"]
                metrics[f"actor/mtp_{k}/occ_delta_rl_rms"] = last["delta_rl_rms"]
        return term, metrics


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


# The one MtpPolicyLoss the plugin installs (engine_workers' ppo_loss and the distillation loss's
# share it, so OCC's state is one per actor config).
_installed: Optional[MtpPolicyLoss] = None


def installed_policy_loss(stock_loss: Callable) -> MtpPolicyLoss:
    global _installed
    if _installed is None or _installed.stock_loss is not stock_loss:
        _installed = MtpPolicyLoss(stock_loss)
    return _installed


def occ_target(loss_function) -> Optional[tuple[MtpPolicyLoss, Any, Any]]:
    """(installed loss, actor config, its MTP config) if ``loss_function`` trains an rl+OCC actor."""
    if not isinstance(loss_function, functools.partial):
        return None
    config = loss_function.keywords.get("config")
    # engine_workers binds the installed loss itself; the distillation loss calls it inside.
    policy_loss = loss_function.func if isinstance(loss_function.func, MtpPolicyLoss) else _installed
    if policy_loss is None or config is None:
        return None
    mtp = as_extended(getattr(getattr(config, "model_config", None), "mtp", None))
    if mtp.enable_train and mtp.mtp_loss_type == "rl" and mtp.mtp_coef_mode == "occ":
        return policy_loss, config, mtp
    return None


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
    if mtp.occ_scope != "mini_batch":
        return run()
    policy_loss.run_occ_prepass(engine, data, config)
    try:
        return run()
    finally:
        policy_loss.end_occ_mini_batch(config)
