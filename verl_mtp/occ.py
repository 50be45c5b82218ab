"""Optimal Coefficient Calibration (OCC, arXiv 2605.28184) for the MTP policy-loss term.

With g_RL the RL gradient and g_MTP the gradient the MTP term sends into shared parameters, the
one-step gain of adding lambda * g_MTP is maximised at lambda* ~ <g_RL, g_MTP> / ||g_MTP||^2.
OCC replaces the gradients with a free log-probability proxy over valid response tokens:

    delta_RL  = log pi_theta - log pi_old          (main head)
    delta_MTP = log q_theta  - log pi_old          (MTP depth k)
    c_hat = sum(delta_RL * delta_MTP),  v_hat^2 = sum(delta_MTP^2)
    lambda = lambda_plus * c_hat / (v_hat^2 + eps)

Sums run over the whole global mini-batch: each rank computes its partial sums and they are
all-reduced over the data-parallel group, so every rank uses the same lambda (the reference
patch averaged per-token ratios per rank; this is a ratio of inner products, globally).

On the first mini-batch of the first epoch of a step pi_theta == pi_old by construction (no
optimizer step has happened since the old log-probs were taken), so the numerator is 0 up to
numerics: exactly 0 in fp32 with identical micro-batching, ~1e-3 per token in bf16 when the old
log-probs come from ``infer_batch`` (other micro-batch shapes) or from the rollout engine. The
formula there gives noise with a random sign, so that mini-batch is recognised from verl's update
schedule (``UpdateSchedule``), never from the size of delta_RL, and ``on_policy`` decides lambda
(see ExtendedMtpConfig.occ_on_policy_coef). With one mini-batch per step every update is
on-policy and OCC has no signal at all; the run config check refuses that schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from verl_mtp.config import ExtendedMtpConfig

_CONFIG_DEFAULTS = ExtendedMtpConfig()


class UpdateSchedule:
    """Where one actor is in verl's update loop: mini-batch 0 of a step is the on-policy one.

    ``begin_step`` is called when verl's worker starts a step's mini-batch loop (all epochs),
    ``begin_mini_batch`` each time the engine trains one mini-batch. Outside a step the position is
    unknown (``on_policy`` is None): OCC then refuses to guess.
    """

    def __init__(self) -> None:
        self.mini_batch_index: Optional[int] = None

    def begin_step(self) -> None:
        self.mini_batch_index = -1

    def end_step(self) -> None:
        self.mini_batch_index = None

    def begin_mini_batch(self) -> None:
        if self.mini_batch_index is not None:
            self.mini_batch_index += 1

    @property
    def on_policy(self) -> Optional[bool]:
        if self.mini_batch_index is None or self.mini_batch_index < 0:
            return None
        return self.mini_batch_index == 0


@torch.no_grad()
def occ_partial_sums(
    log_prob: torch.Tensor,
    mtp_log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """This rank's [c_hat, v_hat^2, ||delta_RL||^2, tokens, dropped] over ``mask``'s valid tokens.

    Positions that are masked out, or whose inputs are not finite, contribute nothing (``where``,
    not multiplication: NaN * 0 is NaN). ``dropped`` counts valid positions skipped as non-finite.
    """
    valid = mask.bool()
    delta_rl = (log_prob - old_log_prob).double()
    delta_mtp = (mtp_log_prob - old_log_prob).double()
    finite = torch.isfinite(delta_rl) & torch.isfinite(delta_mtp)
    use = valid & finite
    zero = torch.zeros((), dtype=torch.float64, device=delta_rl.device)
    delta_rl = torch.where(use, delta_rl, zero)
    delta_mtp = torch.where(use, delta_mtp, zero)
    return torch.stack(
        [
            (delta_rl * delta_mtp).sum(),
            (delta_mtp * delta_mtp).sum(),
            (delta_rl * delta_rl).sum(),
            use.sum().to(torch.float64),
            (valid & ~finite).sum().to(torch.float64),
        ]
    )


def all_reduce_sums(partial: torch.Tensor, group=None) -> torch.Tensor:
    """Sum partial statistics over ``group`` (the data-parallel group); identity without distributed."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return partial
    total = partial.clone()
    torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM, group=group)
    return total


@dataclass
class OccCoefficient:
    """lambda for one MTP depth, with the state that carries across mini-batches and steps."""

    # Defaults are the config's (one source of truth for OCC's paper defaults).
    scale: float = _CONFIG_DEFAULTS.occ_scale
    eps: float = _CONFIG_DEFAULTS.occ_eps
    ema_decay: float = _CONFIG_DEFAULTS.occ_ema_decay
    coef_min: Optional[float] = _CONFIG_DEFAULTS.occ_coef_min
    coef_max: Optional[float] = _CONFIG_DEFAULTS.occ_coef_max
    on_policy: str = _CONFIG_DEFAULTS.occ_on_policy_coef
    fixed: float = _CONFIG_DEFAULTS.mtp_loss_scaling_factor
    # state
    last_off_policy: float = 0.0
    ema: Optional[float] = None
    last: dict = field(default_factory=dict)

    def update(self, sums: torch.Tensor, on_policy: bool = False) -> float:
        """lambda from globally reduced sums [c_hat, v_hat^2, ||delta_RL||^2, tokens, dropped].

        ``on_policy``: this mini-batch is the first of its step (from the update schedule). A
        mini-batch with no valid token has no measurement and is treated the same way.
        """
        c_hat, v2, rl2, tokens, dropped = (float(x) for x in sums.tolist())
        raw = self.scale * c_hat / (v2 + self.eps) if tokens > 0 else 0.0
        on_policy = bool(on_policy) or tokens == 0
        if not math.isfinite(raw):  # cannot happen with finite sums; guard the contract anyway
            raw, on_policy = 0.0, True
        if on_policy:
            # Every lambda OCC uses is clipped, the on-policy rule's too (``previous`` already is).
            value = self._clip({"previous": self.last_off_policy, "zero": 0.0, "fixed": self.fixed}[self.on_policy])
        else:
            value = raw
            if self.ema_decay > 0.0:
                value = raw if self.ema is None else self.ema_decay * self.ema + (1.0 - self.ema_decay) * raw
                self.ema = value
            value = self._clip(value)
            self.last_off_policy = value
        self.last = {
            "coef": value,
            "raw_coef": raw,
            "numerator": c_hat,
            "denominator": v2,
            "tokens": tokens,
            "dropped_tokens": dropped,
            "on_policy": float(on_policy),
            # RMS of log pi_theta - log pi_old per token: ~0 on-policy (numerics only), grows with updates.
            "delta_rl_rms": math.sqrt(rl2 / tokens) if tokens > 0 else 0.0,
        }
        return value

    def _clip(self, value: float) -> float:
        if self.coef_min is not None:
            value = max(self.coef_min, value)
        if self.coef_max is not None:
            value = min(self.coef_max, value)
        return value

    def state_dict(self) -> dict:
        return {"last_off_policy": self.last_off_policy, "ema": self.ema}

    def load_state_dict(self, state: dict) -> None:
        self.last_off_policy = float(state["last_off_policy"])
        self.ema = None if state["ema"] is None else float(state["ema"])

    @classmethod
    def from_config(cls, mtp) -> "OccCoefficient":
        """The coefficient an ExtendedMtpConfig ``mtp`` asks for, with fresh state."""
        return cls(**{name: getattr(mtp, key) for name, key in _SETTINGS_FROM_CONFIG.items()})


# OccCoefficient's settings and the ExtendedMtpConfig field each one is read from.
_SETTINGS_FROM_CONFIG = {
    "scale": "occ_scale",
    "eps": "occ_eps",
    "ema_decay": "occ_ema_decay",
    "coef_min": "occ_coef_min",
    "coef_max": "occ_coef_max",
    "on_policy": "occ_on_policy_coef",
    "fixed": "mtp_loss_scaling_factor",
}


def calibrate(
    coefs: list[OccCoefficient],
    log_prob: torch.Tensor,
    mtp_log_probs: list[torch.Tensor],
    old_log_prob: torch.Tensor,
    masks: torch.Tensor | list[torch.Tensor],
    group=None,
    on_policy: bool = False,
) -> list[float]:
    """lambda per MTP depth: one all-reduce over ``group`` for all depths.

    ``mtp_log_probs[k]`` is depth k+1's log-prob of the sampled tokens, aligned with ``log_prob``;
    ``masks`` (one for all depths, or one per depth) marks the valid response tokens. Every rank
    returns the same values because the sums are global. ``on_policy`` as in ``OccCoefficient.update``.
    """
    if len(coefs) != len(mtp_log_probs):
        raise ValueError(f"{len(coefs)} OCC coefficients for {len(mtp_log_probs)} MTP depths")
    if isinstance(masks, torch.Tensor):
        masks = [masks] * len(mtp_log_probs)
    partial = torch.stack([occ_partial_sums(log_prob, q, old_log_prob, m) for q, m in zip(mtp_log_probs, masks)])
    total = all_reduce_sums(partial, group=group)
    return [coef.update(sums, on_policy=on_policy) for coef, sums in zip(coefs, total)]
