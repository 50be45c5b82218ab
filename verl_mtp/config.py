"""The extended ``actor_rollout_ref.model.mtp`` config: fields, validation, regime resolution.

``ExtendedMtpConfig`` subclasses verl's ``MtpConfig`` so every existing field and every
``isinstance`` check keeps working. The plugin (``verl_mtp.patches``) makes verl build this class
on both of its config-to-dataclass paths. Validation happens in ``__post_init__`` so a bad value
fails wherever the config is first turned into a dataclass; ``verl_mtp.run_checks`` adds the
checks that need the whole run config (strategy, model checkpoint, rollout engine) in the driver.

This module is the floor the rest of verl-mtp stands on: it holds (or, from ``verl_mtp.config_base``,
the verl-free part, re-exports) every choice tuple, the derived switches modules read
(``uses_occ``, ``speculative_rollout``, ...), the one dotted-key reader ``select`` and the one
flat-fields-to-typed-object mapping ``section``; it imports nothing from ``verl_mtp.rollout``,
the patch layer or ``run_checks``.
"""

from __future__ import annotations

import difflib
import functools
import math
import sys
from dataclasses import dataclass, fields
from typing import Any, Iterable, Optional

from verl_mtp.config_base import (  # noqa: F401 - re-exported: the verl-free part of the config
    DRAFT_SAMPLE_METHODS,
    MTP_KEY_PREFIX,
    SPECULATIVE_ENGINES,
    read_local_hf_config,
    select,
)
from verl_mtp.errors import MtpConfigError, invalid_value
from verl_mtp.models.families import DEPTH_KEYS, mtp_depths

# verl's own class; after the plugin is active, verl.workers.config.MtpConfig names the subclass below.
from verl.workers.config.model import MtpConfig as VerlMtpConfig

# decoupled: the shared parameters (trunk, embedding, lm_head) get only the policy-loss MTP term
# (mtp_loss_type=rl, with its lambda), the MTP module's own parameters only the drafter loss.
TRAINING_MODES = ("disabled", "standalone", "joint", "decoupled")
LOSS_TYPES = ("ce", "rl")
COEF_MODES = ("fixed", "occ")
DRAFTER_LOSSES = ("ce", "kl", "tv")
# What OCC's lambda is when pi_theta == pi_old (first mini-batch of a step): the proxy
# numerator is exactly 0 there, so the paper's formula would switch the MTP term off.
OCC_ON_POLICY_COEFS = ("previous", "zero", "fixed")
# Which tokens OCC's sums run over: each micro-batch across data-parallel ranks (free; the paper's
# cost) or the whole global mini-batch (exact; one extra no-grad forward of the mini-batch).
OCC_SCOPES = ("micro_batch", "mini_batch")
# drafter_sync_check: auto (default: raise where verl-mtp can verify the drafter, i.e. vLLM; where it
# cannot, e.g. SGLang or delta_sharded, run unverified after one loud config-time warning) | raise
# (refuse such a run) | warn (+ speculation off for the next step) | off.
DRAFTER_SYNC_CHECKS = ("auto", "raise", "warn", "off")
# actor_rollout_ref.actor.strategy values MTP runs on.
SUPPORTED_STRATEGIES = ("megatron",)


def _error(key: str, value: Any, expected: str) -> MtpConfigError:
    return MtpConfigError(invalid_value(f"{MTP_KEY_PREFIX}.{key}", value, expected))


def _check_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise _error(key, value, f"valid choices are {', '.join(choices)}")


# What OmegaConf's BooleanNode turns into a bool (the structured-config path converts with it; the
# Hydra `_target_` path and plain Python hand strings through, so we convert the same way):
# bools, integers and integer strings (0 is False), and these words in any case.
_TRUE_WORDS = ("true", "yes", "on", "y")
_FALSE_WORDS = ("false", "no", "off", "n")
BOOL_CHOICES = "true or false (also yes/no, on/off, y/n in any case, or an integer: 0 = false)"


def _to_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value != 0
    if isinstance(value, str):
        try:
            return int(value) != 0
        except ValueError:
            pass
        if value.lower() in _TRUE_WORDS:
            return True
        if value.lower() in _FALSE_WORDS:
            return False
    raise _error(key, value, f"expected a boolean: {BOOL_CHOICES}")


def unknown_keys_error(unknown: Iterable[str], valid: Iterable[str]) -> MtpConfigError:
    """Unknown ``mtp.*`` keys, each with the closest valid key when one is close."""
    valid = sorted(set(valid) - {"_target_"})
    named = []
    for key in sorted(unknown):
        close = difflib.get_close_matches(key, valid, n=1)
        named.append(f"{MTP_KEY_PREFIX}.{key}" + (f" (did you mean {close[0]}?)" if close else ""))
    return MtpConfigError(f"unknown key(s) {', '.join(named)}; valid keys are {', '.join(valid)}")


def _check_finite(key: str, value: Any, *, minimum: float | None = None, strict: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _error(key, value, "expected a finite number")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise _error(key, value, f"expected a number {'>' if strict else '>='} {minimum}")


@dataclass
class ExtendedMtpConfig(VerlMtpConfig):
    """verl's ``MtpConfig`` plus the verl-mtp knobs. Defaults reproduce stock verl behaviour.

    Training regime (one knob, ROLL's names):
        mtp_training_mode: ``disabled`` | ``standalone`` | ``joint`` | ``decoupled``; ``None``
            derives it from verl's ``enable_train`` / ``detach_encoder``. When set, it drives those
            switches (and implies ``enable=True`` for the training modes); a switch set against it is
            an error. ``decoupled`` (``mtp_loss_type=rl`` only) splits the gradient by parameter
            group: the shared parameters (trunk, embedding, lm_head) receive only the policy-loss
            MTP term with its lambda (fixed or OCC), the MTP module's own parameters only the
            drafter loss (``mtp_drafter_loss``, scaled by ``mtp_loss_scaling_factor``), exactly as
            the standalone regime trains them.
    Loss:
        mtp_loss_type: ``ce`` (cross-entropy, verl's behaviour) or ``rl`` (the actor's policy loss
            applied to the MTP head's log-probs; arXiv 2605.28184's field name).
        mtp_drafter_loss: the MTP head's drafting objective (standalone ``ce`` or decoupled):
            ``ce`` (cross-entropy on the sampled token), ``kl`` (forward KL to the main head's
            distribution at the position the depth predicts, at the rollout temperature; soft
            cross-entropy's gradient) or ``tv`` (total variation to it: one minus probabilistic
            drafting's acceptance). The main head is detached.
        mtp_coef_mode: ``fixed`` (``mtp_loss_scaling_factor``) or ``occ`` (Optimal Coefficient
            Calibration, ``rl`` only).
        occ_scale: OCC's lambda_plus. occ_eps: OCC's denominator epsilon.
        occ_ema_decay: EMA of lambda across mini-batches; 0 = off (paper).
        occ_coef_min / occ_coef_max: clip lambda; None = off (paper; lambda may go negative).
        occ_on_policy_coef: lambda when pi_theta == pi_old (OCC numerator exactly 0):
            ``previous`` = last lambda measured off-policy (0 before the first), ``zero``,
            ``fixed`` = ``mtp_loss_scaling_factor``.
        occ_scope: ``micro_batch`` = sums over each micro-batch on all data-parallel ranks (no
            extra compute), ``mini_batch`` = sums over the whole global mini-batch before its
            update (one extra no-grad forward of the mini-batch, ~+50% step time on the CPU
            benchmark).
    Depths:
        mtp_step_weight_beta: depth k's loss weight is beta**(k-1); 1.0 = uniform.
        mtp_num_layers: how many MTP depths to use; None = all the checkpoint has.
    Memory:
        mtp_logits_chunk_tokens: an MTP depth builds its vocabulary-sized logits this many tokens
            at a time (forward and backward: chunks are rebuilt in backward instead of saved);
            0 = the whole micro-batch at once.
    Checkpoints:
        mtp_allow_fresh_head_on_resume: loading a checkpoint saved without MTP into an MTP run
            fails unless this is True; then the MTP head keeps its fresh initialisation (logged)
            and the optimizer must not be loaded (verl_mtp.ckpt.mtp_manifest).
    Rollout:
        drafter_sync_check: after every weight sync, verify that the rollout engine's MTP drafter
            holds the trainer's MTP weights (fingerprints, verl_mtp.rollout.drafter_sync):
            ``auto`` (default: ``raise`` where the check can run, i.e. vLLM; elsewhere, e.g. SGLang, a
            loud config-time warning that the drafter is not verified), ``raise``
            (DrafterOutOfSyncError; a rollout path that cannot be checked is refused at config
            time), ``warn`` (loud warning, metric rollout/mtp_drafter_in_sync = 0, speculation-off
            requested for the next step: advisory on engines without a runtime switch) or ``off``.
        draft_sample_method: how the rollout engine's drafter picks draft tokens (vLLM >= 0.24
            ``speculative_config.draft_sample_method``): ``greedy`` (argmax of the head's
            distribution q; a draft is accepted with probability p(argmax q)), ``probabilistic``
            (sampled from q, accepted with min(1, p/q): sum min(p, q) = 1 - TV(p, q) per position;
            for heads trained to match the policy's distribution at temperature ~1), or None (the
            engine's default: greedy on vLLM). SGLang has no such argument (it drafts greedily).
        spec_step_metrics: log exact per-step speculative-decoding metrics summed over replicas
            (rollout/mtp_spec_*, rollout/mtp_gen_throughput; verl_mtp.rollout.spec_metrics).
        adaptive_speculation: let a policy measure throughput with vs without speculation and
            decide per step whether to speculate (verl_mtp.rollout.adaptive); off by default.
            vLLM 0.24 / SGLang 0.5.12 have no runtime switch, so there it is advisory (logged).
        adaptive_spec_probe_interval / adaptive_spec_probe_steps: every this many steps, run
            this many steps in the other mode to re-measure it.
        adaptive_spec_min_gain: relative throughput gain speculation must show to be (re)enabled;
            it is turned off below min_gain - adaptive_spec_hysteresis.
        adaptive_spec_min_dwell_steps: no switch within this many steps of the last one.
        adaptive_spec_window: throughput samples per mode whose median is compared.
        spec_accept_collapse_fraction / spec_accept_collapse_window: flag (rollout/
            mtp_accept_collapse) a step whose acceptance is below this fraction of the median of
            the last this-many steps (the stale-drafter symptom).
    """

    mtp_training_mode: Optional[str] = None
    mtp_loss_type: str = "ce"
    mtp_drafter_loss: str = "ce"
    mtp_coef_mode: str = "fixed"
    occ_scale: float = 1.0
    occ_eps: float = 1e-8
    occ_ema_decay: float = 0.0
    occ_coef_min: Optional[float] = None
    occ_coef_max: Optional[float] = None
    occ_on_policy_coef: str = "previous"
    occ_scope: str = "micro_batch"
    mtp_step_weight_beta: float = 1.0
    mtp_num_layers: Optional[int] = None
    mtp_logits_chunk_tokens: int = 2048
    mtp_allow_fresh_head_on_resume: bool = False
    drafter_sync_check: str = "auto"
    draft_sample_method: Optional[str] = None
    spec_step_metrics: bool = True
    adaptive_speculation: bool = False
    adaptive_spec_probe_interval: int = 10
    adaptive_spec_probe_steps: int = 1
    adaptive_spec_min_gain: float = 0.05
    adaptive_spec_hysteresis: float = 0.05
    adaptive_spec_min_dwell_steps: int = 3
    adaptive_spec_window: int = 3
    spec_accept_collapse_fraction: float = 0.5
    spec_accept_collapse_window: int = 8

    def __post_init__(self):
        self._coerce_booleans()
        self._resolve_training_mode()
        self._validate()

    # BaseConfig freezes fields once set, so resolution writes through object.__setattr__.
    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    def _coerce_booleans(self) -> None:
        # Before regime resolution: a string such as "no" is truthy and would pick the wrong regime.
        for name in _BOOL_FIELDS:
            self._set(name, _to_bool(name, getattr(self, name)))

    def _resolve_training_mode(self) -> None:
        mode = self.mtp_training_mode
        if mode is None:
            if not (self.enable and self.enable_train):
                mode = "disabled"
            else:
                mode = "standalone" if self.detach_encoder else "joint"
            if self.enable_train and not self.enable:
                raise _error(
                    "enable_train", True, "it has no effect while enable=False; set enable=True or "
                    "use mtp_training_mode=standalone|joint (which implies enable=True)"
                )
            self._set("mtp_training_mode", mode)
            return

        _check_choice("mtp_training_mode", mode, TRAINING_MODES)
        # The legacy switches default to False: a False switch follows the mode, a True one that
        # contradicts it was set on purpose and is an error.
        if mode == "disabled":
            if self.enable_train:
                raise _error(
                    "mtp_training_mode", mode, "it conflicts with enable_train=True; "
                    "drop enable_train or choose mtp_training_mode=standalone|joint"
                )
            return
        if mode in ("joint", "decoupled") and self.detach_encoder:
            raise _error(
                "mtp_training_mode", mode, "it conflicts with detach_encoder=True; "
                "drop detach_encoder or choose mtp_training_mode=standalone"
            )
        self._set("enable", True)
        self._set("enable_train", True)
        self._set("detach_encoder", mode == "standalone")

    def _validate(self) -> None:
        _check_choice("mtp_loss_type", self.mtp_loss_type, LOSS_TYPES)
        _check_choice("mtp_coef_mode", self.mtp_coef_mode, COEF_MODES)
        _check_choice("mtp_drafter_loss", self.mtp_drafter_loss, DRAFTER_LOSSES)
        if self.mtp_training_mode == "decoupled" and self.mtp_loss_type != "rl":
            raise _error(
                "mtp_training_mode", "decoupled", "it splits the policy-loss MTP term (shared parameters) from "
                f"the drafter loss (MTP module): set mtp_loss_type=rl (got {self.mtp_loss_type!r}), or use "
                "mtp_training_mode=standalone for a drafter-only head"
            )
        if self.mtp_drafter_loss != "ce" and not self.trains_drafter_loss:
            raise _error(
                "mtp_drafter_loss", self.mtp_drafter_loss, "kl and tv train the MTP module toward the main "
                "head: set mtp_training_mode=standalone with mtp_loss_type=ce, or mtp_training_mode=decoupled "
                f"with mtp_loss_type=rl (got mtp_training_mode={self.mtp_training_mode!r}, "
                f"mtp_loss_type={self.mtp_loss_type!r}), or use mtp_drafter_loss=ce"
            )
        _check_choice("occ_on_policy_coef", self.occ_on_policy_coef, OCC_ON_POLICY_COEFS)
        _check_choice("occ_scope", self.occ_scope, OCC_SCOPES)
        _check_choice("drafter_sync_check", self.drafter_sync_check, DRAFTER_SYNC_CHECKS)
        if self.draft_sample_method is not None and self.draft_sample_method not in DRAFT_SAMPLE_METHODS:
            raise _error("draft_sample_method", self.draft_sample_method,
                         f"valid choices are {', '.join(DRAFT_SAMPLE_METHODS)}, or null (the engine's default)")
        _check_finite("mtp_loss_scaling_factor", self.mtp_loss_scaling_factor, minimum=0.0)
        _check_finite("occ_scale", self.occ_scale, minimum=0.0, strict=True)
        _check_finite("occ_eps", self.occ_eps, minimum=0.0, strict=True)
        _check_finite("occ_ema_decay", self.occ_ema_decay, minimum=0.0)
        if self.occ_ema_decay >= 1.0:
            raise _error("occ_ema_decay", self.occ_ema_decay, "expected 0 <= decay < 1 (0 = off)")
        for key in ("occ_coef_min", "occ_coef_max"):
            if getattr(self, key) is not None:
                _check_finite(key, getattr(self, key))
        if self.occ_coef_min is not None and self.occ_coef_max is not None and self.occ_coef_min > self.occ_coef_max:
            raise _error("occ_coef_min", self.occ_coef_min, f"it is above occ_coef_max={self.occ_coef_max}")
        _check_finite("mtp_step_weight_beta", self.mtp_step_weight_beta, minimum=0.0, strict=True)
        n = self.mtp_num_layers
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise _error("mtp_num_layers", n, "expected a positive integer, or null to use every depth")
        c = self.mtp_logits_chunk_tokens
        if isinstance(c, bool) or not isinstance(c, int) or c < 0:
            raise _error("mtp_logits_chunk_tokens", c, "expected an integer >= 0 (tokens per logits chunk; 0 = unchunked)")
        self._validate_speculation_policy()

        if self.mtp_loss_type == "rl" and self.mtp_training_mode == "disabled":
            raise _error(
                "mtp_loss_type", "rl", "the RL policy loss needs the MTP head in training; "
                "set mtp_training_mode=standalone or joint (or enable=True enable_train=True)"
            )
        if self.mtp_coef_mode == "occ" and self.mtp_loss_type != "rl":
            raise _error(
                "mtp_coef_mode", "occ", f"OCC calibrates the RL policy loss; set mtp_loss_type=rl "
                f"(got mtp_loss_type={self.mtp_loss_type!r}) or use mtp_coef_mode=fixed"
            )

    def _validate_speculation_policy(self) -> None:
        for key, minimum in (("adaptive_spec_probe_steps", 1), ("adaptive_spec_min_dwell_steps", 1),
                             ("adaptive_spec_window", 1), ("spec_accept_collapse_window", 2)):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                raise _error(key, v, f"expected an integer >= {minimum}")
        p = self.adaptive_spec_probe_interval
        if isinstance(p, bool) or not isinstance(p, int) or p <= self.adaptive_spec_probe_steps:
            raise _error("adaptive_spec_probe_interval", p, f"expected an integer > adaptive_spec_probe_steps="
                         f"{self.adaptive_spec_probe_steps} (steps between probes)")
        _check_finite("adaptive_spec_min_gain", self.adaptive_spec_min_gain)
        _check_finite("adaptive_spec_hysteresis", self.adaptive_spec_hysteresis, minimum=0.0)
        f = self.spec_accept_collapse_fraction
        _check_finite("spec_accept_collapse_fraction", f, minimum=0.0, strict=True)
        if f >= 1.0:
            raise _error("spec_accept_collapse_fraction", f, "expected 0 < fraction < 1")
        if self.adaptive_speculation and not (self.enable and self.enable_rollout):
            raise _error("adaptive_speculation", True, "it needs speculative rollout; set enable=True and "
                         "enable_rollout=True, or adaptive_speculation=False")

    # --- derived switches: what the settings above mean, computed once here -------------------

    @property
    def is_training(self) -> bool:
        return self.mtp_training_mode != "disabled"

    @property
    def is_decoupled(self) -> bool:
        """The policy-loss term trains the shared parameters, the drafter loss the MTP module."""
        return self.enable_train and self.mtp_training_mode == "decoupled"

    @property
    def trains_drafter_loss(self) -> bool:
        """The MTP module trains on ``mtp_drafter_loss`` (standalone ce, or decoupled)."""
        return (self.mtp_training_mode == "standalone" and self.mtp_loss_type == "ce") or self.is_decoupled

    @property
    def uses_rl_loss(self) -> bool:
        """The MTP head trains on the actor's policy loss (``mtp_loss_type=rl``)."""
        return self.enable_train and self.mtp_loss_type == "rl"

    @property
    def uses_occ(self) -> bool:
        """OCC calibrates the MTP coefficient (rl loss with ``mtp_coef_mode=occ``)."""
        return self.uses_rl_loss and self.mtp_coef_mode == "occ"

    @property
    def needs_occ_prepass(self) -> bool:
        """OCC over the whole mini-batch: one extra no-grad forward before each update."""
        return self.uses_occ and self.occ_scope == "mini_batch"

    @property
    def occ_per_micro_batch(self) -> bool:
        """OCC's sums are taken in each micro-batch's loss (no pre-pass)."""
        return self.uses_occ and self.occ_scope == "micro_batch"

    @property
    def speculative_rollout(self) -> bool:
        """The rollout engine drafts with the MTP head."""
        return bool(self.enable and self.enable_rollout)

    @property
    def checks_drafter_sync(self) -> bool:
        """The drafter is fingerprinted after every weight sync."""
        return self.speculative_rollout and self.drafter_sync_check != "off"

    @property
    def logs_spec_step_metrics(self) -> bool:
        """Exact per-step speculative-decoding metrics are logged."""
        return self.speculative_rollout and bool(self.spec_step_metrics)

    def section(self, prefix: str) -> dict[str, Any]:
        """The fields named ``<prefix><name>``, as ``{name: value}``: the one mapping from this flat
        config to the typed settings objects of the features (``SomeSettings(**mtp.section("x_"))``).
        A field added under ``prefix`` without a matching parameter fails loudly there."""
        return {f.name[len(prefix):]: getattr(self, f.name) for f in fields(self) if f.name.startswith(prefix)}

    def step_weights(self, num_depths: int) -> list[float]:
        """Loss weight of each depth k = 1..num_depths: beta**(k-1)."""
        return [self.mtp_step_weight_beta**k for k in range(num_depths)]


# Fields verl's own MtpConfig declares; everything else on ExtendedMtpConfig is ours.
VERL_MTP_FIELDS = tuple(f.name for f in fields(VerlMtpConfig))
PLUGIN_MTP_FIELDS = tuple(f.name for f in fields(ExtendedMtpConfig) if f.name not in VERL_MTP_FIELDS)
MTP_FIELDS = frozenset(f.name for f in fields(ExtendedMtpConfig))
# verl's fields are annotated with the type, ours (postponed annotations) with its name.
_BOOL_FIELDS = tuple(f.name for f in fields(ExtendedMtpConfig) if f.type in (bool, "bool"))


def _init_rejecting_unknown_keys(init):
    # Hydra's `_target_` path calls the class with the node's keys: a misspelt key would
    # otherwise surface as a bare TypeError from the generated __init__.
    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        unknown = set(kwargs) - MTP_FIELDS
        if unknown:
            raise unknown_keys_error(unknown, MTP_FIELDS)
        init(self, *args, **kwargs)

    return __init__


ExtendedMtpConfig.__init__ = _init_rejecting_unknown_keys(ExtendedMtpConfig.__init__)


def as_extended(mtp_config: Any) -> ExtendedMtpConfig:
    """Return ``mtp_config`` as an ExtendedMtpConfig (a plain verl MtpConfig gets the defaults).

    dataclass ``__init__`` bakes in the default factory, so ``HFModelConfig(...)`` built without
    an ``mtp`` argument still holds verl's plain MtpConfig even with the plugin active.
    """
    if isinstance(mtp_config, ExtendedMtpConfig):
        return mtp_config
    if mtp_config is None:
        return ExtendedMtpConfig()
    if isinstance(mtp_config, VerlMtpConfig):
        values = {f.name: getattr(mtp_config, f.name) for f in fields(VerlMtpConfig)}
    else:  # a DictConfig / dict
        values = {k: v for k, v in dict(mtp_config).items()}
    values.pop("_target_", None)
    unknown = set(values) - MTP_FIELDS
    if unknown:
        raise unknown_keys_error(unknown, MTP_FIELDS)
    return ExtendedMtpConfig(**values)


# --- MTP depth detection from a Hugging Face config ------------------------------------------

def detect_mtp_depths(hf_config: Any) -> int:
    """Number of MTP depths a Hugging Face config declares (0 if none).

    Accepts a transformers ``PretrainedConfig`` or a plain dict (``config.json``); looks at
    ``num_nextn_predict_layers`` (MiMo, DeepSeek-V3, GLM-4.5) and ``mtp_num_hidden_layers``
    (Qwen3-Next, Qwen3.5), also under ``text_config`` (``verl_mtp.models`` holds the per-family
    names, shared with the checkpoint tools).
    """
    return mtp_depths(hf_config)


def resolve_mtp_depths(mtp: ExtendedMtpConfig, checkpoint_depths: int) -> int:
    """The number of depths a run trains/uses, given what the checkpoint declares."""
    if not mtp.enable:
        return 0
    if checkpoint_depths <= 0:
        raise MtpConfigError(
            f"{MTP_KEY_PREFIX}.enable=True but the model declares no MTP layers "
            f"(none of {', '.join(DEPTH_KEYS)} is > 0 in its config.json, nor under text_config); "
            f"use a checkpoint with an MTP head (MiMo, DeepSeek-V3, GLM-4.5, Qwen3-Next, Qwen3.5) or set enable=False"
        )
    if mtp.mtp_num_layers is None:
        return checkpoint_depths
    if mtp.mtp_num_layers > checkpoint_depths:
        raise _error(
            "mtp_num_layers", mtp.mtp_num_layers,
            f"the checkpoint has only {checkpoint_depths} MTP depth(s); choose 1..{checkpoint_depths} or null",
        )
    return mtp.mtp_num_layers

