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
``verl_mtp.align`` shifts them onto the main head's positions per sequence. Tokens without a
valid prediction leave the depth's mask; they are never zero-filled into a mean.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from verl_mtp.align import align_mtp_to_main_head
from verl_mtp.config import as_extended
from verl_mtp.occ import OccCoefficient, calibrate

MTP_LOG_PROBS_KEY = "mtp_log_probs"
MTP_VALID_KEY = "mtp_valid"


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

    def occ_coefficients(self, config: Any, mtp, depths: int) -> list[OccCoefficient]:
        coefs = self._occ.get(id(config))
        if coefs is None or len(coefs) != depths:
            coefs = [OccCoefficient.from_config(mtp) for _ in range(depths)]
            self._occ[id(config)] = coefs
        return coefs

    def __call__(self, config, model_output, data, dp_group=None):
        loss, metrics = self.stock_loss(config, model_output, data, dp_group)
        model_config = getattr(config, "model_config", None)
        mtp = as_extended(getattr(model_config, "mtp", None))
        if not (mtp.enable_train and mtp.mtp_loss_type == "rl"):
            return loss, metrics
        term, mtp_metrics = self.mtp_term(config, mtp, model_output, data, dp_group)
        metrics.update(mtp_metrics)
        return loss + term, metrics

    def mtp_term(self, config, mtp, model_output, data, dp_group=None) -> tuple[torch.Tensor, dict]:
        from verl.trainer.ppo.core_algos import get_policy_loss_fn
        from verl.utils.metric import AggregationType, Metric
        from verl.workers.utils.padding import no_padding_2_padding

        missing = [k for k in (MTP_LOG_PROBS_KEY, MTP_VALID_KEY) if k not in model_output]
        if missing:
            raise MtpLossError(
                f"mtp_loss_type=rl but the model forward delivered no {', '.join(missing)}; the MTP "
                f"log-prob forward patch is not active in this worker (check the [verl-mtp] lines in its log)"
            )
        aligned, aligned_valid = align_mtp_to_main_head(model_output[MTP_LOG_PROBS_KEY], model_output[MTP_VALID_KEY])
        mtp_log_probs = no_padding_2_padding(aligned, data)
        mtp_valid = no_padding_2_padding(aligned_valid, data).bool()
        depths = mtp_log_probs.shape[-1]

        fields = ["response_mask", "old_log_probs", "advantages"]
        if "rollout_is_weights" in data:
            fields.append("rollout_is_weights")
        padded = data.select(*fields).to_padded_tensor()
        response_mask = padded["response_mask"].bool()
        old_log_prob = padded["old_log_probs"]
        masks = [response_mask & mtp_valid[..., k] for k in range(depths)]
        # verl aggregates with mask multiplication (NaN * 0 = NaN), so positions without a valid
        # prediction get the old log-prob (ratio 1, no gradient) besides leaving the mask.
        q = [torch.where(m, mtp_log_probs[..., k], old_log_prob.detach()) for k, m in enumerate(masks)]

        if mtp.mtp_coef_mode == "occ":
            log_prob = no_padding_2_padding(model_output["log_probs"], data).detach()
            occ = self.occ_coefficients(config, mtp, depths)
            coefs = calibrate(occ, log_prob, [x.detach() for x in q], old_log_prob, masks, group=dp_group)
        else:
            occ, coefs = None, [mtp.mtp_loss_scaling_factor] * depths

        policy_loss_fn = get_policy_loss_fn(config.policy_loss.get("loss_mode", "vanilla"))
        aggregation = AggregationType.SUM if _global_info_set(config, data) else AggregationType.MEAN
        term = mtp_log_probs.new_zeros(())
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
        return term, metrics


def _global_info_set(config, data) -> bool:
    # Same rule as verl's ppo_loss for how pg_loss metrics aggregate across micro-batches.
    return (
        data["dp_size"] > 1
        or data["batch_num_tokens"] is not None
        or data["global_batch_size"] is not None
        or config.loss_scale_factor is not None
    )
