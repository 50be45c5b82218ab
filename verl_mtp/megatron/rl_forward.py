"""The Megatron engine forward for ``mtp_loss_type=rl``: per-depth MTP log-probs in model_output.

Two steps, both inside one micro-batch forward of verl's ``MegatronEngineWithLMHead``:

1. ``rl_postprocess`` replaces ``GPTModel._postprocess`` (installed over verl's own MTP
   postprocess). It runs the MTP block, returns the main logits as verl does, computes no
   cross-entropy (the MTP head is trained by the policy loss instead), and leaves the depth hidden
   states and labels for step 2.
2. ``logits_processor_with_mtp`` wraps the engine's ``_lm_head_logits_processor``. It knows the
   rollout temperature, scores the sampled tokens under each depth
   (``verl_mtp.megatron.mtp_log_probs``) and returns them as extra keys, which verl un-packs (THD or
   BSHD, context-parallel gather) exactly like ``log_probs``.

The hand-over is a per-thread slot that step 2 empties, and a stash is used only with the very
logits tensor it was made with, so it can never leak into another micro-batch's output.
"""

from __future__ import annotations

import inspect
import threading
import types
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from verl_mtp.loss import MTP_LOG_PROBS_KEY, MTP_VALID_KEY


@dataclass
class _PendingMtp:
    model: Any
    hidden_chunks: tuple
    labels: torch.Tensor
    output_weight: Optional[torch.Tensor]
    packed_seq_params: Any
    cp_group: Any
    runtime_gather_output: Any
    detach_output_layer: bool
    logits: Optional[torch.Tensor] = None  # the main logits this stash belongs to


_slot = threading.local()


def _put(pending: _PendingMtp) -> None:
    _slot.pending = pending


def _take() -> Optional[_PendingMtp]:
    pending = getattr(_slot, "pending", None)
    _slot.pending = None
    return pending


def _cp_group(model, packed_seq_params):
    # A per-micro-batch dynamic CP group on the packed params wins over the model's static one.
    group = getattr(packed_seq_params, "cp_group", None)
    if group is None:
        group = getattr(model, "cp_group", None)
    if group is None:
        group = getattr(getattr(model, "pg_collection", None), "cp", None)
    return group


def rl_postprocess(self, **kw):
    """``GPTModel._postprocess`` for the RL MTP loss (megatron calls it with keywords only)."""
    labels = kw.get("labels")
    if not (kw.get("mtp_in_postprocess") and labels is not None and self.config.mtp_num_layers):
        return self._verl_mtp_stock_postprocess(**kw)

    block_kwargs = dict(kw.get("extra_block_kwargs") or {})
    if "padding_mask" in self._verl_mtp_block_params:
        block_kwargs["padding_mask"] = kw.get("padding_mask")
    hidden_states = self.mtp(
        input_ids=kw["input_ids"],
        position_ids=kw["position_ids"],
        hidden_states=kw["hidden_states"],
        attention_mask=kw.get("attention_mask"),
        inference_params=kw.get("inference_params"),
        rotary_pos_emb=kw.get("rotary_pos_emb"),
        rotary_pos_cos=kw.get("rotary_pos_cos"),
        rotary_pos_sin=kw.get("rotary_pos_sin"),
        packed_seq_params=kw.get("packed_seq_params"),
        sequence_len_offset=kw.get("sequence_len_offset"),
        embedding=self.embedding,
        **block_kwargs,
    )
    if not self.post_process:
        return hidden_states
    chunks = torch.chunk(hidden_states, 1 + self.config.mtp_num_layers, dim=0)
    output_weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
    logits, _ = self.output_layer(chunks[0], weight=output_weight, runtime_gather_output=kw.get("runtime_gather_output"))
    logits = logits.transpose(0, 1).contiguous()
    _put(
        _PendingMtp(
            model=self,
            hidden_chunks=chunks[1:],
            labels=labels,
            output_weight=output_weight,
            packed_seq_params=kw.get("packed_seq_params"),
            cp_group=_cp_group(self, kw.get("packed_seq_params")),
            runtime_gather_output=kw.get("runtime_gather_output"),
            detach_output_layer=self._verl_mtp_detach_output_layer,
            logits=logits,
        )
    )
    return logits


def install_rl_postprocess(model, detach_output_layer: bool) -> None:
    """Put ``rl_postprocess`` on a GPTModel instance (over verl's MTP postprocess); idempotent."""
    if getattr(model, "_verl_mtp_stock_postprocess", None) is None:
        model._verl_mtp_stock_postprocess = model._postprocess
        model._verl_mtp_block_params = frozenset(inspect.signature(model.mtp.forward).parameters)
    model._verl_mtp_detach_output_layer = detach_output_layer
    model._postprocess = types.MethodType(rl_postprocess, model)


def uninstall_rl_postprocess(model) -> None:
    stock = getattr(model, "_verl_mtp_stock_postprocess", None)
    if stock is not None:
        model._postprocess = stock
        model._verl_mtp_stock_postprocess = None


def logits_processor_with_mtp(original: Callable) -> Callable:
    def _lm_head_logits_processor(self, logits, label, temperature, **kwargs):
        pending = _take()  # taken first: a failure below must not leave it for the next micro-batch
        if pending is not None and pending.logits is not logits:
            pending = None  # made by a forward whose output never reached this processor
        result = original(self, logits, label, temperature, **kwargs)
        if pending is not None:
            from verl_mtp.megatron.mtp_log_probs import mtp_raw_log_probs

            log_probs, valid = mtp_raw_log_probs(
                pending.model.output_layer,
                pending.hidden_chunks,
                pending.labels,
                temperature,
                output_weight=pending.output_weight,
                detach_output_layer=pending.detach_output_layer,
                cp_group=pending.cp_group,
                packed_seq_params=pending.packed_seq_params,
                runtime_gather_output=pending.runtime_gather_output,
            )
            result[MTP_LOG_PROBS_KEY] = log_probs
            # Float, not bool: verl's un-packing all-gathers over context parallelism.
            result[MTP_VALID_KEY] = valid.to(log_probs.dtype)
        return result

    _lm_head_logits_processor.__verl_mtp_original__ = original
    return _lm_head_logits_processor
