"""verl-mtp's MTP forward on the Megatron engine, for both MTP loss types.

Two steps, both inside one micro-batch forward of verl's ``MegatronEngineWithLMHead``:

1. ``mtp_postprocess`` replaces ``GPTModel._postprocess`` (installed over verl's own MTP
   postprocess by ``install_mtp_postprocess``). It runs the MTP block and returns the main logits
   as verl does. For ``ce`` it attaches each depth's cross-entropy itself (so the regime's
   detach really holds on every megatron-core, and per-depth step weights apply); for ``rl`` it
   computes no cross-entropy (the policy loss trains the head). ``decoupled`` runs the block twice
   (``verl_mtp.megatron.decoupled``): the policy pass's hidden states go to the rl log-probs, the
   drafter pass's to the drafter loss. Either way it leaves the depth hidden states / agreement for
   step 2.
2. ``logits_processor_with_mtp`` wraps the engine's ``_lm_head_logits_processor``. It knows the
   rollout temperature; for ``rl`` it scores the sampled tokens under each depth
   (``verl_mtp.megatron.mtp_log_probs``). It returns extra keys (log-probs, validity, argmax
   agreement), which verl un-packs (THD or BSHD, context-parallel gather) exactly like
   ``log_probs``.

The plan (loss type, detach, depth scales, chunk size) is fixed per model and both steps read it
from the model (``forward_plan``). The per-forward tensors go from step 1 to step 2 in a
per-thread slot. Every postprocess call empties it before anything else (so a stash never
outlives the model forward that made it), step 2 empties it again when it takes it, and step 2
uses a stash only when it came from one of its own engine's model chunks and matches the
logits' shape. The logits tensor itself is not the key: megatron's ``Float16Module`` (every
bf16/fp16 run) hands the processor ``logits.float()``, a new tensor, and DDP or virtual-pipeline
wrappers may do likewise.
"""

from __future__ import annotations

import inspect
import threading
import types
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from verl_mtp.megatron.keys import MTP_AGREE_KEY, MTP_LOG_PROBS_KEY, MTP_VALID_KEY
from verl_mtp.megatron.wrappers import unwrap_model

# verl's engine puts the routed/loss token ratio here when megatron normalises per token.
_VERL_NORMALIZATION_FACTOR_ATTR = "_verl_mtp_loss_normalization_factor"


@dataclass(frozen=True)
class MtpForwardPlan:
    """What the postprocess does with the MTP heads, fixed at engine initialisation.

    It lives on the GPTModel it is installed on (``install_mtp_postprocess``; ``forward_plan``
    reads it back): both steps of the forward take it from there, never from a second copy.
    """

    loss_type: str  # "ce" | "rl"
    detach_output_layer: bool  # standalone: the lm_head learns nothing from MTP
    ce_depth_scales: tuple = ()  # ce: depth k's loss scale, lambda * beta**(k-1) / K
    chunk_tokens: int = 0  # tokens per vocabulary-sized logits chunk of a depth; 0 = unchunked
    drafter_loss: str = "ce"  # ce: cross-entropy on the sampled token; kl | tv: to the main head
    decoupled: bool = False  # rl term into the shared parameters only, drafter loss into the MTP module only

    @classmethod
    def for_model(cls, mtp, model_config) -> "MtpForwardPlan":
        """The plan for a GPTModel with TransformerConfig ``model_config`` under the run's ExtendedMtpConfig ``mtp``."""
        depths = model_config.mtp_num_layers
        # ce keeps megatron's convention (the scaling factor split evenly over depths) so
        # beta = 1 reproduces verl's loss exactly.
        scale = model_config.mtp_loss_scaling_factor / depths
        return cls(
            loss_type=mtp.mtp_loss_type,
            # standalone: no MTP gradient into the lm_head either (verl's 0.18 path leaks it)
            detach_output_layer=mtp.detach_encoder,
            ce_depth_scales=tuple(scale * w for w in mtp.step_weights(depths)),
            chunk_tokens=mtp.mtp_logits_chunk_tokens,
            drafter_loss=getattr(mtp, "mtp_drafter_loss", "ce"),
            decoupled=mtp.mtp_training_mode == "decoupled",
        )

    @property
    def trains_drafter_loss(self) -> bool:
        """The MTP module's own loss (ce / kl / tv) is attached: standalone or joint ce, or decoupled."""
        return self.loss_type == "ce" or self.decoupled

    @property
    def drafts_against_main_head(self) -> bool:
        """kl / tv: the loss needs the rollout temperature, so the logits processor attaches it."""
        return self.trains_drafter_loss and self.drafter_loss != "ce"

    @property
    def drafter_detach_output_layer(self) -> bool:
        """Decoupled: the lm_head is shared, so the drafter loss must not train it."""
        return self.detach_output_layer or self.decoupled


@dataclass
class _PendingMtp:
    """What one model forward leaves for the logits processor (its plan stays on ``model``)."""

    model: Any
    hidden_chunks: tuple
    labels: torch.Tensor
    output_weight: Optional[torch.Tensor]
    packed_seq_params: Any
    cp_group: Any
    runtime_gather_output: Any
    agree: Optional[torch.Tensor] = None  # ce: computed with the loss, [b, s, K]
    valid: Optional[torch.Tensor] = None
    logits_shape: tuple = ()  # [b, s, V/tp] of the main logits this stash belongs to
    drafter: Optional[dict] = None  # kl / tv: what the processor's drafter loss needs besides the temperature


_slot = threading.local()


def _put(pending: _PendingMtp) -> None:
    _slot.pending = pending


def _take() -> Optional[_PendingMtp]:
    pending = getattr(_slot, "pending", None)
    _slot.pending = None
    return pending


def _belongs_to(pending: _PendingMtp, engine, logits: torch.Tensor) -> bool:
    """Whether ``pending`` was made by ``engine``'s model for these ``logits`` (any wrapper, any dtype)."""
    if tuple(logits.shape) != pending.logits_shape:
        return False
    chunks = getattr(engine, "module", None)
    if chunks is None:  # a bare processor outside an engine (single-model tools): the shape must do
        return True
    chunks = chunks if isinstance(chunks, (list, tuple)) else [chunks]
    return any(unwrap_model(chunk) is pending.model for chunk in chunks)


def _cp_group(model, packed_seq_params):
    # A per-micro-batch dynamic CP group on the packed params wins over the model's static one.
    group = getattr(packed_seq_params, "cp_group", None)
    if group is None:
        group = getattr(model, "cp_group", None)
    if group is None:
        group = getattr(getattr(model, "pg_collection", None), "cp", None)
    return group


def _record_ce_loss(model):
    from megatron.core import parallel_state
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    def record(loss_for_log, layer_number):
        # The tracker verl reads into mtp_losses/mtp_{k}_loss, averaged like megatron's own.
        MTPLossLoggingHelper.save_loss_to_tracker(
            loss_for_log,
            layer_number,
            model.config.mtp_num_layers,
            avg_group=parallel_state.get_data_parallel_group(with_context_parallel=True),
        )

    return record if model.training else None


class score_mtp_without_grad:
    """Context in which no-grad forwards still run the MTP heads (OCC's pre-pass needs them)."""

    def __enter__(self):
        _slot.score_without_grad = getattr(_slot, "score_without_grad", 0) + 1

    def __exit__(self, *exc):
        _slot.score_without_grad -= 1


def _mtp_wanted() -> bool:
    # verl passes labels to every actor forward while MTP trains, including the no-grad
    # old-log-prob pass (compute_log_prob), which has no use for the MTP heads: skip them there.
    return torch.is_grad_enabled() or getattr(_slot, "score_without_grad", 0) > 0


def _output_weight(model):
    return model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else None


def _main_logits(model, hidden, output_weight, kw):
    logits, _ = model.output_layer(hidden, weight=output_weight, runtime_gather_output=kw.get("runtime_gather_output"))
    return logits.transpose(0, 1).contiguous()


def _main_logits_only(self, kw):
    if not self.post_process:
        return kw["hidden_states"]
    return _main_logits(self, kw["hidden_states"], _output_weight(self), kw)


def _run_mtp_block(model, kw, hidden_states=None):
    """The MTP block over the trunk's hidden states (``kw``'s, or ``hidden_states``): [main; depth 1;
    ...; depth K] along the sequence."""
    block_kwargs = dict(kw.get("extra_block_kwargs") or {})
    if "padding_mask" in model._verl_mtp_block_params:
        block_kwargs["padding_mask"] = kw.get("padding_mask")
    return model.mtp(
        input_ids=kw["input_ids"],
        position_ids=kw["position_ids"],
        hidden_states=kw["hidden_states"] if hidden_states is None else hidden_states,
        attention_mask=kw.get("attention_mask"),
        inference_params=kw.get("inference_params"),
        rotary_pos_emb=kw.get("rotary_pos_emb"),
        rotary_pos_cos=kw.get("rotary_pos_cos"),
        rotary_pos_sin=kw.get("rotary_pos_sin"),
        packed_seq_params=kw.get("packed_seq_params"),
        sequence_len_offset=kw.get("sequence_len_offset"),
        embedding=model.embedding,
        **block_kwargs,
    )


def _loss_scales(model, plan: MtpForwardPlan, packed_seq_params):
    """(per-token loss?, depth scales, logits scaling) of the MTP loss terms attached to the graph."""
    factor = getattr(packed_seq_params, _VERL_NORMALIZATION_FACTOR_ATTR, None)
    per_token = bool(model.config.calculate_per_token_loss)
    scales = plan.ce_depth_scales
    if per_token and factor is not None:  # as verl's postprocess: normalise against routed tokens
        scales = tuple(s * factor for s in scales)
    use_mup = getattr(model.config, "use_mup", False) and hasattr(model, "_scale_logits")
    return per_token, scales, model._scale_logits if use_mup else None


def _drafter_stash(model, plan: MtpForwardPlan, main_hidden, drafter_chunks, kw):
    """kl / tv: the main head's hidden states, the depths' hidden states the drafter loss trains and
    the loss's settings, for the logits processor."""
    per_token, scales, scale_logits_fn = _loss_scales(model, plan, kw.get("packed_seq_params"))
    return dict(main_hidden=main_hidden, student_chunks=drafter_chunks, loss_mask=kw.get("loss_mask"),
                depth_scales=scales, per_token_loss=per_token, scale_logits_fn=scale_logits_fn,
                record=_record_ce_loss(model))


def _attach_drafter_losses(pending: "_PendingMtp", plan: MtpForwardPlan, result: dict, temperature):
    """kl / tv: each depth's divergence from the main head attached to the processor's log-probs
    (which every policy loss reads; verl's processor divides the logits in place, so they cannot
    carry it). Called after verl's processor, whose temperature has its padding made positive.
    Returns (agree, valid)."""
    from verl_mtp.megatron.drafter_losses import add_mtp_drafter_losses

    if "log_probs" not in result:
        raise RuntimeError(
            f"mtp_drafter_loss={plan.drafter_loss}: the MTP drafter loss rides on the main head's log-probs, "
            "which this forward does not compute (distillation_only); use mtp_drafter_loss=ce"
        )
    carrier, agree, valid = add_mtp_drafter_losses(
        result["log_probs"], pending.drafter["main_hidden"], pending.drafter["student_chunks"], pending.labels,
        pending.drafter["loss_mask"], plan.drafter_loss, temperature,
        output_layer=pending.model.output_layer, output_weight=pending.output_weight,
        depth_scales=pending.drafter["depth_scales"], per_token_loss=pending.drafter["per_token_loss"],
        record=pending.drafter["record"], detach_output_layer=plan.drafter_detach_output_layer,
        scale_logits_fn=pending.drafter["scale_logits_fn"], cp_group=pending.cp_group,
        packed_seq_params=pending.packed_seq_params, runtime_gather_output=pending.runtime_gather_output,
        chunk_tokens=plan.chunk_tokens,
    )
    # a copy ([tokens] only): the carrier returns its input as a view, which later in-place edits may not touch
    result["log_probs"] = carrier.clone()
    return agree, valid


def _attach_ce_losses(model, plan: MtpForwardPlan, chunks, kw, output_weight, cp_group):
    """ce: each depth's cross-entropy attached to the main hidden states; (main hidden, agree, valid)."""
    from verl_mtp.megatron.mtp_log_probs import add_mtp_ce_losses

    packed_seq_params = kw.get("packed_seq_params")
    per_token, scales, scale_logits_fn = _loss_scales(model, plan, packed_seq_params)
    return add_mtp_ce_losses(
        chunks[0],
        chunks[1:],
        kw["labels"],
        kw.get("loss_mask"),
        output_layer=model.output_layer,
        output_weight=output_weight,
        compute_language_model_loss=model.compute_language_model_loss,
        depth_scales=scales,
        per_token_loss=per_token,
        record=_record_ce_loss(model),
        detach_output_layer=plan.drafter_detach_output_layer,
        scale_logits_fn=scale_logits_fn,
        cp_group=cp_group,
        packed_seq_params=packed_seq_params,
        runtime_gather_output=kw.get("runtime_gather_output"),
        chunk_tokens=plan.chunk_tokens,
    )


def mtp_postprocess(self, **kw):
    """``GPTModel._postprocess`` with verl-mtp's MTP loss (megatron calls it with keywords only)."""
    _slot.pending = None  # a stash never outlives the forward that made it
    labels = kw.get("labels")
    if not (kw.get("mtp_in_postprocess") and labels is not None and self.config.mtp_num_layers):
        return self._verl_mtp_stock_postprocess(**kw)
    if not _mtp_wanted():
        return _main_logits_only(self, kw)
    plan = forward_plan(self)
    if plan.decoupled:
        from verl_mtp.megatron.decoupled import run_decoupled_mtp_blocks

        hidden_states, drafter_states = run_decoupled_mtp_blocks(
            self, kw["hidden_states"], lambda hidden: _run_mtp_block(self, kw, hidden))
    else:
        hidden_states = drafter_states = _run_mtp_block(self, kw)
    if not self.post_process:
        return hidden_states
    packed_seq_params = kw.get("packed_seq_params")
    cp_group = _cp_group(self, packed_seq_params)
    depths = self.config.mtp_num_layers
    chunks = torch.chunk(hidden_states, 1 + depths, dim=0)
    # the depths' hidden states the drafter loss trains (decoupled: from the MTP module's own pass)
    drafter_chunks = chunks[1:] if drafter_states is hidden_states else torch.chunk(drafter_states, 1 + depths, dim=0)[1:]
    output_weight = _output_weight(self)
    main_hidden, agree, valid, drafter = chunks[0], None, None, None
    if plan.drafts_against_main_head:
        drafter = _drafter_stash(self, plan, main_hidden, drafter_chunks, kw)
    elif plan.trains_drafter_loss:
        main_hidden, agree, valid = _attach_ce_losses(
            self, plan, (main_hidden, *drafter_chunks), kw, output_weight, cp_group)
    logits = _main_logits(self, main_hidden, output_weight, kw)
    _put(
        _PendingMtp(
            model=self,
            hidden_chunks=chunks[1:] if plan.loss_type == "rl" else (),
            labels=labels,
            output_weight=output_weight,
            packed_seq_params=packed_seq_params,
            cp_group=cp_group,
            runtime_gather_output=kw.get("runtime_gather_output"),
            agree=agree,
            valid=valid,
            logits_shape=tuple(logits.shape),
            drafter=drafter,
        )
    )
    return logits


def install_mtp_postprocess(model, plan: MtpForwardPlan) -> None:
    """Put ``mtp_postprocess`` on a GPTModel instance (over verl's MTP postprocess); idempotent."""
    if getattr(model, "_verl_mtp_stock_postprocess", None) is None:
        model._verl_mtp_stock_postprocess = model._postprocess
        model._verl_mtp_block_params = frozenset(inspect.signature(model.mtp.forward).parameters)
    if plan.decoupled:
        from verl_mtp.megatron.decoupled import check_decoupled_model

        check_decoupled_model(model)
    model._verl_mtp_plan = plan
    model._postprocess = types.MethodType(mtp_postprocess, model)


def forward_plan(model) -> MtpForwardPlan:
    """The plan ``install_mtp_postprocess`` put on ``model`` (the one place it is kept)."""
    return model._verl_mtp_plan


def install_mtp_forward(module, mtp) -> None:
    """After verl's ``patch_engine_mtp`` on ``module`` (a model chunk or a list of them): put the
    MTP forward planned from ``mtp`` (the run's ExtendedMtpConfig) on every GPTModel with MTP
    layers. Nothing when MTP does not train."""
    if not mtp.enable_train:
        return
    from verl.models.mcore.mtp_patch import _get_patching_model

    for chunk in module if isinstance(module, list) else [module]:
        model = _get_patching_model(chunk)
        if model is None or getattr(model, "mtp", None) is None:
            continue
        install_mtp_postprocess(model, MtpForwardPlan.for_model(mtp, model.config))


def logits_processor_with_mtp(original: Callable) -> Callable:
    def _lm_head_logits_processor(self, logits, label, temperature, **kwargs):
        pending = _take()  # taken first: a failure below must not leave it for the next micro-batch
        if pending is not None and not _belongs_to(pending, self, logits):
            pending = None  # another engine's model, or a forward whose output never reached here
        if pending is None:
            return original(self, logits, label, temperature, **kwargs)
        agree, valid = pending.agree, pending.valid
        plan = forward_plan(pending.model)
        result = original(self, logits, label, temperature, **kwargs)
        if pending.drafter is not None:  # kl / tv: attached here, where the rollout temperature is known
            agree, valid = _attach_drafter_losses(pending, plan, result, temperature)
        if plan.loss_type == "rl":
            from verl_mtp.megatron.mtp_log_probs import mtp_raw_log_probs

            log_probs, valid, agree = mtp_raw_log_probs(
                pending.model.output_layer,
                pending.hidden_chunks,
                pending.labels,
                temperature,
                output_weight=pending.output_weight,
                detach_output_layer=plan.detach_output_layer,
                cp_group=pending.cp_group,
                packed_seq_params=pending.packed_seq_params,
                runtime_gather_output=pending.runtime_gather_output,
                with_agreement=True,
                chunk_tokens=plan.chunk_tokens,
            )
            result[MTP_LOG_PROBS_KEY] = log_probs
        # Float, not bool: verl's un-packing all-gathers over context parallelism.
        result[MTP_VALID_KEY] = valid.to(torch.float32)
        result[MTP_AGREE_KEY] = agree.to(torch.float32)
        return result

    _lm_head_logits_processor.__verl_mtp_original__ = original
    return _lm_head_logits_processor
